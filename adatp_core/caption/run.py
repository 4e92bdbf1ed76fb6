"""The folder run: caption a planned folder, write each caption atomically, log the manifest.

``caption_folder`` is the job behind the CLI (``python -m adatp_core caption DIR``) and
the Caption Folder node. A ``FolderRun`` holds one run's state: the claims it holds, the
manifest it appends to and the summary it fills, one clip result at a time.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import AdaTPInputError
from .files import STOPPING_ERRNOS, ClipClaim, Manifest, existing_caption, shown, write_atomic
from .plan import CaptionJob, FolderPlan, plan_folder
from .stream import caption_videos, check_settings
from .summary import CaptionSummary, ClipResult, manifest_record

log = logging.getLogger(__package__)  # "adatp_core.caption", the name the one-module caption.py logged under


class FolderRun:
    """One run over a planned folder. ``claim`` is caption_videos' claim: each clip is claimed
    (ClipClaim) just before the model takes it, so two runs on one folder never caption the
    same clip, and a caption another run wrote meanwhile is kept unless ``job.overwrite``."""

    def __init__(self, model, job: CaptionJob, plan: FolderPlan, manifest: Path | None = None):
        self.model, self.job, self.plan = model, job, plan
        self.summary, self.targets = plan.summary, plan.targets
        self.manifest = manifest
        self.sink = Manifest(manifest) if manifest is not None else None
        self.summary.manifest = str(manifest) if manifest is not None else None
        self.held: dict[str, ClipClaim] = {}
        self.begun = time.time()  # with overwrite, a caption newer than this is another run's of this same job
        self.stopped: list[BaseException] = []  # an interrupt raised between decode steps

    def written_since_we_began(self, target: Path) -> bool:
        try:
            return os.lstat(target).st_mtime >= self.begun
        except OSError:
            return False

    def claim(self, path: str) -> str | None:
        target = self.targets[path][1]
        lock = ClipClaim(target)
        try:
            got = lock.acquire()
        except OSError as exc:
            raise AdaTPInputError(f"cannot write in {shown(str(target.parent))} ({exc.strerror})") from exc
        if not got:
            return "another run is captioning it now"
        if os.path.lexists(target) and (not self.job.overwrite or self.written_since_we_began(target)):
            lock.release()
            return "another run captioned it meanwhile"
        self.held[path] = lock
        return None

    def log_records(self, records: list) -> None:
        """Append to the manifest; a failed write (a full disk) stops the run like a failed caption write."""
        if self.sink is None or not records or self.summary.write_error:
            return
        try:
            self.sink.write_lines([json.dumps(r, ensure_ascii=False) for r in records])
        except OSError as exc:
            self.summary.write_error = f"cannot write the manifest {shown(str(self.manifest))} ({exc.strerror or exc})"

    def stepper(self, on_step: Callable[[], None] | None) -> Callable[[], None] | None:
        """on_step, remembering what it raised: an interrupt between decode steps, not a model failure."""
        if on_step is None:
            return None

        def step() -> None:
            try:
                on_step()
            except BaseException as exc:
                self.stopped.append(exc)
                raise

        return step

    def take(self, result: ClipResult) -> tuple[str, dict | None]:
        """Write one clip's caption and count it in the summary; (its relative path, its manifest
        record or None). Its claim is released whatever happens."""
        job, summary = self.job, self.summary
        rel, target = self.targets[result.path]
        record = None
        try:
            if result.skipped is not None:
                summary.others.append(rel)
                kind, detail = existing_caption(target, job.caption_root)
                if kind == "text":
                    summary.captions[rel] = detail
            elif result.ok:
                text = job.text(result.caption)
                try:
                    if job.save:
                        write_atomic(target, text)
                except OSError as exc:
                    why = f"cannot write {shown(str(target))} ({exc.strerror or exc})"
                    summary.failed.append((rel, why))
                    record = manifest_record(rel, result, error=why)
                    if exc.errno in STOPPING_ERRNOS:
                        summary.write_error = why
                else:
                    summary.done.append(rel)
                    summary.captions[rel] = text
                    summary.model_seconds += result.times.model
                    summary.batch_size = result.times.batch_size or summary.batch_size
                    record = manifest_record(rel, result, text)
            else:
                summary.failed.append((rel, result.error))
                record = manifest_record(rel, result, error=result.error)
        finally:
            lock = self.held.pop(result.path, None)
            if lock is not None:
                lock.release()
        return rel, record

    def run(self, on_clip=None, on_step=None) -> CaptionSummary:
        """Caption the plan's clips; see caption_folder."""
        job, summary = self.job, self.summary
        start = time.perf_counter()
        try:
            self.log_records(self.plan.records)
            if summary.write_error:
                return summary
            results = caption_videos(self.model, self.plan.todo, job.prompt, job.pipeline, job.workers,
                                     job.processes, self.claim, job.batch_size, self.stepper(on_step))
            while True:
                try:
                    result = next(results, None)
                except Exception as exc:  # the model (or the machine) failed, not one clip
                    if self.stopped:  # an interrupt between decode steps, not a failure
                        raise
                    log.exception("captioning stopped")
                    summary.model_error = f"{exc.__class__.__name__}: {shown(str(exc))}"
                    break
                if result is None:
                    break
                rel, record = self.take(result)
                if record is not None:
                    self.log_records([record])
                summary.seconds = time.perf_counter() - start
                if summary.write_error:
                    results.close()
                    break
                if on_clip is not None:
                    try:
                        on_clip(rel, result, summary)
                    except BaseException:  # an interrupt: stop decoding ahead, keep what is written
                        results.close()
                        raise
        finally:
            summary.seconds = time.perf_counter() - start
            for lock in self.held.values():
                lock.release()
            if self.sink is not None:
                self.sink.close()
        order = {c.relative_to(job.folder).as_posix(): k for k, c in enumerate(self.plan.clips)}
        summary.captions = dict(sorted(summary.captions.items(), key=lambda kv: order.get(kv[0], len(order))))
        return summary


def caption_folder(model, job: CaptionJob, shard: tuple[int, int] = (0, 1), manifest: Path | None = None,
                   on_clip: Callable[[str, ClipResult | None, CaptionSummary], None] | None = None,
                   on_plan: Callable[[int], None] | None = None, plan: FolderPlan | None = None,
                   on_step: Callable[[], None] | None = None) -> CaptionSummary:
    """Caption the clips of ``job`` that have no caption yet (all with overwrite).

    shard (index, count): this process takes every count-th clip from index.
    manifest: a JSONL file to append one line per clip to (captioned or failed).
    plan: from plan_folder, when the caller planned before loading the model.
    on_plan(n) is called with the number of clips to caption; on_clip(path,
    result, summary) after each clip is written, and may raise to stop
    between clips (an interrupt): what is written stays written. on_step() runs
    between decode steps when clips are decoded together, and may raise likewise.
    Each clip is claimed (FolderRun.claim) just before the model takes it, so two runs
    on one folder never caption the same clip; a caption another run wrote
    meanwhile is kept unless ``job.overwrite``.
    A model failure stops the run and is reported in ``model_error``; a full disk
    in ``write_error``; any other failed write fails that clip.
    """
    check_settings(model, job.prompt, job.pipeline)
    if plan is None:
        plan = plan_folder(job, shard)
    run = FolderRun(model, job, plan, manifest)
    if on_plan is not None:
        on_plan(len(plan.todo))
    return run.run(on_clip, on_step)
