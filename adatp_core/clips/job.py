"""From long footage to a training set: sources -> shots -> clips -> captions -> outputs.

``ClipsJob`` (settings.py) says what to do (sources, the output folder, the clip rules,
the cut, the caption settings and the layouts); ``run_clips`` does it for this process's
share of the sources and returns a ``ClipsSummary`` (summary.py). The steps:

1. **plan** (``plan_sources``): each source's shots (``detect_shots``) and clips
   (``plan_clips``). The plan is kept per source in ``OUT/.adatp/sources/KEY.json``
   (records.py) with the source's fingerprint and the rules, so a rerun on an unchanged
   source with the same rules detects nothing again. ``--dry-run`` stops here and writes
   nothing.
2. **cut** (``cut_clips``): the clips that are not in ``OUT/videos`` yet, each
   written under a temporary name and renamed (never half a clip).
3. **caption**: the caption run over ``OUT/videos`` (``caption_folder``: claims,
   locks, atomic writes and its summary), limited to this job's clips; a clip with a
   caption is skipped, and no model loads when nothing is left to caption.
4. **outputs** (outputs.py): the layouts, from every source's plan and captions,
   each file written only when its text changes, so a rerun writes nothing.

Under ``accelerate launch`` (or torchrun) each process takes every n-th source of
the sorted list, as the caption command takes every n-th clip; the first process
writes the layouts once every process has finished.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..caption import (ClipClaim, FolderPlan, OptionError, caption_folder, existing_caption, plan_folder, scan_folder,
                       write_atomic)
from ..caption.files import STOPPING_ERRNOS, printable
from ..errors import AdaTPInputError, AdaTPInterrupted
from .cut import cut_clips, remove_stale_temps
from .outputs import DatasetClip, DatasetSource, write_outputs
from .plan import ClipPlan, fingerprint, hdr_transfer, plan_clips, source_key
from .records import (UNKNOWN_CUT, Adoption, Source, SourcePlan, journal, named_for, plain, read_record, record_path,
                      record_plan, restore, same_source, set_aside, source_gone, stale_clips, upgraded, video_facts,
                      write_record)
from .settings import CLIP_SUFFIX, CLIPS_FOLDER, STATE_FOLDER, ClipsJob, clip_path, cut_settings
from .shots import detect_shots
from .summary import ClipsSummary, held_by

log = logging.getLogger(__name__)

# on_event(stage, done, total, name): stage "shots" (done, total: sources, fractional while a source is
# analysed), "cut" (clips), "caption" (clips). It may raise to stop between steps (Cancel).
Event = Callable[[str, float, float, str], None]


class _Stop(BaseException):
    """What on_event raised (Cancel: ComfyUI's interrupt is an Exception), carried untouched through
    the code that fails one source or one clip on an Exception, and raised as it was where the job
    returns (``_unwrapped``)."""

    def __init__(self, exc: BaseException):
        super().__init__(exc)
        self.exc = exc


def _guarded(on_event: Event | None) -> Event | None:
    if on_event is None or getattr(on_event, "guarded", False):
        return on_event

    def call(*args) -> None:
        try:
            on_event(*args)
        except _Stop:
            raise
        except BaseException as exc:
            raise _Stop(exc) from exc

    call.guarded = True
    return call


@contextmanager
def _unwrapped():
    try:
        yield
    except _Stop as stop:
        raise stop.exc from None


# --- sources ------------------------------------------------------------------------------------

def list_sources(job: ClipsJob) -> tuple[list[Source], list[tuple[str, str]], list[tuple[str, str]]]:
    """Every source video of the job, in a fixed order (the same in every process), (name, why)
    for what was given but cannot be a source, and (name, note) for each folder skipped as a
    dataset. A folder is listed as the caption command lists one (hidden names skipped; this job's
    clips and any other dataset this command made left out)."""
    sources, problems, notes, seen = [], [], [], set()
    datasets: dict[Path, bool] = {}
    for given in job.sources:
        if given.is_dir():
            try:  # this job's clips are left out (OUT may be the source folder itself: its videos are sources),
                listing = scan_folder(given, job.recursive, [job.clips_dir], job.root)  # and any dataset's
            except AdaTPInputError as exc:
                problems.append((str(given), str(exc)))
                continue
            found, skipped = [], set()
            for p in listing.clips:
                other = other_dataset(job, given, p, datasets)
                if other is None:
                    found.append(Source(p, given, f"{given.name}/{p.relative_to(given).as_posix()}"))
                elif other not in skipped:  # said once per dataset folder
                    skipped.add(other)
                    rel = other.relative_to(given).as_posix()
                    notes.append((given.name if rel == "." else f"{given.name}/{rel}",
                                  f"the clips of a dataset this command made (its {STATE_FOLDER}/ holds the "
                                  "records): not taken as sources; skipped"))
            problems += [(f"{given.name}/{rel}", why) for rel, why in listing.problems]
            problems += [(f"{given.name}/{rel}", why) for rel, why in listing.folders]
            if not found and not listing.problems and not skipped:
                problems.append((str(given), "holds no video files" + ("" if job.recursive else
                                                                       " (add --recursive for subfolders)")))
        elif given.is_file():
            found = [Source(given, None, str(given))]
        elif given.exists():  # a pipe, a device: reading it could block or never end
            problems.append((str(given), "is not a regular file (a pipe or a device); give a video file"))
            continue
        else:
            problems.append((str(given), "does not exist; check the path"))
            continue
        for source in found:
            real = os.path.realpath(source.path)
            if real not in seen:  # the same file given twice (or through a link) is one source
                seen.add(real)
                sources.append(source)
    return sources, problems, notes


def other_dataset(job: ClipsJob, given: Path, path: Path, cache: dict) -> Path | None:
    """The clips folder (D/videos) of a dataset this command made (D/.adatp/sources) that ``path``
    lies in, from ``given`` down, or None. Only its clips are left out: the rest of D (footage kept
    beside the set, as with --out equal to the source folder) stays a source."""
    folders = [given]
    for part in path.relative_to(given).parent.parts:
        folders.append(folders[-1] / part)
    for folder in folders:
        if folder not in cache:
            cache[folder] = folder.name == CLIPS_FOLDER and (folder.parent / STATE_FOLDER / "sources").is_dir()
        if cache[folder]:
            return folder
    return None


def source_keys(sources: list[Source]) -> tuple[list[Source], dict[Path, str], list[tuple[str, str]]]:
    """Each source's key (the stem of its clips' names, from its resolved path), and (name, why)
    for a source whose key another source has too (two paths whose short hashes meet)."""
    keys = [source_key(s.path) for s in sources]
    counts = Counter(keys)
    problems = [(s.name, f"its clip names ({key}) would be another source's too; rename it")
                for s, key in zip(sources, keys) if counts[key] > 1]
    kept = [(s, key) for s, key in zip(sources, keys) if counts[key] == 1]
    return [s for s, _ in kept], {s.path: key for s, key in kept}, problems


# --- plans, kept per source ---------------------------------------------------------------------

def _failure(exc: Exception) -> str:
    return str(exc) if isinstance(exc, AdaTPInputError) else f"{exc.__class__.__name__}: {exc}"


def plan_source(job: ClipsJob, source: Source, key: str,
                on_progress: Callable[[float, float], None] | None = None,
                adopt: Adoption | None = None) -> SourcePlan:
    """This source's shots and clips: from its record when the source and the settings are
    unchanged, else detected and planned. A source that cannot be read gives a plan with error.
    adopt: for a source with no record under its key, the record of the same footage moved or
    renamed, or of the same file under an older key (Adoption), taken as this source's."""
    plan = SourcePlan(source, key)
    try:
        record = read_record(job, key)
        if record is not None:  # taken from another key by a run killed before it renamed the record's clips
            record = named_for(job, key, record, move=adopt is None or not adopt.dry_run)
        plan.fingerprint = fingerprint(source.path)
        if record is None and adopt is not None:
            record, plan.adopted = adopt(key, plan.fingerprint, source.path) or (None, None)
        if record is not None and not ("cut" in record and "resolved" in record):
            record = upgraded(job, source.path, record)
        same_file = record is not None and same_source(record, source.path, plan.fingerprint)
        unknown = record is not None and record.get("cut") == UNKNOWN_CUT  # clips kept by upgraded(): any cut
        same_cut = record is not None and (record.get("cut") == cut_settings(job) or unknown)
        plan.video = record.get("video") if same_file else None
        plan.video = plan.video or video_facts(source.path)  # (a record from before: probed once)
        if same_file and record.get("threshold") == job.threshold:
            _, plan.shots, clips = record_plan(record)
            plan.reused = True
            if record.get("rules") == plain(job.rules) and same_cut:
                plan.clips = clips
                plan.made = dict(record.get("made") or {})
                plan.cut = UNKNOWN_CUT if unknown else None
                return plan
        else:
            plan.shots = detect_shots(source.path, **({} if job.threshold is None else {"threshold": job.threshold}),
                                      on_progress=on_progress)
        plan.clips = plan_clips(source.path, plan.shots, job.rules)
        if record is not None:  # the source, the rules or the cut changed: the clips made otherwise go
            plan.earlier = {k: record.get(k) for k in ("fingerprint", "cut", "made")}
            plan.replaced = stale_clips(record_plan(record)[2], plan.clips, same_file, same_cut)
            gone = {c.name for c in plan.replaced}
            plan.cut = UNKNOWN_CUT if unknown and len(gone) < len(record["clips"]) else None  # some are kept
            plan.made = {k: v for k, v in (record.get("made") or {}).items() if k not in gone}
    except (AdaTPInterrupted, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001  a bad source fails alone
        if not isinstance(exc, AdaTPInputError):
            log.debug("source %s failed", source.name, exc_info=True)
        plan.error = _failure(exc)
    return plan


def unwritable(exc: OSError, job: ClipsJob) -> str:
    """Why a source's record, journal or set-aside clips could not be written, with what to do."""
    return (f"cannot write {printable(str(exc.filename or job.state_dir))} ({exc.strerror or exc}); make it a "
            "writable file or folder (or move it away) and run again")


def source_notes(path: Path) -> list[str]:
    """What re-encoding does to this source that the user should know."""
    hdr = hdr_transfer(path)
    # PyAV's FFmpeg has tonemap and colorspace but no zscale (the PQ/HLG to linear step): no tone mapping yet
    return [f"HDR ({hdr}) source: converted to 8-bit SDR without tone mapping; colours will look flat"] if hdr else []


def plan_sources(job: ClipsJob, shard: tuple[int, int] = (0, 1), on_event: Event | None = None,
                 dry_run: bool = False) -> JobPlan:
    """This process's share of the sources, each planned (nothing written when dry_run)."""
    result = JobPlan([], [], job=job)
    with _unwrapped():
        try:
            return _plan_sources(job, shard, _guarded(on_event), dry_run, result)
        except BaseException:
            result.release()  # stopped halfway: the sources claimed so far are free for the next run
            raise


def _plan_sources(job: ClipsJob, shard: tuple[int, int], on_event: Event | None, dry_run: bool,
                  result: JobPlan) -> JobPlan:
    index, count = shard
    sources, problems, notes = list_sources(job)
    result.notes = notes if index == 0 else []  # said once, by the first process
    for name, note in result.notes:
        log.warning("%s: %s", printable(name), note)
    sources, keys, clashes = source_keys(sources)
    problems += clashes
    mine = sources[index::count]
    problems = problems[index::count]
    result.problems = problems
    plans = result.sources
    adopt = Adoption(job, dry_run, keys.values())
    for i, source in enumerate(mine):
        def progress(done, total, i=i, name=source.name):
            if on_event is not None:
                on_event("shots", i + (min(done / total, 0.999) if total else 0.0), len(mine), name)

        if not dry_run:  # two runs on one output folder: each source is planned and cut by one of them
            claim = ClipClaim(record_path(job, keys[source.path]))
            try:
                claim.path.parent.mkdir(parents=True, exist_ok=True)
                got = claim.acquire()
            except OSError as exc:
                raise OptionError("out", f"cannot write in {printable(str(claim.path.parent))} ({exc.strerror}); "
                                         "make the output folder writable") from exc
            if not got:
                result.elsewhere.append(source.name)
                result.held.append(held_by(source.name, claim))
                continue
            result.claims.append(claim)
        plan = plan_source(job, source, keys[source.path], progress, adopt)
        if plan.error is None and job.cut == "reencode":
            plan.notes += source_notes(source.path)
            for note in plan.notes:
                log.warning("%s: %s", printable(source.name), note)
        if plan.error is None and not dry_run:
            try:  # the old clips go first: a kill between the two steps leaves the old record, compared again
                plan.moved = set_aside(job, plan.replaced, plan.key, plan.earlier)
                write_record(job, plan)  # before the restore: the clips moved back are the record's already
                plan.restored = restore(job, plan)
                if plan.restored:
                    write_record(job, plan)  # with what they hold (journaled meanwhile)
            except OSError as exc:  # a file or folder of its own in the way: this source fails alone
                if exc.errno in STOPPING_ERRNOS:  # a full disk: every later write fails too
                    raise
                plan.error, plan.clips = unwritable(exc, job), []
        plans.append(plan)
        if on_event is not None:
            on_event("shots", i + 1, len(mine), source.name)
    return result


@dataclass
class JobPlan:
    """This process's sources, planned, and (name, why) for what could not be a source.
    claims: a lock per source this run plans and cuts (none in a dry run), held until its clips
    are cut and captioned (run_clips releases them; ``release`` when that is someone else's business)."""

    sources: list
    problems: list
    claims: list = field(default_factory=list)
    elsewhere: list = field(default_factory=list)  # sources another run is planning or cutting now
    held: list = field(default_factory=list)  # of those, held_by: which process holds each, and its claim file
    job: ClipsJob | None = None  # what was planned (the text counts the earlier clips found in its folder)
    notes: list = field(default_factory=list)  # (folder, note): folders skipped as datasets

    def release(self) -> None:
        for claim in self.claims:
            claim.release()
        self.claims = []

    @property
    def clips(self) -> list[ClipPlan]:
        return [c for p in self.sources for c in p.clips]

    def to_dict(self) -> dict:
        return {"sources": [{"source": p.source.name, "path": str(p.source.path), "key": p.key,
                             "error": p.error, "duration": round(p.duration, 3), "notes": list(p.notes),
                             "shots": [plain(s) for s in p.shots],
                             "clips": [{**plain(c), "end": round(c.end, 6), "seconds": round(c.frames / c.fps, 6)}
                                       for c in p.clips]}
                            for p in self.sources],
                "problems": [list(x) for x in self.problems], "notes": [list(x) for x in self.notes]}

    def text(self) -> str:
        """The plan for people: per source its shots and the clips each gives."""
        lines = []
        for p in self.sources:
            if p.error is not None:
                lines.append(f"{printable(p.source.name)}: failed: {printable(p.error)}")
                continue
            aside = [c for c in p.replaced if os.path.lexists(clip_path(self.job, c))] if self.job else p.replaced
            lines.append(f"{printable(p.source.name)}: {p.duration:.2f} s, {len(p.shots)} shot(s), "
                         f"{len(p.clips)} clip(s)" + (f"; {len(aside)} clip(s) of an earlier plan would be "
                                                      "set aside" if aside else ""))
            lines += [f"  {note}" for note in p.notes]
            if p.adopted is not None:
                lines.append(f"  moved or renamed from {printable(p.adopted)} (the same content): its clips are kept")
            by_shot: dict[int, list[ClipPlan]] = {}
            for c in p.clips:
                by_shot.setdefault(c.shot, []).append(c)
            for s in p.shots:
                clips = by_shot.get(s.index, [])
                lines.append(f"  shot {s.index}: {s.start:.2f}-{s.end:.2f} s ({s.end - s.start:.2f} s, "
                             f"{s.transition}): {len(clips) or 'no'} clip(s)")
                for c in clips:
                    lines.append(f"    {printable(c.name)}{CLIP_SUFFIX}: {c.start:.2f}-{c.end:.2f} s, "
                                 f"{c.frames} frames at {c.fps:g} fps, {c.width}x{c.height}")
        for name, why in self.problems:
            lines.append(f"{printable(name)}: skipped: {printable(why)}")
        lines += [f"{printable(name)}: {note}" for name, note in self.notes]
        clips = self.clips
        seconds = sum(c.frames / c.fps for c in clips)
        lines.append(f"{len(self.sources)} source(s), {sum(len(p.shots) for p in self.sources)} shot(s), "
                     f"{len(clips)} clip(s), {seconds:.1f} s of clips, {sum(c.frames for c in clips)} frames.")
        return "\n".join(lines)


# --- cutting ------------------------------------------------------------------------------------

def cut_sources(job: ClipsJob, plan: JobPlan, summary: ClipsSummary, on_event: Event | None = None) -> None:
    """Cut every planned clip that is not in the clips folder yet, source by source (each
    source decoded once for all its clips)."""
    job.clips_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(job.clips_dir)  # a killed run's, even when nothing is left to cut
    todo = {id(p): [c for c in p.clips if not clip_path(job, c).exists()] for p in plan.sources}
    total = sum(len(v) for v in todo.values())
    done = 0
    if on_event is not None and total:
        on_event("cut", 0, total, "")
    for p in plan.sources:
        summary.clips_existing += len(p.clips) - len(todo[id(p)])

        def on_clip(result):
            nonlocal done
            done += 1
            if result.error is not None:
                summary.clips_failed.append((f"{result.plan.name}{CLIP_SUFFIX}", result.error))
            elif result.skipped:
                summary.clips_existing += 1
            else:
                summary.clips_cut += 1
                p.made[result.plan.name] = result.made
                journal(job, p.key, result.plan.name, result.made)  # a kill loses none of it
            if on_event is not None:
                on_event("cut", done, total, result.plan.name)

        if not todo[id(p)]:
            continue
        try:
            cut_clips(p.source.path, todo[id(p)], job.clips_dir, mode=job.cut, keep_audio=job.keep_audio,
                      crf=job.crf, on_clip=on_clip)
        except (AdaTPInterrupted, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001  the source failing while it is cut: its other clips stay
            summary.failed_sources.append((p.source.name, f"cutting stopped: {_failure(exc)}"))
        finally:  # what the clips cut so far hold (copy mode: not the plan's), for the layouts
            try:
                write_record(job, p)
            except OSError as exc:
                if exc.errno in STOPPING_ERRNOS:
                    raise
                summary.failed_sources.append((p.source.name, unwritable(exc, job)))


# --- captions -----------------------------------------------------------------------------------

def adopt_captions(job: ClipsJob, names: list[str]) -> int:
    """A clip captioned by an earlier run with other layouts has its caption in the other place
    (beside the clip, or in the state folder): copy it, so the clip is not captioned again."""
    other = job.state_dir / "captions" if "txt" in job.layouts else job.clips_dir
    copied = 0
    for name in names:
        target = job.caption_dir / f"{name}.txt"
        if os.path.lexists(target) or not os.path.lexists(other / f"{name}.txt"):
            continue
        kind, text = existing_caption(other / f"{name}.txt", job.out)
        if kind == "text":
            write_atomic(target, text)
            copied += 1
    return copied


def only(plan: FolderPlan, folder: Path, wanted: set[str]) -> FolderPlan:
    """The caption plan of ``folder`` cut down to the clips named in ``wanted`` (relative paths):
    this job's clips, not whatever else the folder holds."""
    def rel(clip) -> str:
        return Path(clip).relative_to(folder).as_posix()

    s = plan.summary
    summary = dataclasses.replace(
        s, found=0, skipped=[r for r in s.skipped if r in wanted], failed=[f for f in s.failed if f[0] in wanted],
        captions={r: t for r, t in s.captions.items() if r in wanted},
        unread=[u for u in s.unread if u[0] in wanted], done=[], others=[])
    clips = [c for c in plan.clips if rel(c) in wanted]
    summary.found = len(clips) + len([f for f in summary.failed if f[0] not in {rel(c) for c in clips}])
    todo = [c for c in plan.todo if rel(c) in wanted]
    targets = {k: v for k, v in plan.targets.items() if v[0] in wanted}
    records = [r for r in plan.records if r.get("path") in wanted]
    return FolderPlan(clips, todo, targets, summary, records)


def caption_plan(job: ClipsJob, plan: JobPlan) -> FolderPlan:
    """The caption run's plan for this job's clips that exist (cut now or earlier)."""
    names = [c.name for c in plan.clips if clip_path(job, c).exists()]
    adopt_captions(job, names)
    cjob = job.caption_job()
    return only(plan_folder(cjob), cjob.folder, {f"{n}{CLIP_SUFFIX}" for n in names})


def uncaptioned(job: ClipsJob, plan: JobPlan) -> list[str]:
    """This job's clips on disk with no caption (a caption that failed): their paths under out."""
    return [clip_path(job, c).relative_to(job.out).as_posix() for c in plan.clips if clip_path(job, c).exists()
            and existing_caption(job.caption_dir / f"{c.name}.txt", job.out)[0] in ("missing", "folder")]


# --- the dataset: every source planned into this output folder ---------------------------------

def dataset(job: ClipsJob, gone: list | None = None) -> list[DatasetSource]:
    """Every source with a record in the output folder (this run's and earlier runs'), with its
    clips that are on disk and their captions: what the layouts list. gone: a list to which
    (source, key, clips on disk) is added for each record whose source is no longer there."""
    entries = []
    for record_file in sorted((job.state_dir / "sources").glob("*.json")):
        try:
            record = read_record(job, record_file.stem)
        except AdaTPInputError as exc:
            log.warning("the layouts leave out a source: %s", exc)
            continue
        if record is None:
            continue
        record = named_for(job, record_file.stem, record, move=False)  # (named_for: a kill left it so)
        source, shots, plans = record_plan(record)
        clips = []
        for c in plans:
            path = clip_path(job, c)
            if not path.is_file():
                continue
            kind, text = existing_caption(job.caption_dir / f"{c.name}.txt", job.out)
            made = (record.get("made") or {}).get(c.name)
            clips.append(DatasetClip(c, path, text if kind == "text" else None,
                                     made if isinstance(made, dict) else None))
        entries.append(DatasetSource(record.get("name", source), source, record_file.stem, shots, clips))
        if gone is not None and source_gone(record, record_file.stem):
            gone.append((source, record_file.stem, len(clips)))
    return entries


def write_layouts(job: ClipsJob, summary: ClipsSummary) -> None:
    """The layouts from the whole dataset; what was written (or why not) goes into ``summary``."""
    try:
        summary.gone = []
        summary.outputs = [str(p) for p in write_outputs(job.out, dataset(job, summary.gone), job.layouts)]
    except OSError as exc:
        summary.output_error = f"{printable(str(exc.filename or job.out))} ({exc.strerror or exc})"


# --- the whole job ------------------------------------------------------------------------------

def run_clips(model, job: ClipsJob, shard: tuple[int, int] = (0, 1), on_event: Event | None = None,
              on_step: Callable[[], None] | None = None, layouts: bool = True,
              plan: JobPlan | None = None) -> ClipsSummary:
    """Plan, cut and caption this process's share of ``job``, then (layouts) write the layouts.

    model: a loaded Video LLM, or a function that loads one: it is called only when some clip
    needs a caption, so a rerun with nothing left to do loads no model. on_event: see Event.
    on_step(): between decode steps (Cancel). layouts False: another process writes them once
    every process has finished (write_layouts). plan: from plan_sources, when already made.
    """
    with _unwrapped():
        return _run_clips(model, job, shard, _guarded(on_event), on_step, layouts, plan)


def _run_clips(model, job: ClipsJob, shard: tuple[int, int], on_event: Event | None,
               on_step: Callable[[], None] | None, layouts: bool, plan: JobPlan | None) -> ClipsSummary:
    start = time.perf_counter()
    summary = ClipsSummary()
    if plan is None:
        plan = plan_sources(job, shard, on_event)
    summary.sources = len(plan.sources) + len(plan.problems) + len(plan.elsewhere)
    summary.failed_sources = [(p.source.name, p.error) for p in plan.sources if p.error is not None]
    summary.failed_sources += list(plan.problems)
    for p in plan.sources:
        summary.shots += len(p.shots)
        summary.clips_planned += len(p.clips)
        summary.shots_without_clip += len({s.index for s in p.shots} - {c.shot for c in p.clips})
        summary.source_seconds += p.duration
        summary.detected += bool(p.shots) and not p.reused
        summary.clips_replaced += p.moved
        summary.clips_restored += p.restored
        summary.notes += [(p.source.name, note) for note in p.notes]
        if p.adopted is not None:
            summary.adopted.append((p.source.name, p.adopted))
    summary.notes += plan.notes
    summary.elsewhere = list(plan.elsewhere)
    summary.held = list(plan.held)
    try:
        cut_sources(job, plan, summary, on_event)
        folder_plan = caption_plan(job, plan)
        if folder_plan.todo:
            if not hasattr(model, "adapter") and callable(model):
                model = model()
            done = [0]
            if on_event is not None:
                on_event("caption", 0, len(folder_plan.todo), "")

            def on_clip(rel, _result, _summary):
                done[0] += 1
                if on_event is not None:
                    on_event("caption", done[0], len(folder_plan.todo), rel)

            captions = caption_folder(model, job.caption_job(), plan=folder_plan, on_clip=on_clip, on_step=on_step)
        else:
            captions = folder_plan.summary
        summary.caption = captions.to_dict()
        summary.uncaptioned = uncaptioned(job, plan)
        summary.in_videos = "txt" in job.layouts
    finally:  # held until the clips are captioned: another run's new rules would set them aside meanwhile
        plan.release()
    try:
        if layouts:
            write_layouts(job, summary)
    finally:
        summary.seconds = time.perf_counter() - start
    return summary
