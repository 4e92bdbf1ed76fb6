"""What a clips job keeps of each source in OUT/.adatp/sources, so a rerun redoes nothing: the record
(KEY.json: the source, its fingerprint, its shots and clips, the settings, what each clip holds),
written whole and renamed into place; the journal of the clips made since (KEY.made.jsonl); the notes
of the clips set aside into OUT/.adatp/replaced (KEY.aside.jsonl). Also what decides that a source is
the same footage (``same_source``), upgrades an older record (``upgraded``), lets a moved source take
its old record (``Adoption``), and sets aside and restores clips (``set_aside``, ``restore``)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..caption import ClipClaim, write_atomic
from ..caption.files import printable
from ..errors import AdaTPInputError
from .cut import probe_clip
from .outputs import SUBTITLES_FOLDER
from .plan import ClipPlan, source_key
from .settings import CLIP_SUFFIX, ClipsJob, clip_path, cut_settings
from .shots import Shot

log = logging.getLogger(__name__)

RECORD_VERSION = 1


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
    if not isinstance(record["source"], str) or any(
            not (isinstance(c.frames, int) and c.frames >= 1 and c.fps > 0 and c.width > 0 and c.height > 0)
            for c in clips):
        raise ValueError("a clip without frames, rate or size")
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
              "resolved": os.path.realpath(plan.source.path),  # the file, however it was given (its key's path)
              **identity(plan.source.path), "fingerprint": plan.fingerprint, "threshold": job.threshold,
              "rules": plain(job.rules), "cut": cut_settings(job),
              "shots": [plain(s) for s in plan.shots], "clips": [plain(c) for c in plan.clips],
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


def upgraded(job: ClipsJob, path: Path, record: dict) -> dict:
    """A record written before records held the cut settings and the resolved path, taken as this
    version's when its source's size and time are unchanged and every clip it names that is on disk
    holds what its plan says (frames, rate and size, no audio unless asked for; read from the
    containers, nothing decoded): the clips are kept and the record is rewritten in this format.
    Otherwise the record as it was, whose clips are then set aside and cut again."""
    if {k: record.get(k) for k in ("size", "mtime_ns")} != identity(path):
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


def recorded_path(record: dict) -> str:
    """The resolved path of the file the record was made from (an older record: its path as given)."""
    return record.get("resolved") or os.path.realpath(record["source"])


def source_gone(record: dict) -> bool:
    """Nothing is at the record's source (the file it was made from was moved, renamed or removed)."""
    return not os.path.lexists(recorded_path(record))


class Adoption:
    """Records under another key that belong to a source with no record under its own: the same
    footage moved or renamed (a renamed folder gives its files new keys), found by fingerprint among
    the records whose source is gone; or the same file under the key an earlier version gave it
    (folder sources were keyed by the path below the folder), found by its path. The source takes
    that record, clips and captions with it, rather than being cut again beside them. The records
    are read once a run, when first needed."""

    def __init__(self, job: ClipsJob, dry_run: bool):
        self.job, self.dry_run = job, dry_run
        self.orphans: dict[str, list[str]] | None = None  # fingerprint -> keys of records whose source is gone
        self.rekeyed: dict[str, str] = {}  # a source's resolved path -> the key of its record under another key

    def _read(self) -> None:
        self.orphans = {}
        for path in sorted((self.job.state_dir / "sources").glob("*.json")):
            try:
                record = read_record(self.job, path.stem)
            except AdaTPInputError:
                continue
            if record is None:
                continue
            if source_gone(record):
                if record.get("fingerprint"):
                    self.orphans.setdefault(record["fingerprint"], []).append(path.stem)
            elif source_key(Path(recorded_path(record))) != path.stem:
                self.rekeyed[recorded_path(record)] = path.stem

    def __call__(self, key: str, print_: str, path: Path) -> tuple[dict, str | None] | None:
        """(the record, its source when it moved, else None) for the source at ``path`` (key, fingerprint
        print_), the record renamed to ``key`` (not in a dry run); None when there is none to take."""
        if self.orphans is None:
            self._read()
        here = os.path.realpath(path)
        same_file = self.rekeyed.get(here)
        for old in ([same_file] if same_file else []) + list(self.orphans.get(print_, [])):
            def fits(record: dict | None) -> bool:
                if record is None:
                    return False
                if old == same_file:
                    return recorded_path(record) == here
                return record.get("fingerprint") == print_ and source_gone(record)

            if self.dry_run:
                record = read_record(self.job, old)
            else:
                record = self._take(old, key, fits)
            if old == same_file:
                self.rekeyed.pop(here, None)
            else:
                self.orphans[print_].remove(old)
            if fits(record):
                return record, (None if old == same_file else record["source"])
        return None

    def _take(self, old: str, key: str, fits: Callable[[dict | None], bool]) -> dict | None:
        """The record under ``old`` renamed to ``key`` when it still fits (under a claim: another run may
        be taking it too), else None."""
        claim = ClipClaim(record_path(self.job, old))
        if not claim.acquire():
            return None
        try:
            record = read_record(self.job, old)
            if not fits(record):
                return None
            for side in (journal_path, aside_path):  # its journals first: a kill after them leaves the
                if side(self.job, old).exists():  # record to be taken again, which finds them in place
                    os.replace(side(self.job, old), side(self.job, key))
            # one rename: at every moment the record is under one key or the other, never both
            os.replace(record_path(self.job, old), record_path(self.job, key))
            for kind in ("srt", "vtt"):  # written again under the new key
                stale = self.job.out / SUBTITLES_FOLDER / f"{old}.{kind}"
                if stale.is_file() and not stale.is_symlink():
                    stale.unlink()
            return record
        finally:
            claim.release()


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
