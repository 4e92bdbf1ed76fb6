"""From long footage to a training set: sources -> shots -> clips -> captions -> outputs.

``ClipsJob`` says what to do (sources, the output folder, the clip rules, the cut,
the caption settings and the layouts); ``run_clips`` does it for this process's
share of the sources and returns a ``ClipsSummary``. The steps:

1. **plan** (``plan_sources``): each source's shots (``detect_shots``) and clips
   (``plan_clips``). The plan is kept per source in ``OUT/.adatp/sources/KEY.json``
   with the source's size and time and the rules, so a rerun on an unchanged source
   with the same rules detects nothing again. ``--dry-run`` stops here and writes
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
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..caption import (DEFAULT_PROMPT, CaptionJob, CaptionSummary, ClipClaim, FolderPlan, OptionError, grouped,
                       caption_folder, existing_caption, plan_folder, scan_folder, write_atomic)
from ..caption.files import printable
from ..errors import AdaTPInputError, AdaTPInterrupted
from ..paths import inside, resolved
from ..pipeline import PipelineConfig
from .cut import CUT_MODES, check_cut, cut_clips, probe_clip, remove_stale_temps
from .outputs import LAYOUT_FILES, SUBTITLES_FOLDER, DatasetClip, DatasetSource, write_outputs
from .plan import FRAME_RULES, ClipPlan, ClipRules, fingerprint, hdr_transfer, plan_clips, source_key
from .shots import Shot, check_threshold, detect_shots

log = logging.getLogger(__name__)

CLIPS_FOLDER = "videos"  # OUT/videos: the clips (finetrainers' videos.txt lists them as videos/NAME.mp4)
STATE_FOLDER = ".adatp"  # OUT/.adatp: per-source plans, and the captions when no .txt layout is asked for
CLIP_SUFFIX = ".mp4"
RECORD_VERSION = 1
LAYOUTS = ("txt", "finetrainers", "jsonl", "srt", "vtt")
EXIT_BUSY = 3  # the exit status when every source was held by another run (nothing done)
DEFAULT_LAYOUTS = ("txt", "jsonl", "srt", "vtt")

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


@dataclass(frozen=True)
class ClipsJob:
    """A clips job. sources: files or folders (folders listed like the caption command's,
    with ``recursive``). out: the dataset folder. threshold: None for detect_shots' default.
    The caption fields are CaptionJob's. root: every source found in a folder must resolve
    inside it, and out_root every clip and caption (the node); None: any path (the CLI)."""

    sources: tuple
    out: Path
    rules: ClipRules = field(default_factory=ClipRules)
    threshold: float | None = None
    cut: str = "reencode"
    keep_audio: bool = False
    crf: int = 18
    layouts: tuple = DEFAULT_LAYOUTS
    recursive: bool = False
    prompt: str = DEFAULT_PROMPT
    prefix: str = ""
    suffix: str = ""
    overwrite: bool = False
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    workers: int = 2
    processes: bool = True
    batch_size: int = 1
    root: Path | None = None
    out_root: Path | None = None  # the clips and captions must resolve inside it (the node); None: any

    def __post_init__(self):
        if not str(self.out).strip():  # Path("") is "."; the dataset would land in the current folder
            raise OptionError("out", "the output folder is empty text; give a folder for the dataset")
        if any(not str(s).strip() for s in self.sources):
            raise OptionError("sources", "a source is empty text (which would be the current folder); give the "
                                         "videos or folders of videos")
        object.__setattr__(self, "sources", tuple(Path(s).expanduser() for s in self.sources))
        object.__setattr__(self, "out", Path(self.out).expanduser())
        if not self.sources:
            raise OptionError("sources", "no sources: give one or more videos or folders of videos")
        layouts = tuple(dict.fromkeys(self.layouts))
        unknown = [x for x in layouts if x not in LAYOUTS]
        if unknown or not layouts:
            raise OptionError("layout", f"layouts must be some of {', '.join(LAYOUTS)}, got {list(self.layouts)!r}")
        object.__setattr__(self, "layouts", layouts)
        check_cut(self.cut, self.crf)
        if self.threshold is not None:
            check_threshold(self.threshold)
        for parent in (self.out, *self.out.parents):
            if parent.exists() or parent.is_symlink():
                if not parent.is_dir():
                    raise OptionError("out", f"{printable(str(parent))} is a file, not a folder; give a folder "
                                             "for the clips.")
                break
        if self.out_root is not None:  # the node: nothing under the output folder may lead out of its root
            for folder in (self.out, self.clips_dir, self.state_dir, self.caption_dir):
                if not inside(resolved(self.out_root), resolved(folder)):
                    raise OptionError("out", f"{printable(str(folder))} leads outside {printable(str(self.out_root))} "
                                             "(a link); remove the link or choose another output folder.")
        self.check_obstacles()

    def check_obstacles(self) -> None:
        """OptionError("out") naming what in the output folder is in the way: a file where the job
        keeps a folder, or a folder where a layout writes its file."""
        folders = {self.clips_dir: "the clips", self.state_dir: "its records", self.out / SUBTITLES_FOLDER:
                   "the subtitles", self.state_dir / "sources": "each source's record",
                   self.state_dir / "replaced": "the clips it sets aside", self.caption_dir: "the captions"}
        for folder, what in folders.items():
            if os.path.lexists(folder) and not folder.is_dir():
                raise OptionError("out", f"{printable(str(folder))} is a file, where the job keeps {what} in a "
                                         "folder; move or remove it, or choose another output folder.")
        files = [n for layout, names in LAYOUT_FILES.items() if layout in self.layouts for n in names]
        for name in files:
            if (self.out / name).is_dir():
                raise OptionError("out", f"{printable(str(self.out / name))} is a folder, where the layouts write a "
                                         "file; move or remove it, or choose another output folder.")

    @property
    def clips_dir(self) -> Path:
        return self.out / CLIPS_FOLDER

    @property
    def state_dir(self) -> Path:
        return self.out / STATE_FOLDER

    @property
    def caption_dir(self) -> Path:
        """Where each clip's caption (NAME.txt) is kept: beside the clip with the txt layout,
        else in the state folder (the other layouts are written from it)."""
        return self.clips_dir if "txt" in self.layouts else self.state_dir / "captions"

    def caption_job(self) -> CaptionJob:
        """The caption run over the clips folder, with this job's caption settings."""
        self.clips_dir.mkdir(parents=True, exist_ok=True)
        return CaptionJob(folder=self.clips_dir, out=None if "txt" in self.layouts else self.caption_dir,
                          prompt=self.prompt, prefix=self.prefix, suffix=self.suffix, overwrite=self.overwrite,
                          pipeline=self.pipeline, workers=self.workers, processes=self.processes,
                          root=self.out_root, batch_size=self.batch_size)


def parse_layouts(text: str) -> tuple:
    """'txt,jsonl' -> ("txt", "jsonl"); 'all' -> every layout. OptionError("layout") for others."""
    names = tuple(v.strip().lower() for v in str(text).split(",") if v.strip())
    if names == ("all",):
        return LAYOUTS
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown or not names:
        raise OptionError("layout", f"{text!r}: give some of {', '.join(LAYOUTS)} separated by commas, or 'all'")
    return names


# --- sources ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One source video. root: the folder it was found in (None: given as a file);
    name: how it is shown (the folder's name and the path below it, or the path given)."""

    path: Path
    root: Path | None
    name: str


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

@dataclass
class SourcePlan:
    """One source's shots and clips (or why it has none). reused: the shots came from an
    earlier run's record (nothing was detected this time)."""

    source: Source
    key: str
    shots: list = field(default_factory=list)
    clips: list = field(default_factory=list)
    error: str | None = None
    reused: bool = False
    replaced: list = field(default_factory=list)  # an earlier plan's clips that this plan no longer has
    moved: int = 0  # of those, the clips found in videos/ and set aside (set_aside)
    made: dict = field(default_factory=dict)  # clip name -> what its file holds (cut.MADE_FIELDS), once cut
    fingerprint: str | None = None  # plan.fingerprint of the source: what decides it is the same footage
    adopted: str | None = None  # the source of the record this one took (the footage moved or was renamed)
    earlier: dict | None = None  # the earlier record's fingerprint, cut and made, when its plan changed
    restored: int = 0  # clips set aside earlier and moved back (restore)
    notes: list = field(default_factory=list)  # what the user should know of this source's clips (HDR)

    @property
    def duration(self) -> float:
        return self.shots[-1].end if self.shots else 0.0


def record_path(job: ClipsJob, key: str) -> Path:
    return job.state_dir / "sources" / f"{key}.json"


def journal_path(job: ClipsJob, key: str) -> Path:
    """KEY.made.jsonl beside the record: what each clip cut since the record was last written holds,
    a line a clip, appended as each is made; folded into the record when it is read, and removed once
    the record holding it is written."""
    return job.state_dir / "sources" / f"{key}.made.jsonl"


def append_line(path: Path, entry: dict) -> None:
    """Append ``entry`` to the JSON lines file ``path``: one write of one whole line, on disk (fsync)
    before the caller goes on; a line cut short by a kill is skipped when read (read_lines)."""
    line = json.dumps(entry, ensure_ascii=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        os.write(fd, line.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_lines(path: Path, field: str) -> dict:
    """entry[field] -> entry for each whole line of the JSON lines file ``path`` (the last line for a
    value wins); {} when there is none."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # cut short by a kill
        if isinstance(entry, dict) and isinstance(entry.get(field), str):
            found[entry[field]] = entry
    return found


def journal(job: ClipsJob, key: str, name: str, made: dict) -> None:
    """Append what the clip ``name`` holds to its source's journal, as it is made."""
    append_line(journal_path(job, key), {"clip": name, "made": made})


def read_journal(job: ClipsJob, key: str) -> dict:
    """clip name -> what it holds, from the source's journal (the last line for a name wins)."""
    return {name: e["made"] for name, e in read_lines(journal_path(job, key), "clip").items()
            if isinstance(e.get("made"), dict)}


def aside_path(job: ClipsJob, key: str) -> Path:
    """KEY.aside.jsonl beside the record: a line for each of the source's clips set aside (its file
    in OUT/.adatp/replaced, its plan, the cut settings, the source's fingerprint and what it holds),
    so a clip asked for again as it was is restored rather than cut again."""
    return job.state_dir / "sources" / f"{key}.aside.jsonl"


def _identity(path: Path) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def same_source(record: dict, path: Path, print_: str) -> bool:
    """Whether ``record`` was made from the footage at ``path`` (``print_``: its fingerprint): by the
    fingerprint, so a touched source (only its time changed) keeps its clips and one replaced by a
    same-size copy keeping its time (``cp -p``) does not. A record from before fingerprints: its
    file's resolved path, size and time, as that version decided."""
    if record.get("fingerprint"):
        return record["fingerprint"] == print_
    return record.get("resolved") == os.path.realpath(path) and \
        {k: record.get(k) for k in ("size", "mtime_ns")} == _identity(path)


def _plain(obj) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(obj).items()}


def read_record(job: ClipsJob, key: str) -> dict | None:
    """An earlier run's record of this source, or None (none yet, or another version's). A record that
    cannot be read or does not hold a plan (cut short, edited by hand) raises AdaTPInputError: taken
    for none, its source would be cut again beside its old clips, or its clips left out of the set."""
    path = record_path(job, key)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise damaged_record(path, exc) from exc
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        return None
    try:
        record_plan(record)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise damaged_record(path, exc) from exc
    folded = read_journal(job, key)  # the clips made after the record was last written
    if folded:
        record["made"] = {**(record.get("made") or {}), **folded}
    return record


def damaged_record(path: Path, exc: Exception) -> AdaTPInputError:
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{exc.__class__.__name__}: {exc}"
    return AdaTPInputError(f"the record {printable(str(path))} is damaged ({printable(why)}), so which clips in "
                           "videos/ are this source's is not known; move that file away and run again: the source "
                           "is found and cut anew (its old clips, if any are left in videos/, are yours to remove)")


def record_plan(record: dict) -> tuple[str, list[Shot], list[ClipPlan]]:
    """(source path, shots, clips) of a record."""
    shots = [Shot(**s) for s in record["shots"]]
    clips = [ClipPlan(**{**c, "source": Path(c["source"])}) for c in record["clips"]]
    if not isinstance(record["source"], str) or any(
            not (isinstance(c.frames, int) and c.frames >= 1 and c.fps > 0 and c.width > 0 and c.height > 0)
            for c in clips):
        raise ValueError("a clip without frames, rate or size")
    return record["source"], shots, clips


def cut_settings(job: ClipsJob) -> dict:
    """What the cut settings make of a clip's file (crf only matters when re-encoding)."""
    return {"mode": job.cut, "crf": job.crf if job.cut == "reencode" else None, "keep_audio": job.keep_audio}


PLAN_FIELDS = ("start", "frames", "fps", "width", "height")  # what a clip's file holds, beside its name


def stale_clips(earlier: list[ClipPlan], now: list[ClipPlan], same_source: bool, same_cut: bool) -> list[ClipPlan]:
    """The earlier plan's clips whose files the current plan cannot keep: a name it no longer has,
    or one it plans otherwise (other frames, rate or size under the same name), or every one when
    the source or the cut settings changed."""
    if not (same_source and same_cut):
        return list(earlier)
    planned = {c.name: plan_fields(c) for c in now}
    return [c for c in earlier if planned.get(c.name) != plan_fields(c)]


def write_record(job: ClipsJob, plan: SourcePlan) -> None:
    record = {"version": RECORD_VERSION, "source": str(plan.source.path), "name": plan.source.name,
              "resolved": os.path.realpath(plan.source.path),  # the file, however it was given (its key's path)
              **_identity(plan.source.path), "fingerprint": plan.fingerprint, "threshold": job.threshold, "rules": _plain(job.rules),
              "cut": cut_settings(job),
              "shots": [_plain(s) for s in plan.shots], "clips": [_plain(c) for c in plan.clips],
              "made": {c.name: plan.made[c.name] for c in plan.clips if c.name in plan.made}}
    # ASCII: a path's undecodable bytes (surrogate escapes) are kept as \\udcXX escapes that read back exactly
    text = json.dumps(record, indent=1, ensure_ascii=True) + "\n"
    path = record_path(job, plan.key)
    try:
        same = path.read_text(encoding="utf-8") == text
    except OSError:
        same = False
    if not same:
        write_atomic(path, text)
    journal_path(job, plan.key).unlink(missing_ok=True)  # the record holds it now


def _failure(exc: Exception) -> str:
    return str(exc) if isinstance(exc, AdaTPInputError) else f"{exc.__class__.__name__}: {exc}"


def upgraded(job: ClipsJob, path: Path, record: dict) -> dict:
    """A record written before records held the cut settings and the resolved path, taken as this
    version's when its source's size and time are unchanged and every clip it names that is on disk
    holds what its plan says (frames, rate and size, no audio unless asked for; read from the
    containers, nothing decoded): the clips are kept and the record is rewritten in this format.
    Otherwise the record as it was, whose clips are then set aside and cut again."""
    if {k: record.get(k) for k in ("size", "mtime_ns")} != _identity(path):
        return record
    for c in record_plan(record)[2]:
        if not clip_path(job, c).is_file():
            continue
        held = probe_clip(clip_path(job, c))
        if held is None or (held["frames"], held["width"], held["height"]) != (c.frames, c.width, c.height) \
                or abs(held["fps"] - c.fps) > 1e-3 or (held["audio"] and not job.keep_audio):
            return record
    log.info("%s: a record from an earlier version, whose clips match its plan: kept and rewritten", path)
    return {**record, "resolved": os.path.realpath(path), "cut": record.get("cut", cut_settings(job))}


def plan_source(job: ClipsJob, source: Source, key: str,
                on_progress: Callable[[float, float], None] | None = None,
                adopt: Callable[[str, str], tuple[dict, str] | None] | None = None) -> SourcePlan:
    """This source's shots and clips: from its record when the source and the settings are
    unchanged, else detected and planned. A source that cannot be read gives a plan with error.
    adopt(key, fingerprint): for a source with no record, the record of the same footage whose
    source is gone (moved or renamed: Adoption), taken as this source's, and its old source."""
    plan = SourcePlan(source, key)
    try:
        record = read_record(job, key)
        if record is not None and not ("cut" in record and "resolved" in record):
            record = upgraded(job, source.path, record)
        plan.fingerprint = fingerprint(source.path)
        if record is None and adopt is not None:
            record, plan.adopted = adopt(key, plan.fingerprint) or (None, None)
        same_file = record is not None and same_source(record, source.path, plan.fingerprint)
        same_cut = record is not None and record.get("cut") == cut_settings(job)
        if same_file and record.get("threshold") == job.threshold:
            _, plan.shots, clips = record_plan(record)
            plan.reused = True
            if record.get("rules") == _plain(job.rules) and same_cut:
                plan.clips = clips
                plan.made = dict(record.get("made") or {})
                return plan
        else:
            plan.shots = detect_shots(source.path, **({} if job.threshold is None else {"threshold": job.threshold}),
                                      on_progress=on_progress)
        plan.clips = plan_clips(source.path, plan.shots, job.rules)
        if record is not None:  # the source, the rules or the cut changed: the clips made otherwise go
            plan.earlier = {k: record.get(k) for k in ("fingerprint", "cut", "made")}
            plan.replaced = stale_clips(record_plan(record)[2], plan.clips, same_file, same_cut)
            gone = {c.name for c in plan.replaced}
            plan.made = {k: v for k, v in (record.get("made") or {}).items() if k not in gone}
    except (AdaTPInterrupted, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001  a bad source fails alone
        if not isinstance(exc, AdaTPInputError):
            log.debug("source %s failed", source.name, exc_info=True)
        plan.error = _failure(exc)
    return plan


def source_gone(record: dict) -> bool:
    """Nothing is at the record's source (the file it was made from was moved, renamed or removed)."""
    return not os.path.lexists(record.get("resolved") or record["source"])


class Adoption:
    """The records whose source is gone, by fingerprint, for a source with no record: the same footage
    moved or renamed (a renamed folder gives its files new keys) takes its old record, clips and
    captions with it, rather than being cut again beside them. Read once a run, when first needed."""

    def __init__(self, job: ClipsJob, dry_run: bool):
        self.job, self.dry_run, self.orphans = job, dry_run, None

    def _orphans(self) -> dict[str, list[str]]:
        if self.orphans is None:
            self.orphans = {}
            for path in sorted((self.job.state_dir / "sources").glob("*.json")):
                try:
                    record = read_record(self.job, path.stem)
                except AdaTPInputError:
                    continue
                if record is not None and record.get("fingerprint") and source_gone(record):
                    self.orphans.setdefault(record["fingerprint"], []).append(path.stem)
        return self.orphans

    def __call__(self, key: str, print_: str) -> tuple[dict, str] | None:
        keys = self._orphans().get(print_, [])
        for old in list(keys):
            if self.dry_run:
                record = read_record(self.job, old)
                keys.remove(old)
                return (record, record["source"]) if record is not None else None
            claim = ClipClaim(record_path(self.job, old))  # another run may be adopting it too
            if not claim.acquire():
                continue
            try:
                record = read_record(self.job, old)
                if record is None or record.get("fingerprint") != print_ or not source_gone(record):
                    continue
                # one rename: at every moment the record is under one key or the other, never both
                os.replace(record_path(self.job, old), record_path(self.job, key))
                for side in (journal_path, aside_path):  # its journals go with it
                    if side(self.job, old).exists():
                        os.replace(side(self.job, old), side(self.job, key))
                for kind in ("srt", "vtt"):  # written again under the new key
                    stale = self.job.out / SUBTITLES_FOLDER / f"{old}.{kind}"
                    if stale.is_file() and not stale.is_symlink():
                        stale.unlink()
            finally:
                claim.release()
            keys.remove(old)
            return record, record["source"]
        return None


def source_notes(path: Path) -> list[str]:
    """What re-encoding does to this source that the user should know."""
    hdr = hdr_transfer(path)
    # PyAV's FFmpeg has tonemap and colorspace but no zscale (the PQ/HLG to linear step): no tone mapping yet
    return [f"HDR ({hdr}) source: converted to 8-bit SDR without tone mapping; colours will look flat"] if hdr else []


def set_aside(job: ClipsJob, clips: list[ClipPlan], key: str | None = None, earlier: dict | None = None) -> int:
    """Move an earlier plan's clips (and their captions) out of the set, into OUT/.adatp/replaced:
    a trainer reading OUT/videos sees only the current plan's clips, and nothing is deleted: a name
    already set aside (the same clip replaced twice) gets a number, NAME.2.mp4 with NAME.2.txt.
    key, earlier: the source's key and its earlier record's fingerprint, cut settings and made, noted
    for each clip in aside_path (``restore``)."""
    moved = 0
    aside = job.state_dir / "replaced"
    for c in clips:
        # the caption in both places (beside the clip, and the state folder's of a run with other
        # layouts): one left behind would be adopted for the clip cut again under this name
        found = [(p, aside / sub) for p, sub in ((clip_path(job, c), ""), (job.clips_dir / f"{c.name}.txt", ""),
                                                 (job.state_dir / "captions" / f"{c.name}.txt", "captions"))
                 if os.path.lexists(p)]
        if not found:
            continue
        n = 1
        while any(os.path.lexists(where / free_name(p.name, n)) for p, where in found):
            n += 1
        if key is not None and earlier is not None and os.path.lexists(clip_path(job, c)):
            aside.mkdir(parents=True, exist_ok=True)  # noted first: a kill before the move leaves a note of nothing
            append_line(aside_path(job, key), {
                "file": free_name(clip_path(job, c).name, n), "clip": c.name, "plan": plan_fields(c),
                "cut": earlier.get("cut"), "fingerprint": earlier.get("fingerprint"),
                "made": (earlier.get("made") or {}).get(c.name)})
        for path, where in found:
            where.mkdir(parents=True, exist_ok=True)
            os.replace(path, where / free_name(path.name, n))
            moved += path.suffix == CLIP_SUFFIX
    return moved


def plan_fields(c: ClipPlan) -> list:
    return [getattr(c, f) for f in PLAN_FIELDS]


def restore(job: ClipsJob, plan: SourcePlan) -> int:
    """Move back from OUT/.adatp/replaced, with their captions, the set-aside clips that this plan asks
    for as they were made (the same plan, cut settings and footage), rather than cut them again:
    settings switched back and forth. The number restored."""
    notes = read_lines(aside_path(job, plan.key), "file")
    aside, cut = job.state_dir / "replaced", cut_settings(job)
    restored = 0
    for c in plan.clips:
        if os.path.lexists(clip_path(job, c)):
            continue
        for file, note in reversed(notes.items()):  # the last set aside first
            if note.get("clip") != c.name or note.get("plan") != plan_fields(c) or note.get("cut") != cut \
                    or note.get("fingerprint") != plan.fingerprint or not (aside / file).is_file():
                continue
            stem = file[:-len(CLIP_SUFFIX)]
            for there, back in ((aside / f"{stem}.txt", job.clips_dir / f"{c.name}.txt"),
                                (aside / "captions" / f"{stem}.txt", job.state_dir / "captions" / f"{c.name}.txt")):
                if os.path.lexists(there) and not os.path.lexists(back):
                    back.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(there, back)
            job.clips_dir.mkdir(parents=True, exist_ok=True)
            os.replace(aside / file, clip_path(job, c))  # last: a kill before leaves it set aside, noted
            if isinstance(note.get("made"), dict):
                plan.made[c.name] = note["made"]
            restored += 1
            break
    return restored


def free_name(name: str, n: int) -> str:
    """NAME.mp4 for n 1, NAME.n.mp4 for n > 1."""
    stem, dot, ext = name.rpartition(".")
    return name if n == 1 else f"{stem}.{n}{dot}{ext}"


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
    adopt = Adoption(job, dry_run)
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
        if plan.error is None and not dry_run:  # the old clips go first: a kill between the two steps leaves
            plan.moved = set_aside(job, plan.replaced, plan.key, plan.earlier)  # the old record, compared again
            plan.restored = restore(job, plan)
            write_record(job, plan)
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
                             "shots": [_plain(s) for s in p.shots],
                             "clips": [{**_plain(c), "end": round(c.end, 6), "seconds": round(c.frames / c.fps, 6)}
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

def clip_path(job: ClipsJob, clip: ClipPlan) -> Path:
    return job.clips_dir / f"{clip.name}{CLIP_SUFFIX}"


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
            write_record(job, p)


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


# --- the summary --------------------------------------------------------------------------------

@dataclass
class ClipsSummary:
    """What a clips run did: sources, shots, clips cut, the caption run's summary, the layouts."""

    sources: int = 0
    failed_sources: list = field(default_factory=list)  # (name, why)
    shots: int = 0
    clips_planned: int = 0
    clips_cut: int = 0
    clips_existing: int = 0
    clips_failed: list = field(default_factory=list)  # (name, why)
    shots_without_clip: int = 0
    clips_replaced: int = 0  # an earlier plan's clips set aside (the source or the rules changed)
    clips_restored: int = 0  # clips set aside earlier and moved back: asked for again as they were made
    elsewhere: list = field(default_factory=list)  # sources another run was planning or cutting
    held: list = field(default_factory=list)  # held_by() of each: the process holding it and its claim file
    adopted: list = field(default_factory=list)  # (source, its old path): moved or renamed, its record taken
    gone: list = field(default_factory=list)  # (old source, key, clips on disk): records whose source is gone
    source_seconds: float = 0.0
    detected: int = 0  # sources whose shots were detected this run (the rest came from their records)
    seconds: float = 0.0
    caption: dict = field(default_factory=lambda: CaptionSummary().to_dict())
    outputs: list = field(default_factory=list)  # files the layouts wrote this run
    output_error: str | None = None
    error: str | None = None  # the run stopped (the model could not be loaded, a disk failed)
    uncaptioned: list = field(default_factory=list)  # this run's clips on disk with no caption (paths under out)
    notes: list = field(default_factory=list)  # (source, note): what re-encoding did to it (an HDR source)
    in_videos: bool = True  # the txt layout: those clips sit in videos/ with no NAME.txt beside them

    def captions(self) -> CaptionSummary:
        return CaptionSummary.merge([self.caption])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def merge(cls, parts: list[dict]) -> ClipsSummary:
        total = cls()
        for p in parts:
            for name in ("sources", "shots", "clips_planned", "clips_cut", "clips_existing",
                         "shots_without_clip", "source_seconds", "detected", "clips_replaced",
                         "clips_restored"):
                setattr(total, name, getattr(total, name) + p[name])
            total.failed_sources += [tuple(x) for x in p["failed_sources"]]
            total.uncaptioned += p.get("uncaptioned", [])
            total.notes += [tuple(x) for x in p.get("notes", [])]
            total.in_videos = p.get("in_videos", True)
            total.elsewhere += p.get("elsewhere", [])
            total.held += p.get("held", [])
            total.adopted += [tuple(x) for x in p.get("adopted", [])]
            total.gone += [tuple(x) for x in p.get("gone", [])]
            total.clips_failed += [tuple(x) for x in p["clips_failed"]]
            total.seconds = max(total.seconds, p["seconds"])
            total.outputs += p["outputs"]
            total.output_error = total.output_error or p["output_error"]
            total.error = "; ".join(e for e in (total.error, p.get("error")) if e) or None
        total.caption = CaptionSummary.merge([p["caption"] for p in parts]).to_dict()
        return total

    @property
    def busy(self) -> bool:
        """Every source was held by another run on the same output folder: this run did nothing."""
        return bool(self.elsewhere) and len(self.elsewhere) == self.sources

    def exit_code(self) -> int:
        """0, unless the model, the disk or the layouts failed (2), every source was held by another
        run (EXIT_BUSY, 3), or no clip has a caption (1)."""
        caption = self.captions()
        if caption.model_error or caption.write_error or self.output_error or self.error:
            return 2
        if self.busy:
            return EXIT_BUSY
        if self.clips_planned and not (caption.captions or caption.skipped or caption.done):
            return 1
        return 0 if self.clips_planned or not self.failed_sources else 1

    def text(self, processes: int = 1) -> str:
        rate = self.source_seconds / self.seconds if self.seconds > 0 else 0.0
        reused = self.sources - len(self.failed_sources) - self.detected - len(self.elsewhere)
        lines = [f"Sources: {self.sources} ({len(self.failed_sources)} failed), {self.source_seconds:.1f} s of "
                 f"footage, {self.shots} shot(s) ({self.detected} source(s) analysed now"
                 + (f", {reused} from an earlier run" if reused > 0 else "")
                 + f"), {self.shots_without_clip} shot(s) too short for a clip.",
                 f"Clips: {self.clips_planned} planned, {self.clips_cut} cut now, {self.clips_existing} already "
                 f"there, {len(self.clips_failed)} failed" + (
                     f", {self.clips_replaced} of an earlier plan moved to {STATE_FOLDER}/replaced (the source or "
                     "the rules or the cut changed)" if self.clips_replaced else "") + (
                     f", {self.clips_restored} moved back from {STATE_FOLDER}/replaced (asked for again as they were "
                     "made: the same plan, cut and footage)" if self.clips_restored else "") + "."]
        if self.elsewhere:
            lines += held_text(self.elsewhere, self.held, self.busy)
        if self.adopted:
            lines.append(f"{len(self.adopted)} source(s) moved or renamed, recognised by their content: their clips "
                         "and captions are kept, not cut again: " + ", ".join(
                             f"{printable(old)} -> {printable(new)}" for new, old in self.adopted[:3])
                         + (" ..." if len(self.adopted) > 3 else ""))
        if self.gone:
            lines.append(f"{len(self.gone)} source(s) recorded in {STATE_FOLDER}/sources are no longer where they "
                         "were: " + ", ".join(f"{printable(src)} ({n} clip(s))" for src, _, n in self.gone[:3])
                         + (" ..." if len(self.gone) > 3 else "") + ". Their clips stay in the set. If the footage "
                         "moved, give its new place as a source: it is recognised by its content and keeps its clips "
                         f"and captions. To drop it, remove its record ({STATE_FOLDER}/sources/KEY.json) and its "
                         f"clips ({CLIPS_FOLDER}/KEY_*), then run again.")
        lines += [f"{printable(name)}: {note}" for name, note in self.notes]
        lines += grouped("source failed", [(printable(n), printable(why)) for n, why in self.failed_sources])
        lines += grouped("clip failed", self.clips_failed)
        lines.append(self.captions().text(processes))
        if self.uncaptioned:
            more = " ..." if len(self.uncaptioned) > 3 else ""
            lines.append(f"{len(self.uncaptioned)} clip(s) have no caption yet: "
                         + ", ".join(printable(n) for n in self.uncaptioned[:3]) + more + ". "
                         + (f"They stay in {CLIPS_FOLDER}/ without a .txt, so a trainer that reads the folder "
                            "(musubi-tuner, diffusion-pipe, ai-toolkit, SimpleTuner) would train them with an empty "
                            "caption; " if self.in_videos else "")
                         + "the JSONL and finetrainers lists leave them out. Run the same command again to caption "
                           f"them, or move them out of {CLIPS_FOLDER}/.")
        if self.error:
            lines.append(f"Stopped: {self.error}")
        if self.output_error:
            lines.append(f"Writing the layouts failed: {self.output_error}")
        else:
            lines.append(f"Layouts: {len(self.outputs)} file(s) written" + (
                "" if self.outputs else " (all up to date)") + ".")
        if self.seconds > 0 and (self.detected or self.clips_cut or self.captions().done):
            lines.append(f"{self.seconds:.1f} s in all, {rate:.2f} source seconds a second.")
        return "\n".join(lines)


def held_by(name: str, claim: ClipClaim) -> dict:
    """A source another run holds: its name, the holding process (pid, host; None when the claim does
    not say) and the claim file, for a message saying what to do."""
    pid, host = claim.holder() or (None, None)
    return {"source": name, "pid": pid, "host": host, "claim": str(claim.path)}


def held_text(elsewhere: list, held: list, busy: bool) -> list[str]:
    """The summary's lines for the sources another run holds, each with its process and claim file."""
    head = (f"Nothing done: every source ({len(elsewhere)}) is left to another run on the same output folder, "
            "which holds it now" if busy else f"{len(elsewhere)} source(s) left to another run on the same output folder now")
    lines = [head + (":" if held else ": " + ", ".join(printable(n) for n in elsewhere[:3])
                     + (" ..." if len(elsewhere) > 3 else ""))]
    for h in held[:5]:
        who = f"process {h['pid']} on {h['host']}" if h.get("pid") else "a process that does not say which"
        lines.append(f"  {printable(h['source'])}: held by {who} (claim {printable(h['claim'])})")
    if len(held) > 5:
        lines.append(f"  ... and {len(held) - 5} more")
    lines.append("  Wait for that run to finish, then run this again: it takes what is left. A claim is a lock "
                 "the system lets go when its process ends, however it ends; if that process is not running (a "
                 "run on another machine over a network share), remove its claim file and run again.")
    return lines


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
        if gone is not None and source_gone(record):
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
