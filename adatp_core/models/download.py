"""Download a model repository from the Hugging Face Hub, safely and atomically.

Only done when a user asks for it (picking a catalog entry); never at import.

- Fetches only safetensors weights and the json, tokenizer and template files of
  the repository's top level (``ALLOWED_PATTERNS``): never ``.bin``/``.pt``/
  ``.pth``/``.ckpt`` pickles, never code. A repository whose weights are pickles
  only is refused from its file listing, before anything is written.
- Uses huggingface_hub, so HF_ENDPOINT (mirrors), HF_TOKEN (gated models) and
  HF_HUB_OFFLINE are honoured; the three are read at call time.
- Atomic: files go into a hidden ``.<name>.partial`` folder beside the final
  one, which is renamed into place only when every file is complete, so a
  half-finished download never looks like a model folder.
- Resumable: finished files stay in the partial folder and are not fetched
  again; huggingface_hub versions that keep ``.incomplete`` files (1.x) also
  continue a half-fetched file with an HTTP Range request.
- Deadlines: the listing and the access check have a connect timeout
  (CONNECT_TIMEOUT) and a read timeout (READ_TIMEOUT) of their own; a request
  with no answer after STALL_SECONDS, and a file whose stream brings no new
  chunk for STREAM_STALL_SECONDS, are given up, with an error naming the
  endpoint and what to check. huggingface_hub's client sets no read timeout on
  the listing and retries a silent server for minutes, and the pack never
  changes its global client or settings (other packs share them): each blocking
  call runs in a worker thread that the caller waits for, and abandons at a
  deadline or on Cancel.
- Progress in bytes and interruption through two callbacks, both called from
  the caller's thread (ComfyUI's progress bar and Cancel button): Cancel is
  seen within POLL_SECONDS, between chunks and while a request waits.
- Errors say what happened, the target folder, and the exact manual command.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable

from ..errors import AdaTPEnvironmentError, AdaTPInputError
from ..paths import bare_name
from .files import MARKER_FILE, PICKLE_SUFFIXES

log = logging.getLogger(__name__)

# Top-level files that a model folder needs: weights, configs, tokenizer, chat template.
ALLOWED_PATTERNS = ("*.safetensors", "*.json", "*.jinja", "*.tiktoken", "merges.txt", "vocab.txt",
                    "tokenizer.model", "spiece.model")
DISK_MARGIN = 64 * 1024 * 1024
MIN_FREE_ENV = "ADATP_MIN_FREE_GB"  # free disk space a catalog download must leave, in GB
NETWORK_MODULES = ("httpx", "httpx2", "httpcore", "requests", "urllib3", "h11", "ssl", "socket")
CONNECT_TIMEOUT = 10.0  # seconds to open a connection to the Hub
READ_TIMEOUT = 30.0  # seconds for an answer to a request
STALL_SECONDS = CONNECT_TIMEOUT + READ_TIMEOUT  # a request (or a file's first byte) not answered by then: given up
# While a file streams, huggingface_hub reads it with its own read timeout (HF_HUB_DOWNLOAD_TIMEOUT,
# 10 s, per socket read), resumes a broken stream with a Range request up to 5 times (about a
# minute on a silent server), and reports it in 10 MB chunks: no new chunk for this long is given
# up too (a link slower than about 85 KB/s).
STREAM_STALL_SECONDS = 120.0
POLL_SECONDS = 0.1  # how often a waiting download reports progress and checks Cancel

ProgressCallback = Callable[[int, int], None]  # (bytes done, bytes total)


class DownloadError(AdaTPEnvironmentError):
    """The download could not be done (offline, network, access, disk)."""


class HubStalled(TimeoutError):
    """A request got no answer, or a streaming file no new chunk, for ``seconds``."""

    def __init__(self, what: str, seconds: float):
        super().__init__(f"nothing received for {seconds:g} s while {what}")
        self.what, self.seconds = what, seconds


class _Abandoned(Exception):
    """Raised inside an abandoned worker at its next chunk, so that it stops writing."""


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None  # bytes, when the Hub says


@dataclass(frozen=True)
class DownloadPlan:
    """What one download fetches: files of one commit of one repository."""

    repo_id: str
    commit: str
    files: tuple[RemoteFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)


def folder_name(repo_id: str) -> str:
    """The local folder a repository goes into: its name ("owner/name" -> "name")."""
    return repo_id.rsplit("/", 1)[-1]


def is_model_folder(folder: Path) -> bool:
    return (folder / MARKER_FILE).is_file()


def partial_folder(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


def manual_command(repo_id: str, folder: Path) -> str:
    """The shell command that downloads the same files by hand (huggingface_hub's `hf` CLI).

    huggingface_hub >= 1.0 (which transformers 5 requires) ships only `hf`; the
    older `huggingface-cli` takes the same arguments after `download`.
    """
    includes = " ".join(f'--include "{p}"' for p in ALLOWED_PATTERNS)
    return f'hf download {repo_id} --local-dir "{folder}" {includes}'


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read now or when huggingface_hub was imported."""
    from huggingface_hub import constants

    return _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def _hub_settings() -> dict:
    """endpoint and token as huggingface_hub takes them; None means its own default."""
    return {"endpoint": os.environ.get("HF_ENDPOINT") or None, "token": os.environ.get("HF_TOKEN") or None}


def wanted_file(name: str) -> bool:
    """A top-level file the download fetches: a bare name (no '/', '\\', ':', '..', drive or
    UNC prefix, whatever huggingface_hub checks itself) matching ALLOWED_PATTERNS."""
    return bare_name(name) and any(fnmatch(name, p) for p in ALLOWED_PATTERNS)


def disk_floor() -> int:
    """Bytes to leave free after a catalog download: ADATP_MIN_FREE_GB (a server owner's
    setting, read at call time), or DISK_MARGIN (64 MiB) when unset."""
    value = os.environ.get(MIN_FREE_ENV, "").strip()
    if not value:
        return DISK_MARGIN
    try:
        gb = float(value)
    except ValueError:
        gb = float("nan")
    if not gb >= 0 or gb == float("inf"):
        raise AdaTPEnvironmentError(f"{MIN_FREE_ENV}={value!r} is not a number of GB >= 0; fix or unset it.")
    return max(DISK_MARGIN, int(gb * 1e9))


def select_files(repo_id: str, files: list[RemoteFile]) -> tuple[RemoteFile, ...]:
    """The files to fetch from a listing; refuses a repository without safetensors weights.

    Raises AdaTPInputError (pickle-only or no weights, no config.json).
    """
    wanted = tuple(f for f in files if wanted_file(f.name))
    names = {f.name for f in wanted}
    if not any(n.endswith(".safetensors") for n in names):
        pickles = sorted(f.name for f in files if f.name.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise AdaTPInputError(
                f"{repo_id} only has pickle weights ({', '.join(pickles[:3])}); they are never downloaded "
                "or loaded because unpickling can run arbitrary code. Pick a repository with "
                "safetensors weights (model*.safetensors).")
        raise AdaTPInputError(f"{repo_id} has no safetensors weights at its top level; it is not a "
                              "model repository that the pack can load.")
    if MARKER_FILE not in names:
        raise AdaTPInputError(f"{repo_id} has no {MARKER_FILE}; it is not a transformers model repository.")
    return wanted


def request_timeout() -> tuple[float, float, float, float]:
    """httpx's (connect, read, write, pool) timeouts for one request of the pack's own
    (huggingface_hub >= 1.0 sends its requests with httpx)."""
    return (CONNECT_TIMEOUT, READ_TIMEOUT, READ_TIMEOUT, CONNECT_TIMEOUT)


def plan_download(repo_id: str, check_interrupt: Callable[[], None] | None = None) -> DownloadPlan:
    """List the repository and check access, writing nothing. Network: two requests, each
    with request_timeout() and given up after STALL_SECONDS; check_interrupt as in download_model."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url

    hub = _hub_settings()
    check = check_interrupt or (lambda: None)
    info = call_with_deadline(
        lambda: HfApi(**hub).model_info(repo_id, files_metadata=True, timeout=request_timeout()),
        f"listing the files of {repo_id}", check)
    listing = [RemoteFile(s.rfilename, s.size) for s in (info.siblings or ())]
    plan = DownloadPlan(repo_id, info.sha, select_files(repo_id, listing))
    # Gated and private repositories list fine but refuse files: find out before writing.
    url = hf_hub_url(repo_id, MARKER_FILE, revision=plan.commit, endpoint=hub["endpoint"])
    call_with_deadline(lambda: get_hf_file_metadata(url, token=hub["token"], timeout=request_timeout()),
                       f"checking access to {repo_id}", check)
    return plan


# Worker threads that a download gave up on (Cancel, a stall) and that may still write into a partial
# folder: partial folder -> threads. A new download of the same model waits for them to end first.
_ABANDONED: dict[str, list[threading.Thread]] = {}
_ABANDONED_LOCK = threading.Lock()


def _abandoned_workers(partial: Path) -> list[threading.Thread]:
    with _ABANDONED_LOCK:
        alive = [t for t in _ABANDONED.get(str(partial), []) if t.is_alive()]
        if alive:
            _ABANDONED[str(partial)] = alive
        else:
            _ABANDONED.pop(str(partial), None)
        return alive


def _wait_for_abandoned(partial: Path, repo_id: str, check: Callable[[], None]) -> None:
    """An earlier download of ``repo_id`` in this process, cancelled or stalled, may still be writing
    into ``partial`` (its thread stops at its next chunk, or when huggingface_hub's own timeouts end
    its request). Wait for it, checking Cancel, at most STREAM_STALL_SECONDS; then refuse clearly
    rather than let two writers share the folder."""
    deadline = time.monotonic() + STREAM_STALL_SECONDS
    while _abandoned_workers(partial):
        check()
        if time.monotonic() > deadline:
            raise DownloadError(f"the earlier download of {repo_id}, cancelled or stalled, is still stopping "
                                f"(its request has not ended after {STREAM_STALL_SECONDS:g} s). Run again in a "
                                "minute, or restart ComfyUI; the files fetched so far are kept.")
        time.sleep(POLL_SECONDS)


def call_with_deadline(fn: Callable[[], object], what: str, check: Callable[[], None],
                       progress: "_ByteProgress | None" = None, partial: Path | None = None):
    """``fn()`` in a worker thread, waited for in this thread, which calls ``check()`` and
    reports ``progress`` every POLL_SECONDS.

    Whatever ``check()`` raises is raised at once, and HubStalled after STALL_SECONDS
    without an answer, or STREAM_STALL_SECONDS without a new chunk once ``progress``
    streams. Either way the worker is abandoned: a daemon thread, which stops at its
    next chunk (``progress`` raises there) or when huggingface_hub's own timeouts end
    its request; it writes only into the partial folder.
    """
    box: dict = {}
    done = threading.Event()

    def work():
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the waiting thread
            box["error"] = exc
        finally:
            done.set()

    started = time.monotonic()
    if progress is not None:
        progress.last_chunk = None
    worker = threading.Thread(target=work, name="adatp-download", daemon=True)
    worker.start()
    try:
        while not done.wait(POLL_SECONDS):
            check()
            last, limit = started, STALL_SECONDS
            if progress is not None:
                progress.report()
                if progress.last_chunk is not None:
                    last, limit = progress.last_chunk, STREAM_STALL_SECONDS
            if time.monotonic() - last > limit:
                raise HubStalled(what if progress is None else progress.describe(what), limit)
    except BaseException:
        if progress is not None:
            progress.abandon()
        if partial is not None:  # it may still write there: the next download of this model waits for it
            with _ABANDONED_LOCK:
                _ABANDONED.setdefault(str(partial), []).append(worker)
        raise
    if "error" in box:
        _add_note(box["error"], f"while {what}")
        raise box["error"]
    return box.get("value")


def _add_note(exc: BaseException, note: str) -> None:
    """BaseException.add_note (Python 3.11), which sets ``__notes__``, on 3.10 too."""
    try:
        exc.__notes__ = [*getattr(exc, "__notes__", ()), note]
    except (AttributeError, TypeError):  # an exception type that takes no attributes
        pass


class _ByteProgress:
    """Bytes done over the whole plan, fed by huggingface_hub's per-file progress bars in a
    worker thread, and reported to ``on_progress`` from the caller's thread."""

    def __init__(self, total: int, on_progress: ProgressCallback | None):
        self.total, self.done, self.current = total, 0, 0
        self.on_progress = on_progress
        self.last_chunk: float | None = None  # time.monotonic() of the current file's last chunk
        self.reported: tuple[int, int] | None = None
        self.abandoned = threading.Event()

    def report(self) -> None:
        value = (min(self.done + self.current, self.total), self.total)
        if self.on_progress is not None and value != self.reported:
            self.reported = value
            self.on_progress(*value)

    def alive(self) -> None:
        """A response or a chunk in the worker; raises there once the download is abandoned."""
        self.last_chunk = time.monotonic()
        if self.abandoned.is_set():
            raise _Abandoned()

    def abandon(self) -> None:
        self.abandoned.set()

    def describe(self, what: str) -> str:
        return f"{what} ({self.current / 1e6:.1f} MB of it received)" if self.current else what

    def file_done(self, size: int) -> None:
        self.done += size
        self.current = 0
        self.report()

    def bar_class(self) -> type:
        """A tqdm look-alike class for hf_hub_download's ``tqdm_class``."""
        progress = self

        class Bar:
            # Defining update_transfer makes huggingface_hub's Xet reporter send file bytes to
            # update() and network bytes here, so nothing is counted twice.
            def __init__(self, *args, **kwargs):
                self.n = kwargs.get("initial") or 0
                self.total = kwargs.get("total")
                progress.current = self.n
                progress.alive()

            def update(self, n=1):
                self.n += int(n or 0)
                progress.current += int(n or 0)
                progress.alive()

            def update_transfer(self, n=1):
                pass

            def close(self):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def __getattr__(self, name):  # set_postfix_str, refresh, set_description, ...
                if name.startswith("_"):
                    raise AttributeError(name)
                return lambda *args, **kwargs: None

        return Bar


def _is_network_error(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if type(exc).__module__.split(".")[0] in NETWORK_MODULES:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextmanager
def _explained_errors(repo_id: str, final: Path):
    """Turn huggingface_hub, network and disk errors into DownloadError with the way out.

    Anything else (an interruption above all) passes through unchanged.
    """
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError)

    manual = f"Or download it by hand:\n  {manual_command(repo_id, final)}"
    try:
        yield
    except OfflineModeIsEnabled as exc:
        raise DownloadError(f"cannot download {repo_id}: HF_HUB_OFFLINE is set. Unset it, or put the model "
                            f"into {final} yourself. {manual}") from exc
    except GatedRepoError as exc:
        raise DownloadError(
            f"{repo_id} is gated ({_status(exc)}): accept its terms on https://huggingface.co/{repo_id} and "
            f"set HF_TOKEN to a token of that account, then run again. Target folder: {final}. {manual}") from exc
    except RepositoryNotFoundError as exc:
        raise DownloadError(
            f"{repo_id} was not found or is private ({_status(exc)}); check the name, or set HF_TOKEN "
            f"to a token that can read it. Target folder: {final}. {manual}") from exc
    except HfHubHTTPError as exc:
        raise DownloadError(f"the Hub refused the download of {repo_id} ({_status(exc)}: "
                            f"{str(exc).splitlines()[0][:200]}); try again later. Target folder: {final}. "
                            f"{manual}") from exc
    except LocalEntryNotFoundError as exc:
        raise DownloadError(_network_message(repo_id, final, manual, exc)) from exc
    except OSError as exc:
        if _is_network_error(exc):
            raise DownloadError(_network_message(repo_id, final, manual, exc)) from exc
        if exc.errno is not None:  # disk full, read-only, permissions, a file in the way
            raise DownloadError(
                f"cannot write the download of {repo_id} under {final.parent}: {exc.strerror or exc} "
                f"({exc.filename or final.parent}). Free disk space or fix the folder's permissions (or add "
                f"another LLM folder first in extra_model_paths.yaml), then run again; finished files are "
                f"kept. {manual}") from exc
        raise
    except Exception as exc:
        if _is_network_error(exc):
            raise DownloadError(_network_message(repo_id, final, manual, exc)) from exc
        raise


def _status(exc) -> str:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return f"HTTP {code}" if code is not None else type(exc).__name__


def hub_endpoint() -> str:
    """The endpoint downloads go to: HF_ENDPOINT now, else huggingface_hub's."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def _network_message(repo_id: str, final: Path, manual: str, exc: BaseException) -> str:
    endpoint = hub_endpoint()
    step = next((n for n in getattr(exc, "__notes__", ()) if n.startswith("while ")), "while downloading")
    detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else 'no details'}"
    if isinstance(exc, HubStalled):
        why = str(exc)
    elif "timeout" in type(exc).__name__.lower() or isinstance(exc, TimeoutError):
        why = f"no answer in time {step} ({detail})"
    else:
        why = f"{detail}, {step}"
    return (f"cannot reach the Hugging Face Hub at {endpoint} to download {repo_id}: {why}. Check that this "
            f"machine reaches {endpoint}: HF_ENDPOINT (a mirror; unset it for huggingface.co), the proxy "
            f"(HTTPS_PROXY, HTTP_PROXY, NO_PROXY) and the firewall; without a network, set HF_HUB_OFFLINE=1 "
            f"and put the model into the target folder yourself. Finished files are kept: run again to "
            f"resume. Target folder: {final}. {manual}")


def _check_space(root: Path, partial: Path, plan: DownloadPlan) -> None:
    have = sum((partial / f.name).stat().st_size for f in plan.files if (partial / f.name).is_file())
    need = plan.total_bytes - have + disk_floor()
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise OSError(errno.ENOSPC, f"{need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free", str(root))


def _verify(partial: Path, plan: DownloadPlan) -> None:
    for f in plan.files:
        path = partial / f.name
        if not path.is_file() or (f.size is not None and path.stat().st_size != f.size):
            raise DownloadError(f"{plan.repo_id}: {f.name} is incomplete after the download; run again to "
                                f"resume (partial files are in {partial}).")


def download_model(repo_id: str, root, *, on_progress: ProgressCallback | None = None,
                   check_interrupt: Callable[[], None] | None = None) -> Path:
    """Download ``repo_id`` into ``root/<repo name>`` unless it is already there.

    root: a models/LLM folder. Returns the model folder. An existing model
        folder is returned at once, without any network access.
    on_progress(done, total): bytes over the whole download, called often.
    check_interrupt(): called every POLL_SECONDS while a request waits or a file
        streams; whatever it raises stops the download at once (the finished
        files are kept for the next run, a half-fetched one in the partial
        folder's incomplete area).
    on_progress and check_interrupt are called from this thread only.
    Raises DownloadError (offline, network, stalled, access, disk) or AdaTPInputError
    (the repository has no safetensors weights), both naming the target folder
    and the manual command where it helps.
    """
    root = Path(root).expanduser()
    final = root / folder_name(repo_id)
    if is_model_folder(final):
        return final
    if final.exists():
        raise DownloadError(f"{final} exists but is not a complete model folder (no {MARKER_FILE}); move it "
                            f"away and run again, or complete it by hand:\n  {manual_command(repo_id, final)}")
    if offline():
        raise DownloadError(f"{repo_id} is not downloaded yet and HF_HUB_OFFLINE is set. Unset it and run "
                            f"again, or download it on a connected machine into {final}:\n"
                            f"  {manual_command(repo_id, final)}")
    check = check_interrupt or (lambda: None)
    partial = partial_folder(final)
    with _explained_errors(repo_id, final):
        plan = plan_download(repo_id, check)
        _check_space(root, partial, plan)
        _wait_for_abandoned(partial, repo_id, check)
        partial.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s (%d files, %.2f GB) into %s", repo_id, len(plan.files), plan.total_bytes / 1e9,
                 final)
        _fetch(plan, partial, _ByteProgress(plan.total_bytes, on_progress), check)
        _verify(partial, plan)
        if is_model_folder(final):  # another process finished first
            shutil.rmtree(partial, ignore_errors=True)
            return final
        partial.rename(final)
    log.info("downloaded %s into %s", repo_id, final)
    return final


def _fetch(plan: DownloadPlan, partial: Path, progress: _ByteProgress, check: Callable[[], None]) -> None:
    from huggingface_hub import hf_hub_download

    hub = _hub_settings()
    bar = progress.bar_class()
    # Small files first: the configs are tiny, and the weights then dominate a resumed run.
    for f in sorted(plan.files, key=lambda f: (f.size or 0, f.name)):
        check()
        fetch = functools.partial(hf_hub_download, plan.repo_id, f.name, revision=plan.commit, local_dir=partial,
                                  tqdm_class=bar, **hub)
        call_with_deadline(fetch, f"fetching {f.name} of {plan.repo_id}", check, progress, partial)
        progress.file_done(f.size or 0)
