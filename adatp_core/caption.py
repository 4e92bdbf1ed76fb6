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

import base64
import errno
import hashlib
import json
import logging
import multiprocessing
import os
import re
import stat
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path

from .attention import QUERY_MODES, _check_max_pixels, check_question, check_video_fits
from .budget import check_memory
from .decode_worker import watch_parent_process
from .batching import check_batch_size, decode_together
from .errors import AdaTPInputError, AdaTPTransformersError
from .paths import confined, inside
from .pipeline import PipelineConfig, prefill, run_pipeline
from .prune import check_retention
from .video import (MAX_FRAMES, SAMPLING_MODES, VIDEO_EXTENSIONS, SamplePlan, decode_plan, frames_to_image,
                    plan_sampling)

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
    skipped: str | None = None  # not captioned on purpose (another run took it): why

    @property
    def ok(self) -> bool:
        return self.error is None and self.skipped is None


class DecodeAhead:
    """Decodes ``paths`` in order, up to ``depth`` clips ahead of the consumer, in
    ``workers`` processes (0: in the consumer's process, when asked for).

    processes False runs the workers as threads: decord still decodes in its own
    child process (decode_worker.py), and a host application whose main script
    must not be re-imported by spawned workers (ComfyUI's main.py) stays safe.
    Iterating yields (path, get) with get() -> (frames uint8 [T, H, W, 3], info),
    raising the clip's error. A worker that dies (a decoder crash, in the probe or
    the decoding) fails only the clip it was working on; the pool is restarted.
    Each clip is probed in a worker, which returns its sampling plan; the plan is
    checked in this process (check(plan) raises to fail the clip undecoded;
    default: its frames must fit in the host's memory; caption_videos also checks
    the model's context and input), and only then decoded, in a worker again.
    """

    def __init__(self, paths: Iterable, cfg: PipelineConfig, workers: int = 2, depth: int | None = None,
                 processes: bool = True, check: Callable[[SamplePlan], object] | None = None):
        _check_workers(workers)
        self.paths = [str(p) for p in paths]
        # Plain arguments: a worker process then imports video.py alone (no torch).
        self.args = (cfg.num_frames, cfg.sampling, cfg.fps, cfg.start_time, cfg.end_time)
        self.check = check or (lambda plan: check_memory(plan.memory(), plan.name))
        self.workers = workers
        self.processes = processes
        self.depth = max(1, depth if depth is not None else workers + 1)
        self.pool = None
        self.pending: deque[_Ahead] = deque()

    def _start_pool(self) -> None:
        if self.processes:  # spawn: never fork a process that holds a model and torch's threads
            # Each worker ends when this process ends, however it ends (SIGKILL included).
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=watch_parent_process)
        else:
            self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="adatp-decode")

    def _submit(self, path: str) -> None:
        self.pending.append(_Ahead(path, self.pool.submit(plan_sampling, path, *self.args)))

    def _decode_ready(self) -> None:
        """Every clip whose probe came back is checked here and, when it passes, sent to decode:
        decoding goes on ahead of the consumer as before the check existed."""
        for entry in self.pending:
            if (entry.decoding is None and entry.planned.done()
                    and not isinstance(entry.planned.exception(), BrokenProcessPool)):  # _result restarts the pool
                self._start_decoding(entry)

    def _start_decoding(self, entry: _Ahead) -> None:
        """Check the clip's plan and send it to decode; a plan that fails the check (or a probe that
        raised) leaves its error in ``entry.decoding``, for get() to raise."""
        try:
            plan = entry.planned.result()
            self.check(plan)
        except BrokenProcessPool:
            raise
        except AdaTPTransformersError:  # the model failing, not the clip: the run stops
            raise
        except Exception as exc:  # noqa: BLE001  the probe's or the check's error fails this clip only
            entry.decoding = Future()
            entry.decoding.set_exception(exc)
        else:
            entry.decoding = self.pool.submit(decode_plan, plan)

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

    def _inline(self, path: str):
        plan = plan_sampling(path, *self.args)
        self.check(plan)
        return decode_plan(plan)

    def __iter__(self) -> Iterator[tuple[str, Callable]]:
        if not self.workers:
            for path in self.paths:
                yield path, (lambda p=path: self._inline(p))
            return
        queue = deque(self.paths)
        while queue or self.pending:
            while queue and len(self.pending) < self.depth:
                self._submit(queue.popleft())
            self._decode_ready()
            entry = self.pending.popleft()
            yield entry.path, lambda e=entry: self._result(e)

    def _result(self, entry: _Ahead):
        try:
            if entry.decoding is None:  # its probe is still running: wait for it here
                entry.planned.result()
                self._start_decoding(entry)
            return entry.decoding.result()
        except BrokenProcessPool as exc:
            # Every queued clip shared the dead pool: probe and decode them again in a new one.
            redo = [e.path for e in self.pending]
            self.pending.clear()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self._start_pool()
            for p in redo:
                self._submit(p)
            raise AdaTPInputError("the decoder process died on this clip (a decoder crash); "
                                  "re-export it as MP4 (H.264).") from exc
        finally:
            if self.pool is not None and self.pending:
                self._decode_ready()


@dataclass
class _Ahead:
    """One clip in DecodeAhead: its probe in a worker (planned: a SamplePlan), then, once checked
    here, its decoding in a worker (None until then)."""

    path: str
    planned: Future
    decoding: Future | None = None


def fits_check(model, prompt: str, cfg: PipelineConfig) -> Callable[[SamplePlan], dict]:
    """DecodeAhead's check: a clip whose plan cannot fit the model's context or memory fails
    before it is decoded (check_video_fits)."""
    return lambda plan: check_video_fits(model, plan, [prompt], cfg.max_pixels)


def clip_stats(stats: dict) -> dict:
    """The figures a caption run reports per clip, from a pipeline's stats (with, for a clip
    that decoded only in part, how many of its frames are their own and which are not)."""
    ms = stats.get("decode_ms_per_token") or 0.0
    return {
        "tokens_kept": stats["tokens_kept"], "tokens_total": stats["tokens_total"],
        "flops_ratio": round(stats["flops_ratio"], 6),
        "ttft_s": round(stats.get("time_to_first_token", 0.0), 4),
        "tokens_per_s": round(1000.0 / ms, 2) if ms else None,
        "new_tokens": stats.get("new_tokens", 0),
        **{key: stats[key] for key in ("frames_own_time", "frames_substituted")
           if stats.get("frames_substituted")},
    }


class OptionError(AdaTPInputError):
    """A setting that fits no clip; ``option`` names it (the CLI shows its --option)."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


def _check_workers(workers) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or not 0 <= workers <= MAX_WORKERS:
        raise AdaTPInputError(f"decode workers must be an integer from 0 to {MAX_WORKERS}, got {workers!r}")


def _check_prompt(prompt) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise AdaTPInputError(f"the caption prompt is empty; write an instruction such as {DEFAULT_PROMPT!r}.")
    check_question(prompt)


def _check_frames(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_FRAMES:
        raise AdaTPInputError(f"frames must be an integer from 1 to {MAX_FRAMES}, got {n!r} (32 is usual)")


def _check_layer(layer) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise AdaTPInputError(f"layer must be an integer >= 0, got {layer!r} (2 is usual)")


def _check_choice(value, choices, name) -> None:
    if value not in choices:
        raise AdaTPInputError(f"{name} must be one of {choices}, got {value!r}")


def check_options(prompt: str, cfg: PipelineConfig, workers: int | None = None) -> None:
    """Every setting that can be checked without the model, so a bad one stops the run
    before the model loads. Raises OptionError naming the setting."""
    checks = [("prompt", _check_prompt, prompt), ("frames", _check_frames, cfg.num_frames),
              ("sampling", lambda v: _check_choice(v, SAMPLING_MODES, "sampling"), cfg.sampling),
              ("query", lambda v: _check_choice(v, QUERY_MODES, "query"), cfg.query),
              ("retention", lambda v: v is None or check_retention(v), cfg.retention),
              ("layer", _check_layer, cfg.layer), ("max_pixels", _check_max_pixels, cfg.max_pixels)]
    if workers is not None:
        checks.append(("workers", _check_workers, workers))
    for option, check, value in checks:
        try:
            check(value)
        except AdaTPInputError as exc:
            raise OptionError(option, str(exc)) from exc


def check_settings(model, prompt: str, cfg: PipelineConfig) -> None:
    """Settings that would fail every clip fail once, before any clip is decoded."""
    check_options(prompt, cfg)
    try:
        model.adapter.resolve_layer(int(cfg.layer))
    except AdaTPInputError as exc:
        raise OptionError("layer", str(exc)) from exc


def caption_videos(model, videos: Iterable, prompt: str = DEFAULT_PROMPT, cfg: PipelineConfig | None = None,
                   workers: int = 2, processes: bool = True,
                   claim: Callable[[str], str | None] | None = None, batch_size: int = 1,
                   on_step: Callable[[], None] | None = None) -> Iterator[ClipResult]:
    """Caption each video in ``videos`` (paths) with ``run_pipeline``; one result per clip, in order.

    A clip that cannot be used (corrupt, empty, too short: AdaTPInputError) gives
    a result with ``error`` set; any other exception is the model failing and
    ends the iteration by propagating. Stats also hold ``time_wait`` (the model
    waiting for frames) and ``time_model``. workers, processes: see DecodeAhead.
    claim(path), when given, runs just before a decoded clip goes to the model: it
    returns None to go on, or why the clip is left alone (a ``skipped`` result);
    an AdaTPInputError from it fails that clip.
    batch_size: clips decoded together (batching.py; 0: auto). on_step() runs
    between decode steps and may raise (Cancel).
    """
    # Each clip is seen once: keeping its video prefix for a next question would only take memory.
    cfg = replace(cfg or PipelineConfig(), reuse_prefix=False)
    check_settings(model, prompt, cfg)
    moved = model.adapter.resolve_layer(int(cfg.layer))[1]
    if moved:  # a hybrid model: said once for the run (each clip's stats say it too)
        log.warning("layer: %s", moved)
    if check_batch_size(batch_size) != 1:
        yield from _caption_together(model, videos, prompt, cfg, workers, processes, claim, batch_size, on_step)
        return
    with DecodeAhead(videos, cfg, workers, processes=processes, check=fits_check(model, prompt, cfg)) as ahead:
        for path, get in ahead:
            wait_start = time.perf_counter()
            try:
                frames, info = get()
            except AdaTPTransformersError:  # the model failing in the check, not the clip: the run stops
                raise
            except Exception as exc:  # noqa: BLE001  whatever stops one clip's decoding fails that clip only
                error = str(exc) if isinstance(exc, AdaTPInputError) else f"{exc.__class__.__name__}: {exc}"
                yield ClipResult(path, None, error=error)
                continue
            left = _claimed(claim, path)
            if left is not None:
                yield left
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


def _claimed(claim, path) -> ClipResult | None:
    """None when ``claim`` (caption_videos) lets the clip go to the model; else its result."""
    if claim is None:
        return None
    try:
        why = claim(path)
    except AdaTPInputError as exc:
        return ClipResult(path, None, error=str(exc))
    return None if why is None else ClipResult(path, None, skipped=why)


def _caption_together(model, videos, prompt, cfg, workers, processes, claim, batch_size,
                      on_step) -> Iterator[ClipResult]:
    """caption_videos with clips decoded together: each clip prefilled alone, then joining the batch.
    A clip is claimed when the batch takes it in (before its frames are waited for)."""
    times: dict[str, tuple[float, float]] = {}  # path: (waited for frames, prefill seconds)
    order: deque[str] = deque()  # clips taken in, not yet yielded
    ready: dict[str, ClipResult] = {}  # finished out of order, or left alone at their claim

    def clips(ahead):
        for path, get in ahead:
            order.append(path)
            left = _claimed(claim, path)
            if left is not None:
                ready[path] = left
                continue
            yield path, lambda path=path, get=get: prefill_clip(path, get)

    def prefill_clip(path, get):
        wait_start = time.perf_counter()
        try:
            frames, info = get()
        except AdaTPTransformersError:  # the model failing in the check, not the clip: the run stops
            raise
        except Exception as exc:  # noqa: BLE001  whatever stops one clip's decoding fails that clip only
            raise AdaTPInputError(str(exc) if isinstance(exc, AdaTPInputError)
                                  else f"{exc.__class__.__name__}: {exc}") from exc
        model_start = time.perf_counter()
        state = prefill(model, frames_to_image(frames), prompt, cfg, video_info=info)
        times[path] = (model_start - wait_start, time.perf_counter() - model_start)
        return state

    def result(done) -> ClipResult:
        if done.error is not None:
            times.pop(done.key, None)
            return ClipResult(done.key, None, error=done.error)
        wait, seconds = times.pop(done.key)
        stats = {**clip_stats(done.answer.stats), "time_wait": round(wait, 4),
                 "time_model": round(seconds + done.answer.stats["time_decode_share"], 4),
                 "batch_size": done.answer.stats["batch_size"]}
        return ClipResult(done.key, done.answer.text.strip(), stats)

    def in_order():
        while order and order[0] in ready:
            yield ready.pop(order.popleft())

    # Results go out in clip order, as at batch 1: a clip that finishes early waits for the
    # clips before it (at most a batch's worth). If the run stops (Cancel, a model failure),
    # the finished ones still go out first, to be written (and their claims released).
    with DecodeAhead(videos, cfg, workers, processes=processes, check=fits_check(model, prompt, cfg)) as ahead:
        try:
            for done in decode_together(model, cfg.generation, clips(ahead), batch_size, on_step):
                ready[done.key] = result(done)
                yield from in_order()
            yield from in_order()
        except (Exception, KeyboardInterrupt):
            for path in order:
                if path in ready:
                    yield ready.pop(path)
            raise


# --- names: any bytes ---------------------------------------------------------------------------
# File names are bytes on POSIX; Python holds undecodable bytes as lone surrogates
# (surrogateescape). Text meant for people or JSON shows such a byte as \xNN, and the
# manifest adds the exact name in base64 ("path_b64") whenever it is not UTF-8.

def shown(text: str) -> str:
    """``text`` as valid Unicode: undecodable bytes of a file name become \\xNN."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the name's own bytes
    except UnicodeEncodeError:  # a surrogate that stands for no byte (broken text, not a name)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def name_record(rel: str) -> dict:
    """The manifest's fields for a clip's relative path: ``path`` (readable), and
    ``path_b64`` (the exact bytes) when the name is not valid UTF-8."""
    record = {"path": shown(rel)}
    if record["path"] != rel:
        record["path_b64"] = base64.b64encode(os.fsencode(rel)).decode("ascii")
    return record


def _valid_text(value, name: str) -> str:
    if not isinstance(value, str):
        raise OptionError(name, f"{name} must be text, got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise OptionError(name, f"{name} is not valid UTF-8 text (byte {shown(value[exc.start:exc.end])}); "
                                "type it again in UTF-8.") from None
    return value


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


def caption_path(clip: Path, folder: Path, out: Path | None = None) -> Path:
    """clip.mp4 -> clip.txt beside it, or at the same relative path under ``out``."""
    target = Path(out) / Path(clip).relative_to(folder) if out is not None else Path(clip)
    return target.with_suffix(CAPTION_SUFFIX)


# --- safe writes and reads (never through a planted link) ---------------------------------------

MAX_CAPTION_BYTES = 1 << 20  # an existing caption larger than this is counted, not read
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
STOPPING_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # every later write fails too


def _file_mode() -> int:
    """The mode a plain open() would give a new file (0o666 less the umask)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def make_temp_file(folder: Path) -> tuple[int, Path]:
    """A new hidden file in ``folder`` with a short random name (it fits any name limit),
    created with O_EXCL: never an existing file, never through a link."""
    fd, name = tempfile.mkstemp(prefix=".adatp-", suffix=".tmp", dir=folder)
    return fd, Path(name)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a new temporary file beside ``path``, then rename it over
    ``path``: a crash leaves the old file or the new one, never half of one. A link
    at ``path`` is replaced, never followed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp_file(path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), _file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def probe_writable(folder: Path) -> str | None:
    """None when a file can be created in ``folder`` (made if missing), else why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = make_temp_file(folder)
        os.close(fd)
        tmp.unlink()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def name_limit(folder: Path) -> int:
    """The longest file name, in bytes, the file system under ``folder`` takes."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            try:
                return os.pathconf(parent, "PC_NAME_MAX")
            except (OSError, ValueError, AttributeError):
                break
    return 255


def read_caption_text(path: Path) -> tuple[str | None, str | None]:
    """(text, None), or (None, why it is not read): not a regular file, too large,
    not UTF-8. Opened without following a link and without blocking on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
    except OSError as exc:
        return None, f"cannot be opened ({exc.strerror})"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file"
        if st.st_size > MAX_CAPTION_BYTES:
            return None, f"larger than {MAX_CAPTION_BYTES >> 20} MiB"
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_CAPTION_BYTES + 1)
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "not valid UTF-8 text"


def existing_caption(target: Path, root: Path) -> tuple[str, str | None]:
    """What is at a caption path: ("missing", None), ("folder", why), ("text", the
    text) or ("unread", why it counts as present but is not read). A link is read
    only when it resolves to a file inside ``root``."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return "missing", None
    except OSError as exc:
        return "unread", f"cannot be inspected ({exc.strerror})"
    real = str(target)
    if stat.S_ISLNK(st.st_mode):
        real = os.path.realpath(target)
        if os.path.isdir(real):
            return "folder", "a link to a folder"
        if not os.path.exists(real):
            return "unread", "a broken symbolic link"
        if not inside(os.path.realpath(root), real):
            return "unread", "a symbolic link out of the folder"
    elif stat.S_ISDIR(st.st_mode):
        return "folder", "a folder"
    text, why = read_caption_text(Path(real))
    return ("text", text) if why is None else ("unread", why)


# --- claims: two runs on one folder never caption the same clip ---------------------------------

def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except (BlockingIOError, PermissionError):
        return False


class ClipClaim:
    """A lock on one caption, held while its clip is captioned: a hidden file beside
    the caption (a short fixed-length name) locked with flock. The lock goes when the
    process ends, however it ends, so a killed run never blocks the next one."""

    def __init__(self, target: Path):
        digest = hashlib.sha1(os.fsencode(target.name)).hexdigest()[:24]
        self.path = target.parent / f".adatp-claim-{digest}"
        self.fd = None

    def acquire(self) -> bool:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o600)
            if not _try_lock(fd):
                os.close(fd)
                return False
            try:  # the previous holder may have removed the file: hold the one at the path
                same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return True
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


# --- the manifest -------------------------------------------------------------------------------

def check_manifest(path: Path) -> None:
    """A manifest path that can be appended to: not a folder, in a folder that can be
    made and written. Raises OptionError("manifest") naming the path."""
    def refuse(why):
        raise OptionError("manifest", f"the manifest {shown(str(path))} {why}")

    if path.is_dir():
        refuse("is a folder; give a file name, for example "
               f"{shown(str(path / 'captions.jsonl'))}.")
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        refuse(f"is named like a video; JSON lines would be appended to it. Give a name such as "
               f"{shown(str(path.with_suffix('.jsonl')))}.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _CLOEXEC, 0o666))
    except OSError as exc:
        refuse(f"cannot be written ({exc.strerror}); choose a file in a writable folder.")


class Manifest:
    """Appends JSON lines to a file. Each line is one write on an O_APPEND descriptor
    under a lock, after a newline if the file's last line lacks one (a line cut by a
    crash or another tool), so records never glue together, even from two runs."""

    def __init__(self, path: Path):
        check_manifest(path)
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | _CLOEXEC, 0o666)

    def write_lines(self, lines: list[str]) -> None:
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        if not data:
            return
        locked = _lock_blocking(self.fd)
        try:
            if self._last_byte() not in (b"", b"\n"):
                data = b"\n" + data
            os.write(self.fd, data)
        finally:
            if locked:
                _unlock(self.fd)

    def _last_byte(self) -> bytes:
        size = os.fstat(self.fd).st_size
        if not size:
            return b""
        if hasattr(os, "pread"):
            return os.pread(self.fd, 1, size - 1)
        with open(self.path, "rb") as f:  # Windows
            f.seek(size - 1)
            return f.read(1)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _lock_blocking(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:
        return False
    fcntl.flock(fd, fcntl.LOCK_EX)
    return True


def _unlock(fd: int) -> None:
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_UN)


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
            _valid_text(getattr(self, name), name)
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


@dataclass
class CaptionSummary:
    """What a folder run did. captions: every clip that has a readable caption now
    (written this run or found), in clip order, as {path: text}. skipped: clips that
    already had a caption (unread: those whose caption is not read, and why);
    others: clips another run at the same time took; folders: subfolders left out."""

    found: int = 0
    done: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: list = field(default_factory=list)  # (path, reason)
    captions: dict = field(default_factory=dict)
    model_error: str | None = None
    seconds: float = 0.0
    model_seconds: float = 0.0
    unread: list = field(default_factory=list)  # (path, why)
    others: list = field(default_factory=list)
    folders: list = field(default_factory=list)  # (path, why)
    write_error: str | None = None
    manifest: str | None = None
    batch_size: int = 1  # clips decoded together (the number auto chose, when auto)

    @property
    def busy_fraction(self) -> float:
        return self.model_seconds / self.seconds if self.seconds > 0 else 0.0

    @property
    def clips_per_minute(self) -> float:
        return 60.0 * len(self.done) / self.seconds if self.seconds > 0 else 0.0

    def exit_code(self) -> int:
        """0, unless the model or the disk failed (2) or no clip has a caption (1)."""
        if self.model_error or self.write_error:
            return 2
        return 0 if self.captions or self.skipped or self.done or self.others else 1

    def to_dict(self) -> dict:
        return {"found": self.found, "done": self.done, "skipped": self.skipped,
                "failed": [list(f) for f in self.failed], "captions": self.captions,
                "model_error": self.model_error, "seconds": self.seconds, "model_seconds": self.model_seconds,
                "unread": [list(f) for f in self.unread], "others": self.others,
                "folders": [list(f) for f in self.folders], "write_error": self.write_error,
                "manifest": self.manifest, "batch_size": self.batch_size}

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
            total.unread += [tuple(f) for f in p.get("unread", [])]
            total.others += p.get("others", [])
            total.folders += [tuple(f) for f in p.get("folders", []) if tuple(f) not in total.folders]
            total.write_error = total.write_error or p.get("write_error")
            total.manifest = total.manifest or p.get("manifest")
            total.batch_size = max(total.batch_size, p.get("batch_size", 1))
        total.captions = dict(sorted(total.captions.items()))
        return total

    def text(self, processes: int = 1, names: int = 3) -> str:
        """The report: counts, speed, then failures grouped by reason (how many, the
        first ``names`` names of each; every name is in the manifest)."""
        lines = [f"Captioned {len(self.done)} clip(s), skipped {len(self.skipped)} already captioned, "
                 f"failed {len(self.failed)}, of {self.found} found."]
        if self.others:
            lines.append(f"{len(self.others)} clip(s) left to another run captioning the same folder now.")
        if self.done:
            busy = self.model_seconds / (self.seconds * processes) if self.seconds > 0 else 0.0
            lines.append(f"{self.clips_per_minute:.1f} clips/min over {self.seconds:.1f} s; model busy "
                         f"{100 * busy:.0f}% of the time (the rest it waited for decoding)")
            if self.batch_size != 1:
                lines.append(f"Decoded up to {self.batch_size} clips together.")
        for title, entries in (("failed", self.failed), ("kept, not read", self.unread),
                               ("folder skipped", self.folders)):
            lines += grouped(title, entries, names)
        if any(len(v) > names for v in _groups(self.failed).values()):
            where = f"in the manifest {shown(self.manifest)}" if self.manifest else "with --manifest FILE"
            lines.append(f"  (every failed clip is listed {where})")
        if self.write_error:
            lines.append(f"Writing failed, run stopped: {self.write_error}")
        if self.model_error:
            lines.append(f"The model failed, run stopped: {self.model_error}")
        elif not (self.captions or self.skipped or self.done or self.others):
            lines.append("Nothing could be captioned.")
        return "\n".join(lines)


def _reason_key(rel: str, reason: str) -> str:
    """A failure's reason with the clip's own name taken out, so clips failing for
    the same reason group together."""
    for name in sorted({rel, Path(rel).name}, key=len, reverse=True):
        if Path(name).suffix:  # a clip's name; a folder's ("loop") could be any word of the reason
            reason = reason.replace(name, "<clip>")
    return shown(reason)


def _groups(entries) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for rel, reason in entries:
        groups.setdefault(re.sub(r"\d+(\.\d+)?", "#", _reason_key(rel, reason)), []).append(rel)
    return groups


def grouped(title: str, entries, names: int = 3) -> list[str]:
    """Summary lines for (path, reason) entries, one group per reason, largest first."""
    reasons = {}
    for rel, reason in entries:
        reasons.setdefault(re.sub(r"\d+(\.\d+)?", "#", _reason_key(rel, reason)), _reason_key(rel, reason))
    lines = []
    for key, rels in sorted(_groups(entries).items(), key=lambda kv: -len(kv[1])):
        more = f" and {len(rels) - names} more" if len(rels) > names else ""
        lines.append(f"  {title} ({len(rels)}): {reasons[key]}")
        lines.append(f"    {', '.join(shown(r) for r in rels[:names])}{more}")
    return lines


def manifest_line(path: str, result: ClipResult | None, text: str | None = None, error: str | None = None) -> str:
    return json.dumps(manifest_record(path, result, text, error), ensure_ascii=False)


def manifest_record(path: str, result: ClipResult | None, text: str | None = None, error: str | None = None,
                    skipped: str | None = None) -> dict:
    record = name_record(path)
    if skipped is not None:
        record["skipped"] = shown(skipped)
    elif error is None:
        record["caption"] = text
        record.update(result.stats if result is not None else {})
    else:
        record["error"] = shown(error)
    return record


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
    Each clip is claimed (ClipClaim) just before the model takes it, so two runs
    on one folder never caption the same clip; a caption another run wrote
    meanwhile is kept unless ``job.overwrite``.
    A model failure stops the run and is reported in ``model_error``; a full disk
    in ``write_error``; any other failed write fails that clip.
    """
    check_settings(model, job.prompt, job.pipeline)
    if plan is None:
        plan = plan_folder(job, shard)
    summary, targets = plan.summary, plan.targets
    sink = Manifest(manifest) if manifest is not None else None
    summary.manifest = str(manifest) if manifest is not None else None
    held: dict[str, ClipClaim] = {}
    begun = time.time()  # with overwrite, a caption newer than this is another run's of this same job

    def written_since_we_began(target: Path) -> bool:
        try:
            return os.lstat(target).st_mtime >= begun
        except OSError:
            return False

    def claim(path: str) -> str | None:
        target = targets[path][1]
        lock = ClipClaim(target)
        try:
            got = lock.acquire()
        except OSError as exc:
            raise AdaTPInputError(f"cannot write in {shown(str(target.parent))} ({exc.strerror})") from exc
        if not got:
            return "another run is captioning it now"
        if os.path.lexists(target) and (not job.overwrite or written_since_we_began(target)):
            lock.release()
            return "another run captioned it meanwhile"
        held[path] = lock
        return None

    if on_plan is not None:
        on_plan(len(plan.todo))
    start = time.perf_counter()

    def log_records(records: list) -> None:
        """Append to the manifest; a failed write (a full disk) stops the run like a failed caption write."""
        if sink is None or not records or summary.write_error:
            return
        try:
            sink.write_lines([json.dumps(r, ensure_ascii=False) for r in records])
        except OSError as exc:
            summary.write_error = f"cannot write the manifest {shown(str(manifest))} ({exc.strerror or exc})"

    try:
        log_records(plan.records)
        if summary.write_error:
            return summary
        stopped = []

        def step() -> None:
            try:
                on_step()
            except BaseException as exc:
                stopped.append(exc)
                raise

        results = caption_videos(model, plan.todo, job.prompt, job.pipeline, job.workers, job.processes, claim,
                                 job.batch_size, step if on_step is not None else None)
        while True:
            try:
                result = next(results, None)
            except Exception as exc:  # the model (or the machine) failed, not one clip
                if stopped:  # an interrupt between decode steps, not a failure
                    raise
                log.exception("captioning stopped")
                summary.model_error = f"{exc.__class__.__name__}: {shown(str(exc))}"
                break
            if result is None:
                break
            rel, target = targets[result.path]
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
                        summary.model_seconds += result.stats["time_model"]
                        summary.batch_size = result.stats.get("batch_size", summary.batch_size)
                        record = manifest_record(rel, result, text)
                else:
                    summary.failed.append((rel, result.error))
                    record = manifest_record(rel, result, error=result.error)
            finally:
                lock = held.pop(result.path, None)
                if lock is not None:
                    lock.release()
            if record is not None:
                log_records([record])
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
        for lock in held.values():
            lock.release()
        if sink is not None:
            sink.close()
    order = {c.relative_to(job.folder).as_posix(): k for k, c in enumerate(plan.clips)}
    summary.captions = dict(sorted(summary.captions.items(), key=lambda kv: order.get(kv[0], len(order))))
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
