"""Caption many clips: one function over a list of videos, decoding ahead of the model.

``caption_videos`` takes a model, the AdaTP settings and a caption prompt and
yields one ``ClipResult`` per clip, in order: the caption and its stats, or the
error. Frames for the next clips are decoded meanwhile in a small pool of
worker processes (decord itself runs one level further down, in decode_worker),
so the model waits for decoding only when the decoder cannot keep up.

``caption_folder`` is the folder job behind the CLI (``python -m adatp_core
caption DIR``) and the Caption Folder node: it finds the clips, skips those that
already have a caption, writes each ``.txt`` atomically (temporary name, then
``os.replace``), appends one JSON line per clip to a manifest, and returns a
summary. Under ``accelerate launch`` the CLI gives each process every n-th clip
of the sorted list (``shard``).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from .attention import QUERY_MODES, check_question
from .batching import check_batch_size, decode_together
from .errors import AdaTPInputError
from .pipeline import PipelineConfig, prefill, run_pipeline
from .prune import check_retention
from .video import MAX_FRAMES, SAMPLING_MODES, VIDEO_EXTENSIONS, frames_to_image, read_video

log = logging.getLogger(__name__)

DEFAULT_PROMPT = ("Describe this video in detail: the setting, every object and person, what moves and how, "
                  "and the order in which things happen.")
CAPTION_SUFFIX = ".txt"
MAX_WORKERS = 16


@dataclass(frozen=True)
class ClipResult:
    """One clip's outcome. caption: the model's text (None on failure); stats:
    tokens kept/total, FLOPs ratio, TTFT, tokens/s and timings; error: why it failed."""

    path: str
    caption: str | None
    stats: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class DecodeAhead:
    """Decodes ``paths`` in order, up to ``depth`` clips ahead of the consumer, in
    ``workers`` processes (0: in the consumer's process, when asked for).

    processes False runs the workers as threads: decord still decodes in its own
    child process (decode_worker.py), and a host application whose main script
    must not be re-imported by spawned workers (ComfyUI's main.py) stays safe.
    Iterating yields (path, get) with get() -> (frames uint8 [T, H, W, 3], info),
    raising the clip's error. A worker that dies (a decoder crash) fails only
    the clip it was decoding; the pool is restarted.
    """

    def __init__(self, paths: Iterable, cfg: PipelineConfig, workers: int = 2, depth: int | None = None,
                 processes: bool = True):
        if isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= MAX_WORKERS:
            raise AdaTPInputError(f"decode workers must be an integer from 0 to {MAX_WORKERS}, got {workers!r}")
        self.paths = [str(p) for p in paths]
        # Plain arguments: a worker process then imports video.py alone (no torch).
        self.args = (cfg.num_frames, cfg.sampling, cfg.fps, cfg.start_time, cfg.end_time)
        self.workers = workers
        self.processes = processes
        self.depth = max(1, depth if depth is not None else workers + 1)
        self.pool = None
        self.pending: deque[tuple[str, Future]] = deque()

    def _start_pool(self) -> None:
        if self.processes:  # spawn: never fork a process that holds a model and torch's threads
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        else:
            self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="adatp-decode")

    def _submit(self, path: str) -> None:
        self.pending.append((path, self.pool.submit(read_video, path, *self.args)))

    def __enter__(self):
        if self.workers:
            self._start_pool()
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        self.pending.clear()

    def __iter__(self) -> Iterator[tuple[str, Callable]]:
        if not self.workers:
            for path in self.paths:
                yield path, (lambda p=path: read_video(p, *self.args))
            return
        queue = deque(self.paths)
        while queue or self.pending:
            while queue and len(self.pending) < self.depth:
                self._submit(queue.popleft())
            path, future = self.pending.popleft()
            yield path, lambda f=future: self._result(f)

    def _result(self, future: Future):
        try:
            return future.result()
        except BrokenProcessPool as exc:
            # Every queued clip shared the dead pool: decode them again in a new one.
            redo = [p for p, _ in self.pending]
            self.pending.clear()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self._start_pool()
            for p in redo:
                self._submit(p)
            raise AdaTPInputError("the decoder process died on this clip (a decoder crash); "
                                  "re-export it as MP4 (H.264).") from exc


def clip_stats(stats: dict) -> dict:
    """The figures a caption run reports per clip, from a pipeline's stats."""
    ms = stats.get("decode_ms_per_token") or 0.0
    return {
        "tokens_kept": stats["tokens_kept"], "tokens_total": stats["tokens_total"],
        "flops_ratio": round(stats["flops_ratio"], 6),
        "ttft_s": round(stats.get("time_to_first_token", 0.0), 4),
        "tokens_per_s": round(1000.0 / ms, 2) if ms else None,
        "new_tokens": stats.get("new_tokens", 0),
    }


def check_settings(model, prompt: str, cfg: PipelineConfig) -> None:
    """Settings that would fail every clip fail once, before any clip is decoded."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise AdaTPInputError(f"the caption prompt is empty; write an instruction such as {DEFAULT_PROMPT!r}.")
    check_question(prompt)
    n = cfg.num_frames
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_FRAMES:
        raise AdaTPInputError(f"frames must be an integer from 1 to {MAX_FRAMES}, got {n!r} (32 is usual)")
    if cfg.sampling not in SAMPLING_MODES or cfg.query not in QUERY_MODES:
        raise AdaTPInputError(f"sampling must be one of {SAMPLING_MODES} and query one of {QUERY_MODES}")
    if cfg.retention is not None:
        check_retention(cfg.retention)
    model.adapter.check_layer(int(cfg.layer))


def caption_videos(model, videos: Iterable, prompt: str = DEFAULT_PROMPT, cfg: PipelineConfig | None = None,
                   workers: int = 2, processes: bool = True, batch_size: int = 1,
                   on_step: Callable[[], None] | None = None) -> Iterator[ClipResult]:
    """Caption each video in ``videos`` (paths) with ``run_pipeline``; one result per clip, in order.

    A clip that cannot be used (corrupt, empty, too short: AdaTPInputError) gives
    a result with ``error`` set; any other exception is the model failing and
    ends the iteration by propagating. Stats also hold ``time_wait`` (the model
    waiting for frames) and ``time_model``. workers, processes: see DecodeAhead.
    batch_size: clips decoded together (batching.py; 0: auto). on_step() runs
    between decode steps and may raise (Cancel).
    """
    cfg = cfg or PipelineConfig()
    check_settings(model, prompt, cfg)
    if check_batch_size(batch_size) != 1:
        yield from _caption_together(model, videos, prompt, cfg, workers, processes, batch_size, on_step)
        return
    with DecodeAhead(videos, cfg, workers, processes=processes) as ahead:
        for path, get in ahead:
            wait_start = time.perf_counter()
            try:
                frames, info = get()
            except Exception as exc:  # noqa: BLE001  whatever stops one clip's decoding fails that clip only
                error = str(exc) if isinstance(exc, AdaTPInputError) else f"{exc.__class__.__name__}: {exc}"
                yield ClipResult(path, None, error=error)
                continue
            model_start = time.perf_counter()
            try:
                result = run_pipeline(model, frames_to_image(frames), prompt, cfg, video_info=info)
            except AdaTPInputError as exc:  # e.g. a clip too long for the model's context
                yield ClipResult(path, None, error=str(exc))
                continue
            done = time.perf_counter()
            stats = {**clip_stats(result.stats), "time_wait": round(model_start - wait_start, 4), "time_model": round(done - model_start, 4)}
            yield ClipResult(path, result.answer.text.strip(), stats)


def _caption_together(model, videos, prompt, cfg, workers, processes, batch_size, on_step) -> Iterator[ClipResult]:
    """caption_videos with clips decoded together: each clip prefilled alone, then joining the batch."""
    times: dict[str, tuple[float, float]] = {}  # path: (waited for frames, prefill seconds)
    order: deque[str] = deque()  # clips taken in, not yet yielded
    ready: dict[str, ClipResult] = {}  # finished out of order

    def clips(ahead):
        for path, get in ahead:
            order.append(path)
            yield path, lambda path=path, get=get: prefill_clip(path, get)

    def prefill_clip(path, get):
        wait_start = time.perf_counter()
        try:
            frames, info = get()
        except Exception as exc:  # noqa: BLE001  whatever stops one clip's decoding fails that clip only
            raise AdaTPInputError(str(exc) if isinstance(exc, AdaTPInputError)
                                  else f"{exc.__class__.__name__}: {exc}") from exc
        model_start = time.perf_counter()
        state = prefill(model, frames_to_image(frames), prompt, cfg, video_info=info)
        times[path] = (model_start - wait_start, time.perf_counter() - model_start)
        return state

    def result(done) -> ClipResult:
        if done.error is not None:
            return ClipResult(done.key, None, error=done.error)
        wait, seconds = times.pop(done.key)
        stats = {**clip_stats(done.answer.stats), "time_wait": round(wait, 4),
                 "time_model": round(seconds + done.answer.stats["time_decode_share"], 4),
                 "batch_size": done.answer.stats["batch_size"]}
        return ClipResult(done.key, done.answer.text.strip(), stats)

    # Results go out in clip order, as at batch 1: a clip that finishes early waits for the
    # clips before it (at most a batch's worth). If the run stops (Cancel, a model failure),
    # the finished ones still go out first, to be written.
    with DecodeAhead(videos, cfg, workers, processes=processes) as ahead:
        try:
            for done in decode_together(model, cfg.generation, clips(ahead), batch_size, on_step):
                ready[done.key] = result(done)
                while order and order[0] in ready:
                    yield ready.pop(order.popleft())
        except (Exception, KeyboardInterrupt):
            for path in order:
                if path in ready:
                    yield ready.pop(path)
            raise


# --- folder jobs --------------------------------------------------------------------------------

def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def find_clips(folder, recursive: bool = False, exclude: Iterable = ()) -> list[Path]:
    """Video files in ``folder`` (and its subfolders when ``recursive``), sorted by
    relative path. Hidden files and folders, and anything under ``exclude``, are skipped."""
    folder = Path(folder)
    skip = [Path(e).resolve() for e in exclude]
    found = []
    for path in folder.rglob("*") if recursive else folder.iterdir():
        rel = path.relative_to(folder)
        if _hidden(rel) or path.suffix.lower() not in VIDEO_EXTENSIONS or not path.is_file():
            continue
        real = path.resolve()
        if any(real == s or s in real.parents for s in skip):
            continue
        found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def caption_path(clip: Path, folder: Path, out: Path | None = None) -> Path:
    """clip.mp4 -> clip.txt beside it, or at the same relative path under ``out``."""
    target = Path(out) / Path(clip).relative_to(folder) if out is not None else Path(clip)
    return target.with_suffix(CAPTION_SUFFIX)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a hidden temporary file beside ``path``, then rename it over
    ``path``: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass(frozen=True)
class CaptionJob:
    """A folder to caption. out: mirror captions under this folder (None: beside
    the clips). prefix and suffix go around every caption (a trigger word)."""

    folder: Path
    out: Path | None = None
    prompt: str = DEFAULT_PROMPT
    prefix: str = ""
    suffix: str = ""
    overwrite: bool = False
    recursive: bool = False
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    workers: int = 2
    processes: bool = True  # decode workers: processes, or threads (see DecodeAhead)
    batch_size: int = 1  # clips decoded together (0: auto, see batching.py)

    def __post_init__(self):
        folder = Path(self.folder).expanduser()
        if not folder.is_dir():
            raise AdaTPInputError(f"clip folder {folder} does not exist or is not a folder; check the path.")
        object.__setattr__(self, "folder", folder)
        if self.out is not None:
            out = Path(self.out).expanduser()
            if out.exists() and not out.is_dir():
                raise AdaTPInputError(f"--out {out} is a file; give a folder for the captions.")
            object.__setattr__(self, "out", out)
        check_batch_size(self.batch_size)
        for name in ("prefix", "suffix"):
            if not isinstance(getattr(self, name), str):
                raise AdaTPInputError(f"{name} must be text, got {getattr(self, name)!r}")

    def text(self, caption: str) -> str:
        return f"{self.prefix}{caption}{self.suffix}"


@dataclass
class CaptionSummary:
    """What a folder run did. captions: every clip that has a caption now (written
    this run or found), in clip order, as {path: text}."""

    found: int = 0
    done: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: list = field(default_factory=list)  # (path, reason)
    captions: dict = field(default_factory=dict)
    model_error: str | None = None
    seconds: float = 0.0
    model_seconds: float = 0.0
    batch_size: int = 1  # clips decoded together (the number auto chose, when auto)

    @property
    def busy_fraction(self) -> float:
        return self.model_seconds / self.seconds if self.seconds > 0 else 0.0

    @property
    def clips_per_minute(self) -> float:
        return 60.0 * len(self.done) / self.seconds if self.seconds > 0 else 0.0

    def exit_code(self) -> int:
        """0, unless the model failed (2) or no clip has a caption (1)."""
        if self.model_error:
            return 2
        return 0 if self.captions else 1

    def to_dict(self) -> dict:
        return {"found": self.found, "done": self.done, "skipped": self.skipped,
                "failed": [list(f) for f in self.failed], "captions": self.captions,
                "model_error": self.model_error, "seconds": self.seconds, "model_seconds": self.model_seconds,
                "batch_size": self.batch_size}

    @classmethod
    def merge(cls, parts: Iterable[dict]) -> CaptionSummary:
        """One summary for the shards of a distributed run (wall time: the slowest shard)."""
        total = cls()
        for p in parts:
            total.found += p["found"]
            total.done += p["done"]
            total.skipped += p["skipped"]
            total.failed += [tuple(f) for f in p["failed"]]
            total.captions.update(p["captions"])
            total.model_error = total.model_error or p["model_error"]
            total.seconds = max(total.seconds, p["seconds"])
            total.model_seconds += p["model_seconds"]
            total.batch_size = max(total.batch_size, p.get("batch_size", 1))
        total.captions = dict(sorted(total.captions.items()))
        return total

    def text(self, processes: int = 1) -> str:
        lines = [f"Captioned {len(self.done)} clip(s), skipped {len(self.skipped)} already captioned, "
                 f"failed {len(self.failed)}, of {self.found} found."]
        if self.done:
            busy = self.model_seconds / (self.seconds * processes) if self.seconds > 0 else 0.0
            lines.append(f"{self.clips_per_minute:.1f} clips/min over {self.seconds:.1f} s; model busy "
                         f"{100 * busy:.0f}% of the time (the rest it waited for decoding)")
            if self.batch_size != 1:
                lines.append(f"Decoded up to {self.batch_size} clips together.")
        for path, reason in self.failed:
            lines.append(f"  failed: {path}: {reason}")
        if self.model_error:
            lines.append(f"The model failed, run stopped: {self.model_error}")
        elif not self.captions:
            lines.append("Nothing could be captioned.")
        return "\n".join(lines)


def manifest_line(path: str, result: ClipResult | None, text: str | None = None, error: str | None = None) -> str:
    record = {"path": path}
    if error is None:
        record["caption"] = text
        record.update(result.stats if result is not None else {})
    else:
        record["error"] = error
    return json.dumps(record, ensure_ascii=False)


def caption_folder(model, job: CaptionJob, shard: tuple[int, int] = (0, 1), manifest: Path | None = None,
                   on_clip: Callable[[str, ClipResult | None, CaptionSummary], None] | None = None,
                   on_plan: Callable[[int], None] | None = None,
                   on_step: Callable[[], None] | None = None) -> CaptionSummary:
    """Caption the clips of ``job`` that have no caption yet (all with overwrite).

    shard (index, count): this process takes every count-th clip from index.
    manifest: a JSONL file to append one line per clip to (captioned or failed).
    on_plan(n) is called with the number of clips to caption; on_clip(path,
    result, summary) after each clip is written, and may raise to stop
    between clips (an interrupt): what is written stays written. on_step() runs
    between decode steps when clips are decoded together, and may raise likewise.
    A model failure stops the run and is reported in ``model_error``.
    """
    index, count = shard
    check_settings(model, job.prompt, job.pipeline)
    clips = find_clips(job.folder, job.recursive, [job.out] if job.out is not None else [])[index::count]
    summary = CaptionSummary(found=len(clips))
    todo, targets, claimed = [], {}, {}
    for clip in clips:
        rel = clip.relative_to(job.folder).as_posix()
        target = caption_path(clip, job.folder, job.out)
        if target in claimed:
            summary.failed.append((rel, f"{claimed[target]} already writes {target.name}; rename one of them"))
            continue
        claimed[target] = rel
        if target.exists() and not job.overwrite:
            summary.skipped.append(rel)
            summary.captions[rel] = target.read_text(encoding="utf-8")
            continue
        todo.append(clip)
        targets[str(clip)] = (rel, target)
    if on_plan is not None:
        on_plan(len(todo))
    sink = open(manifest, "a", encoding="utf-8") if manifest is not None else None
    start = time.perf_counter()
    try:
        stopped = []

        def step() -> None:
            try:
                on_step()
            except BaseException as exc:
                stopped.append(exc)
                raise

        results = caption_videos(model, todo, job.prompt, job.pipeline, job.workers, job.processes,
                                 job.batch_size, step if on_step is not None else None)
        while True:
            try:
                result = next(results, None)
            except Exception as exc:  # the model (or the machine) failed, not one clip
                if stopped:  # an interrupt between decode steps, not a failure
                    raise
                log.exception("captioning stopped")
                summary.model_error = f"{exc.__class__.__name__}: {exc}"
                break
            if result is None:
                break
            rel, target = targets[result.path]
            if result.ok:
                text = job.text(result.caption)
                write_atomic(target, text)
                summary.done.append(rel)
                summary.captions[rel] = text
                summary.model_seconds += result.stats["time_model"]
                summary.batch_size = result.stats.get("batch_size", summary.batch_size)
                line = manifest_line(rel, result, text)
            else:
                summary.failed.append((rel, result.error))
                line = manifest_line(rel, result, error=result.error)
            if sink is not None:
                sink.write(line + "\n")
                sink.flush()
            summary.seconds = time.perf_counter() - start
            if on_clip is not None:
                try:
                    on_clip(rel, result, summary)
                except BaseException:  # an interrupt: stop decoding ahead, keep what is written
                    results.close()
                    raise
    finally:
        summary.seconds = time.perf_counter() - start
        if sink is not None:
            sink.close()
    order = {c.relative_to(job.folder).as_posix(): k for k, c in enumerate(clips)}
    summary.captions = dict(sorted(summary.captions.items(), key=lambda kv: order[kv[0]]))
    return summary


class ProgressLine:
    """A plain progress bar on stderr: clips done, clips per minute, ETA.

    On a terminal it redraws one line; elsewhere (logs, CI) it prints a line per clip.
    """

    def __init__(self, total: int, label: str = "", stream=None, width: int = 24):
        self.total, self.label, self.width = total, label, width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.count = 0
        self.start = time.perf_counter()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = 60.0 * self.count / elapsed if elapsed > 0 else 0.0
        left = self.total - self.count
        eta = f"{int(left * 60 / rate) // 60}m{int(left * 60 / rate) % 60:02d}s" if rate > 0 else "?"
        filled = self.width * self.count // max(self.total, 1)
        return (f"{self.label}[{'#' * filled}{'.' * (self.width - filled)}] {self.count}/{self.total} clips, "
                f"{rate:.1f} clips/min, ETA {eta}")

    def update(self, name: str = "") -> None:
        self.count += 1
        if self.tty:
            self.stream.write("\r" + self.line() + ("\n" if self.count >= self.total else ""))
        else:
            self.stream.write(self.line() + (f"  {name}" if name else "") + "\n")
        self.stream.flush()
