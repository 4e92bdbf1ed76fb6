"""The folder plan: what a folder holds, the job asked of it, and each clip's fate before the model loads.

``scan_folder`` lists the clips (links followed once, loops and unreadable folders
reported); ``CaptionJob`` is the folder and every setting, checked when made;
``plan_folder`` decides, without the model, which clips to caption, which already
have a caption and which cannot be captioned (and why).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..batching import check_batch_size
from ..errors import AdaTPInputError, OptionError
from ..paths import confined, inside
from ..pipeline import PipelineConfig
from ..video import VIDEO_EXTENSIONS
from .files import caption_path, existing_caption, name_limit, probe_writable, shown, valid_text
from .stream import DEFAULT_PROMPT
from .summary import CaptionSummary, manifest_record

log = logging.getLogger(__package__)  # "adatp_core.caption", the name the one-module caption.py logged under


# --- listing ------------------------------------------------------------------------------------

@dataclass
class Listing:
    """What a folder holds. clips: video files, sorted by relative path; problems:
    (relative path, why) for video names that cannot be clips (broken links, ...);
    folders: (relative path, why) for subfolders left out (link loops, unreadable)."""

    clips: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    folders: list = field(default_factory=list)


def _under(path: str, roots: list[str]) -> bool:
    """Whether the resolved ``path`` is one of ``roots`` (resolved) or below one."""
    return any(inside(r, path) for r in roots)


def scan_folder(folder, recursive: bool = False, exclude: Iterable = (), root=None) -> Listing:
    """The clips of ``folder`` (and its subfolders when ``recursive``). Hidden names
    and anything under ``exclude`` are skipped. Symbolic links to folders are
    followed, each real folder once: a link back to a folder already listed (a loop,
    or a second way in) is reported in ``folders`` and skipped. With a ``root`` (the
    node: a remote client's folder), a clip or subfolder that resolves outside it is
    skipped without a word in the listing (paths.confined): nothing outside is read,
    entered or named."""
    folder = Path(folder)
    skip = [os.path.realpath(e) for e in exclude]
    listing = Listing()
    seen = set()
    stack = [(folder, "")]
    while stack:
        here, prefix = stack.pop()
        try:
            st = os.stat(here)
            if (st.st_dev, st.st_ino) in seen:
                listing.folders.append((prefix.rstrip("/"), "a link to a folder already listed (a loop, or a "
                                        "second way in); skipped"))
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if not prefix:
                raise AdaTPInputError(f"cannot list the clip folder {shown(str(folder))} ({exc.strerror}); "
                                      "check its permissions.") from exc
            listing.folders.append((prefix.rstrip("/"), f"cannot be listed ({exc.strerror}); skipped"))
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = prefix + entry.name
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError:
                is_dir = False
            if not confined(root, entry.path):
                log.warning("skipping %s: it links out of %s", shown(rel), root)
                continue
            if is_dir:
                if recursive and not _under(os.path.realpath(entry.path), skip):
                    subfolders.append((Path(entry.path), rel + "/"))
                continue
            if Path(entry.name).suffix.lower() not in VIDEO_EXTENSIONS:
                continue
            if entry.is_symlink() and not os.path.exists(entry.path):
                listing.problems.append((rel, "a broken symbolic link (its target does not exist); fix or "
                                              "remove the link"))
            elif not entry.is_file():
                listing.problems.append((rel, "not a regular file; skipped"))
            elif not _under(os.path.realpath(entry.path), skip):
                listing.clips.append(Path(entry.path))
        stack.extend(reversed(subfolders))
    listing.clips.sort(key=lambda p: p.relative_to(folder).as_posix())
    return listing


def find_clips(folder, recursive: bool = False, exclude: Iterable = (), root=None) -> list[Path]:
    """Video files in ``folder`` (and its subfolders when ``recursive``), sorted by
    relative path. Hidden files and folders, anything under ``exclude``, and with a
    ``root`` (the node) anything that resolves outside it, are skipped."""
    return scan_folder(folder, recursive, exclude, root).clips


# --- the job ------------------------------------------------------------------------------------

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
    root: Path | None = None  # every clip must resolve inside it (the node); None: any path (the CLI)
    save: bool = True  # write each caption's .txt (False: only return and log the captions)
    batch_size: int = 1  # clips decoded together (0: auto, see batching.py)

    def __post_init__(self):
        folder = Path(self.folder).expanduser()
        if not folder.is_dir():
            raise AdaTPInputError(f"clip folder {shown(str(folder))} does not exist or is not a folder; "
                                  "check the path.")
        object.__setattr__(self, "folder", folder)
        if self.out is not None:
            object.__setattr__(self, "out", check_out_folder(Path(self.out).expanduser(), folder))
        for name in ("prefix", "suffix"):
            valid_text(getattr(self, name), name)
        try:
            check_batch_size(self.batch_size)
        except AdaTPInputError as exc:
            raise OptionError("batch_size", str(exc)) from None

    def text(self, caption: str) -> str:
        return f"{self.prefix}{caption}{self.suffix}"

    @property
    def caption_root(self) -> Path:
        """Where the captions go: --out, or the clip folder."""
        return self.out if self.out is not None else self.folder


def check_out_folder(out: Path, folder: Path) -> Path:
    """--out must be a folder (or a place to make one) that does not contain the clips."""
    for parent in (out, *out.parents):
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise OptionError("out", f"--out {shown(str(out))}: {shown(str(parent))} is a file, not a "
                                         "folder; give a folder for the captions.")
            break
    real_out, real_in = os.path.realpath(out), os.path.realpath(folder)
    if _under(real_in, [real_out]):
        raise OptionError("out", f"--out {shown(str(out))} contains the clip folder {shown(str(folder))}; "
                                 "captions there would be mixed with the clips. Give a folder outside it, or "
                                 "leave --out out to write each caption beside its clip.")
    return out


# --- planning: everything that can be decided before the model loads ----------------------------

@dataclass
class FolderPlan:
    """This process's share of a folder: clips to caption (todo, with their
    (relative path, caption path) in targets), the summary so far, and manifest
    records already decided (clips failed or kept unread while planning)."""

    clips: list
    todo: list
    targets: dict
    summary: CaptionSummary
    records: list


def plan_folder(job: CaptionJob, shard: tuple[int, int] = (0, 1)) -> FolderPlan:
    """List the folder and decide each clip's fate without the model: skip (has a
    caption), fail (a bad entry: collision, caption path that is a folder, name too
    long, folder not writable) or caption. Raises AdaTPInputError when nothing could
    be written at all (every output folder is unwritable), naming the folder."""
    index, count = shard
    listing = scan_folder(job.folder, job.recursive, [job.out] if job.out is not None else [], job.root)
    clips = listing.clips[index::count]
    problems = listing.problems[index::count]
    summary = CaptionSummary(found=len(clips) + len(problems), folders=list(listing.folders))
    records = []

    def fail(rel, why):
        summary.failed.append((rel, why))
        records.append(manifest_record(rel, None, error=why))

    for rel, why in problems:
        fail(rel, why)
    todo, targets, claimed, limits = [], {}, {}, {}
    for clip in clips:
        rel = clip.relative_to(job.folder).as_posix()
        target = caption_path(clip, job.folder, job.out)
        if target in claimed:
            fail(rel, f"{shown(claimed[target])} already writes {shown(target.name)}; rename one of them")
            continue
        claimed[target] = rel
        limit = limits.setdefault(target.parent, name_limit(target.parent))
        if len(os.fsencode(target.name)) > limit:
            fail(rel, f"its caption name is {len(os.fsencode(target.name))} bytes, longer than the {limit} "
                      "the file system takes; shorten the clip's name")
            continue
        kind, detail = existing_caption(target, job.caption_root)
        if kind == "folder":
            fail(rel, f"its caption path {shown(str(target))} is {detail}; move or rename it")
            continue
        if kind != "missing" and not job.overwrite:
            summary.skipped.append(rel)
            if kind == "text":
                summary.captions[rel] = detail
            else:
                why = f"an existing caption is kept as it is, not read: {detail}"
                summary.unread.append((rel, why))
                records.append(manifest_record(rel, None, skipped=why))
            continue
        todo.append(clip)
        targets[str(clip)] = (rel, target)
    unwritable = {}
    for folder in sorted({t.parent for _, t in targets.values()}):
        why = probe_writable(folder)
        if why is not None:
            unwritable[folder] = why
    if unwritable and len(unwritable) == len({t.parent for _, t in targets.values()}):
        folder, why = next(iter(unwritable.items()))
        more = f" nor {len(unwritable) - 1} other folder(s)" if len(unwritable) > 1 else ""
        raise OptionError("out", f"cannot write captions in {shown(str(folder))} ({why}){more}; "
                                 "make it writable, or write the captions to a writable folder (--out).")
    for clip in list(todo):
        rel, target = targets[str(clip)]
        if target.parent in unwritable:
            fail(rel, f"cannot write in {shown(str(target.parent))} ({unwritable[target.parent]}); "
                      "make the folder writable")
            todo.remove(clip)
            del targets[str(clip)]
    return FolderPlan(clips, todo, targets, summary, records)

