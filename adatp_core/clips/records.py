"""What a clips job keeps of each source in OUT/.adatp/sources, so a rerun redoes nothing: the record
(KEY.json: the source, its fingerprint, its shots and clips, the settings, what each clip holds),
written whole and renamed into place; the journal of the clips made since (KEY.made.jsonl); the notes
of the clips set aside into OUT/.adatp/replaced (KEY.aside.jsonl). Also what decides that a source is
the same footage (``same_source``), upgrades an older record (``upgraded``), lets a moved source take
its old record, its clips renamed for the new key (``Adoption``, ``named_for``), checks what a clip is
said to hold (``good_made``), and sets aside and restores clips (``set_aside``, ``restore``)."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from ..caption import ClipClaim, write_atomic
from ..caption.files import append_whole, printable
from ..errors import AdaTPInputError
from .cut import MADE_FIELDS, probe_clip
from .outputs import SUBTITLES_FOLDER
from .plan import ClipPlan, source_key
from .settings import CLIP_SUFFIX, ClipsJob, clip_path, cut_settings
from .shots import Shot

log = logging.getLogger(__name__)

RECORD_VERSION = 1
UNKNOWN_CUT = "unknown"  # a record's cut settings when its clips were kept from a record that did not hold them


@dataclass(frozen=True)
class Source:
    """One source video. root: the folder it was found in (None: given as a file);
    name: how it is shown (the folder's name and the path below it, or the path given)."""

    path: Path
    root: Path | None
    name: str


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
    cut: str | None = None  # UNKNOWN_CUT: some clips kept from an upgraded record made with cut settings unknown
    notes: list = field(default_factory=list)  # what the user should know of this source's clips (HDR)
    video: dict | None = None  # video_facts of the source: checked before another source takes the record

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
    """Append ``entry`` to the JSON lines file ``path``: one whole line (after a newline when the last
    line was cut short: append_whole), on disk (fsync) before the caller goes on; a line cut short by a
    kill is skipped when read (read_lines)."""
    line = json.dumps(entry, ensure_ascii=True) + "\n"
    # never through a link (one planted in .adatp/sources may lead out of the output folder): O_NOFOLLOW
    # where there is one, a look first where there is not (Windows)
    linked = OSError(errno.ELOOP, "a link, where the job keeps a source's notes in a file of its own; remove the "
                                  "link", str(path))
    if path.is_symlink():
        raise linked
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise linked from exc
        raise
    try:
        append_whole(fd, line.encode("ascii"))
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
    """clip name -> what it holds, from the source's journal (the last line for a name wins; a line whose
    values could not be a clip's is left out, with a warning)."""
    path = journal_path(job, key)
    return {name: e["made"] for name, e in read_lines(path, "clip").items() if good_made(e.get("made"), path, name)}


# Bounds of what a clip may be said to hold: far above any clip this job makes (a source's own rate,
# in copy mode or with fps None, may pass ClipRules' MAX_FPS: high-speed footage), low enough that
# start + frames / fps stays a finite number of seconds (an edited {"fps": 1e-308} made clips.jsonl's
# "end" Infinity) and that a whole number too big for a float ({"frames": 10**400}) is turned down by
# comparison rather than by math.isfinite, which raised OverflowError out of every reader.
MADE_LIMITS = {"start": (-1e9, 1e9), "frames": (1, 10_000_000), "fps": (1e-3, 100_000.0),
               "width": (1, 65_536), "height": (1, 65_536)}


def good_value(key: str, v) -> bool:
    """Whether ``v`` can be a clip's ``key`` (MADE_LIMITS; whole frames, width and height)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (key in ("frames", "width", "height")
                                                                   and not isinstance(v, int)):
        return False
    low, high = MADE_LIMITS[key]
    return low <= v <= high  # False for NaN; exact for an int of any size


def good_made(made, path: Path | None = None, name: str | None = None) -> bool:
    """Whether ``made`` can say what a clip's file holds (cut.MADE_FIELDS): a dict whose values, where
    given, are within MADE_LIMITS (a finite start, whole frames, width and height of at least 1, a rate
    above 0). A bad one (edited by hand, another program's) would break the layouts on every run. With
    ``path``: one that is not is named in a warning, as left out."""
    ok = isinstance(made, dict) and all(v is None or good_value(k, v)
                                        for k, v in ((k, made.get(k)) for k in MADE_FIELDS))
    if not ok and path is not None:
        log.warning("%s: what it says clip %s holds (%s) could not be a clip's; left out", printable(str(path)),
                    printable(str(name)), printable(repr(made)[:200]))
    return ok


def aside_path(job: ClipsJob, key: str) -> Path:
    """KEY.aside.jsonl beside the record: a line for each of the source's clips set aside (its file
    in OUT/.adatp/replaced, its plan, the cut settings, the source's fingerprint and what it holds),
    so a clip asked for again as it was is restored rather than cut again."""
    return job.state_dir / "sources" / f"{key}.aside.jsonl"


def identity(path: Path) -> dict:
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
        {k: record.get(k) for k in ("size", "mtime_ns")} == identity(path)


def plain(obj) -> dict:
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
    if not isinstance(record["source"], str) or any(not good_made(plain(c)) or None in plan_fields(c) for c in clips):
        raise ValueError("a clip without a start, frames, rate or size")
    if not all(good_made({"start": s.start}) and good_made({"start": s.end}) for s in shots):
        raise ValueError("a shot without a start or end")
    if not isinstance(record.get("made") or {}, dict) or not all(map(good_made, (record.get("made") or {}).values())):
        raise ValueError("a clip's made values are not a clip's")
    return record["source"], shots, clips


PLAN_FIELDS = ("start", "frames", "fps", "width", "height")  # what a clip's file holds, beside its name


def plan_fields(c: ClipPlan) -> list:
    return [getattr(c, f) for f in PLAN_FIELDS]


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
              "given": os.path.abspath(plan.source.path),  # the path as given (a link re-pointed: Adoption)
              "resolved": os.path.realpath(plan.source.path),  # the file, however it was given (its key's path)
              **identity(plan.source.path), "fingerprint": plan.fingerprint, "threshold": job.threshold,
              "rules": plain(job.rules), "cut": plan.cut or cut_settings(job),
              **({"video": plan.video} if plan.video else {}),
              "shots": [plain(s) for s in plan.shots], "clips": [plain(c) for c in plan.clips],
              "made": {c.name: plan.made[c.name] for c in plan.clips if c.name in plan.made}}
    write_record_dict(job, plan.key, record)


def write_record_dict(job: ClipsJob, key: str, record: dict) -> None:
    """Write ``record`` under ``key`` (atomically, only when its text changes); the journal goes, the
    record holds it now."""
    # ASCII: a path's undecodable bytes (surrogate escapes) are kept as \\udcXX escapes that read back exactly
    text = json.dumps(record, indent=1, ensure_ascii=True) + "\n"
    path = record_path(job, key)
    try:
        same = path.read_text(encoding="utf-8") == text
    except OSError:
        same = False
    if not same:
        write_atomic(path, text)
    journal_path(job, key).unlink(missing_ok=True)  # the record holds it now


def upgraded(job: ClipsJob, path: Path, record: dict) -> dict:
    """A record written before records held the cut settings and the resolved path, taken as this
    version's when its source's size and time are unchanged and every clip it names that is on disk
    holds what its plan says (frames, rate and size, no audio unless asked for; read from the
    containers, nothing decoded): the clips are kept and the record is rewritten in this format.
    Otherwise the record as it was, whose clips are then set aside and cut again."""
    if {k: record.get(k) for k in ("size", "mtime_ns")} != identity(path):
        return record
    for c in record_plan(record)[2]:
        if clip_path(job, c).is_file() and not holds(clip_path(job, c), plain(c), job.keep_audio):
            return record
    log.info("%s: a record from an earlier version, whose clips match its plan: kept and rewritten", path)
    # the settings its clips were cut with (crf, ...) cannot be read from them: not claimed to be this run's
    return {**record, "resolved": os.path.realpath(path), "cut": record.get("cut", UNKNOWN_CUT)}


def holds(path: Path, want: dict, keep_audio: bool) -> bool:
    """Whether the clip file ``path`` holds the frames, rate and size in ``want`` (and no audio unless
    kept), read from its container (probe_clip: nothing decoded)."""
    held = probe_clip(path)
    return held is not None and all(held[k] == want[k] for k in ("frames", "width", "height")) \
        and abs(held["fps"] - want["fps"]) <= 1e-3 and (keep_audio or not held["audio"])


def video_facts(path: Path) -> dict:
    """What a source's container says of its video (duration, size, rate; probe_video, nothing decoded)."""
    from ..video import probe_video

    probe = probe_video(path)
    return {"duration": round(probe.duration, 6), "width": probe.width, "height": probe.height,
            "fps": round(probe.fps, 6)}


def same_video(record: dict, path: Path) -> bool:
    """Whether the video at ``path`` is what ``record`` was made from as far as its container tells: the
    fingerprint reads 3 MiB of a large file, so footage alike there is told apart by its duration, size
    and rate (a record without them: its shots' end against the duration, within two frames)."""
    try:
        now = video_facts(path)
    except AdaTPInputError:
        return False
    was = record.get("video")
    if isinstance(was, dict):
        return (now["width"], now["height"]) == (was.get("width"), was.get("height")) \
            and all(isinstance(was.get(k), (int, float)) and abs(now[k] - was[k]) <= 1e-3 for k in ("fps", "duration"))
    shots = record.get("shots") or []
    slack = 2 / now["fps"] + 0.05 if now["fps"] > 0 else 0.5
    return not shots or abs(shots[-1]["end"] - now["duration"]) <= slack


def recorded_path(record: dict) -> str:
    """The resolved path of the file the record was made from (an older record: its path as given)."""
    return record.get("resolved") or os.path.realpath(record["source"])


def given_path(record: dict) -> str | None:
    """The record's source as it was given, made absolute when it was written (an older record's when
    it was given absolute; None when relative: to another folder than this run's, maybe)."""
    return record.get("given") or (record["source"] if os.path.isabs(record["source"]) else None)


def source_gone(record: dict, key: str) -> bool:
    """The record's source is no longer under its key: nothing is at the file it was made from (moved,
    renamed or removed), or that path now leads to a file with another key (a folder moved with a link
    left at the old place). Paths are compared resolved: the stored string may still exist through a link."""
    recorded = recorded_path(record)
    if not os.path.lexists(recorded):
        return True
    return "resolved" in record and source_key(Path(recorded)) != key


class Adoption:
    """Records under another key that belong to a source with no record under its own, taken by that
    source (clips and captions with it, renamed for its key) rather than cut again beside them:
    the same file under another key, found by its resolved path (a folder moved with a link left at
    the old place; folder sources keyed by the path below the folder in an earlier version); the
    source path given before now leading to another file (a link re-pointed at other footage: its
    earlier clips are then set aside, as for a source replaced by other footage); the same footage
    moved or renamed, found by fingerprint among the records whose file is gone. A record under a key
    of this run's sources (``keys``) is never taken by another. The records are read once a run, when
    first needed."""

    def __init__(self, job: ClipsJob, dry_run: bool, keys=()):
        self.job, self.dry_run, self.keys = job, dry_run, set(keys)
        self.orphans: dict[str, list[str]] | None = None  # fingerprint -> keys of records whose file is gone
        self.rekeyed: dict[str, str] = {}  # a resolved path -> the key of its file's record under another key
        self.repointed: dict[str, str] = {}  # a path as given -> the key of the record of the file it led to

    def _read(self) -> None:
        self.orphans = {}
        for path in sorted((self.job.state_dir / "sources").glob("*.json")):
            try:
                record = read_record(self.job, path.stem)
            except AdaTPInputError:
                continue
            if record is None or path.stem in self.keys:
                continue
            recorded = recorded_path(record)
            if not os.path.lexists(recorded):
                if record.get("fingerprint"):
                    self.orphans.setdefault(record["fingerprint"], []).append(path.stem)
            elif source_key(Path(recorded)) != path.stem:
                self.rekeyed[os.path.realpath(recorded)] = path.stem
            elif given_path(record) and os.path.realpath(given_path(record)) != os.path.realpath(recorded):
                self.repointed[given_path(record)] = path.stem

    def __call__(self, key: str, print_: str, path: Path) -> tuple[dict, str | None] | None:
        """(the record, its source when it moved, else None) for the source at ``path`` (key, fingerprint
        print_), the record renamed to ``key`` (not in a dry run); None when there is none to take."""
        if self.orphans is None:
            self._read()
        here, given = os.path.realpath(path), os.path.abspath(path)
        found = [(old, "file") for old in [self.rekeyed.get(here)] if old]
        found += [(old, "given") for old in [self.repointed.get(given)] if old]
        found += [(old, "print") for old in self.orphans.get(print_, [])]
        for old, how in found:
            def fits(record: dict | None) -> bool:
                if record is None:
                    return False
                if how == "file":
                    return os.path.realpath(recorded_path(record)) == here
                if how == "given":
                    return given_path(record) == given and os.path.realpath(recorded_path(record)) != here
                return record.get("fingerprint") == print_ and not os.path.lexists(recorded_path(record)) \
                    and same_video(record, path)

            if self.dry_run:
                record = read_record(self.job, old)
                record = record and named_for(self.job, key, record, move=False)
            else:
                record = self._take(old, key, fits)
            {"file": self.rekeyed, "given": self.repointed}.get(how, {}).pop(here if how == "file" else given, None)
            if how == "print":
                self.orphans[print_].remove(old)
            if fits(record):
                return record, (record["source"] if how == "print" else None)
        return None

    def _take(self, old: str, key: str, fits: Callable[[dict | None], bool]) -> dict | None:
        """The record under ``old`` moved to ``key``, its clips and captions renamed for ``key``, when it
        still fits (under a claim: another run may be taking it too), else None. Named for their old key,
        the clips would be taken by the next source at the old path (its key gives the same names).
        Its journal is folded into it where it is, the files are renamed, then the notes of clips set
        aside move, then the record (one rename: at every moment it is under one key or the other),
        then it is rewritten with the new names; a kill before the rewrite leaves a record under
        ``key`` whose names are the old key's, which ``named_for`` finishes (plan_source) with its
        files already renamed."""
        claim = ClipClaim(record_path(self.job, old))
        if not claim.acquire():
            return None
        try:
            record = read_record(self.job, old)
            if not fits(record):
                return None
            write_record_dict(self.job, old, record)  # the journal folded in: nothing beside it to move
            clear_names(self.job, key, record)
            renamed_record = named_for(self.job, key, record)
            notes = read_lines(aside_path(self.job, old), "file")
            if notes:  # merged with the new key's own (its earlier footage's clips set aside), keyed by file
                notes = {**read_lines(aside_path(self.job, key), "file"), **{
                    f: {**n, **({"clip": renamed(key, n["clip"])} if "clip" in n else {})} for f, n in notes.items()}}
                write_atomic(aside_path(self.job, key), "".join(json.dumps(n, ensure_ascii=True) + "\n"
                                                                for n in notes.values()))
            aside_path(self.job, old).unlink(missing_ok=True)
            os.replace(record_path(self.job, old), record_path(self.job, key))
            write_record_dict(self.job, key, renamed_record)
            record = renamed_record
            for kind in ("srt", "vtt"):  # written again under the new key
                stale = self.job.out / SUBTITLES_FOLDER / f"{old}.{kind}"
                if stale.is_file() and not stale.is_symlink():
                    stale.unlink()
            return record
        finally:
            claim.release()


_CLIP_TAIL = re.compile(r"_s\d+_[^_]*$")  # what follows the key in a clip's name (plan.clip_name)


def renamed(key: str, name):
    """The clip name ``name`` with its key replaced by ``key`` (clip names are KEY_sSHOT_START-END)."""
    if not isinstance(name, str):
        return name
    tail = _CLIP_TAIL.search(name)
    return f"{key}{tail.group(0)}" if tail else name


NAMED_FILES = ((CLIP_SUFFIX, ""), (".txt", ""), (".txt", "captions"))  # a clip's files: (suffix, state sub-folder)


def named_files(job: ClipsJob, name: str) -> list[Path]:
    """The clip ``name``'s file and its captions (beside it, and in the state folder)."""
    return [(job.state_dir / sub if sub else job.clips_dir) / f"{name}{suffix}" for suffix, sub in NAMED_FILES]


def clear_names(job: ClipsJob, key: str, record: dict) -> int:
    """Set aside (into OUT/.adatp/replaced, no note: never restored) the files in the way of ``record``'s
    clips renamed for ``key``: files under the new names that no record holds (a record moved away by
    hand, its source gone, left its clips), while the record's own are still under its old names.
    Skipped, the record would list that other footage's clips and its own would stay under the old
    key, taken by the next source there. A clip in the way goes with its captions; a caption alone in
    the way, alone. Called by Adoption._take only (under the claim, the record under its old key): a
    new name whose old one is gone was renamed by a run killed meanwhile, and is the record's. The
    number of clips set aside."""
    moved = 0
    for c in record["clips"]:
        a, b = c["name"], renamed(key, c["name"])
        if a == b:
            continue
        if all(os.path.lexists(job.clips_dir / f"{n}{CLIP_SUFFIX}") for n in (a, b)):
            moved += set_aside(job, [SimpleNamespace(name=b)])  # set_aside reads only its name
        for old, new in zip(named_files(job, a), named_files(job, b)):
            if os.path.lexists(old) and os.path.lexists(new):  # a caption alone in the way
                where = job.state_dir / "replaced" / ("captions" if new.parent == job.state_dir / "captions" else "")
                where.mkdir(parents=True, exist_ok=True)
                n = 1
                while os.path.lexists(where / free_name(new.name, n)):
                    n += 1
                os.replace(new, where / free_name(new.name, n))
    if moved:
        log.warning("%d clip(s) in %s under the names of a moved source's clips, held by no record, were set "
                    "aside into %s", moved, printable(str(job.clips_dir)), printable(str(job.state_dir / "replaced")))
    return moved


def named_for(job: ClipsJob, key: str, record: dict, move: bool = True) -> dict:
    """``record`` with its clips named for ``key`` (a record taken from another key: a moved source, or
    one an earlier version keyed otherwise), each clip and its captions renamed on disk when ``move``
    (a name already taken under the new name is left alone: renamed before a kill). The same record
    when its names are ``key``'s already."""
    names = {c["name"]: renamed(key, c["name"]) for c in record["clips"]}
    if all(a == b for a, b in names.items()):
        return record
    if move:
        for a, b in names.items():
            for old, new in zip(named_files(job, a), named_files(job, b)):
                if a != b and os.path.lexists(old) and not os.path.lexists(new):
                    os.replace(old, new)
    return {**record, "clips": [{**c, "name": names[c["name"]]} for c in record["clips"]],
            "made": {names.get(k, k): v for k, v in (record.get("made") or {}).items()}}


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
        found = [(p, aside / sub) for p, (_, sub) in zip(named_files(job, c.name), NAMED_FILES) if os.path.lexists(p)]
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


def restore(job: ClipsJob, plan: SourcePlan) -> int:
    """Move back from OUT/.adatp/replaced, with their captions, the set-aside clips that this plan asks
    for as they were made (the same plan, cut settings and footage, and the file holds the frames, rate
    and size noted: probe_clip), rather than cut them again: settings switched back and forth. Called
    after the plan's record is written: a kill leaves the clips it asks for either here or there. What
    a restored clip holds goes to the journal before it moves. The number restored."""
    notes = read_lines(aside_path(job, plan.key), "file")
    aside, cut = job.state_dir / "replaced", cut_settings(job)
    restored = 0
    for c in plan.clips:
        if os.path.lexists(clip_path(job, c)):
            continue
        for file, note in reversed(notes.items()):  # the last set aside first
            if note.get("clip") != c.name or note.get("plan") != plan_fields(c) or note.get("cut") != cut \
                    or note.get("fingerprint") != plan.fingerprint:
                continue
            if not bare_clip_name(file) or (aside / file).is_symlink() or not (aside / file).is_file():
                # only a clip file in .adatp/replaced itself: a note naming ../x or /x would move that in
                log.warning("%s: a note names %s, not a clip file in %s; left alone", printable(str(aside_path(
                    job, plan.key))), printable(file), printable(str(aside)))
                continue
            made = note.get("made")
            if made is not None and not good_made(made, aside_path(job, plan.key), c.name):
                made = None
            if not holds(aside / file, {**plain(c), **(made or {})}, job.keep_audio):
                log.warning("%s: not what its note says it holds; left there, the clip is cut again",
                            printable(str(aside / file)))
                continue
            stem = file[:-len(CLIP_SUFFIX)]
            for there, back in ((aside / f"{stem}.txt", job.clips_dir / f"{c.name}.txt"),
                                (aside / "captions" / f"{stem}.txt", job.state_dir / "captions" / f"{c.name}.txt")):
                if os.path.lexists(there) and not os.path.lexists(back):
                    back.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(there, back)
            if made is not None:
                plan.made[c.name] = made
                journal(job, plan.key, c.name, made)  # before the move: a kill leaves it noted, not unknown
            job.clips_dir.mkdir(parents=True, exist_ok=True)
            os.replace(aside / file, clip_path(job, c))  # last: a kill before leaves it set aside, noted
            restored += 1
            break
    return restored


def bare_clip_name(name: str) -> bool:
    """Whether ``name`` is a clip file's name and nothing more (no folder, no way up, on any system)."""
    return name.endswith(CLIP_SUFFIX) and not {"/", "\\", "\0"} & set(name) and name == Path(name).name \
        and name.strip(".") != "" and ":" not in name


def free_name(name: str, n: int) -> str:
    """NAME.mp4 for n 1, NAME.n.mp4 for n > 1."""
    stem, dot, ext = name.rpartition(".")
    return name if n == 1 else f"{stem}.{n}{dot}{ext}"
