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
- Progress in bytes and interruption through two callbacks, so that the node
  can map them to ComfyUI's progress bar and Cancel button.
- Errors say what happened, the target folder, and the exact manual command.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable

from ..errors import AdaTPEnvironmentError, AdaTPInputError
from ..paths import bare_name
from .loader import PICKLE_SUFFIXES

log = logging.getLogger(__name__)

# Top-level files that a model folder needs: weights, configs, tokenizer, chat template.
ALLOWED_PATTERNS = ("*.safetensors", "*.json", "*.jinja", "*.tiktoken", "merges.txt", "vocab.txt",
                    "tokenizer.model", "spiece.model")
MARKER_FILE = "config.json"  # a folder with it is a (complete) model folder
DISK_MARGIN = 64 * 1024 * 1024
MIN_FREE_ENV = "ADATP_MIN_FREE_GB"  # free disk space a catalog download must leave, in GB
NETWORK_MODULES = ("httpx", "httpx2", "httpcore", "requests", "urllib3", "h11", "ssl", "socket")

ProgressCallback = Callable[[int, int], None]  # (bytes done, bytes total)


class DownloadError(AdaTPEnvironmentError):
    """The download could not be done (offline, network, access, disk)."""


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


def plan_download(repo_id: str) -> DownloadPlan:
    """List the repository and check access, writing nothing. Network: two requests."""
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url

    hub = _hub_settings()
    info = HfApi(**hub).model_info(repo_id, files_metadata=True)
    listing = [RemoteFile(s.rfilename, s.size) for s in (info.siblings or ())]
    plan = DownloadPlan(repo_id, info.sha, select_files(repo_id, listing))
    # Gated and private repositories list fine but refuse files: find out before writing.
    get_hf_file_metadata(hf_hub_url(repo_id, MARKER_FILE, revision=plan.commit, endpoint=hub["endpoint"]),
                         token=hub["token"])
    return plan


class _ByteProgress:
    """Bytes done over the whole plan, fed by huggingface_hub's per-file progress bars."""

    def __init__(self, total: int, on_progress: ProgressCallback | None, check_interrupt: Callable[[], None]):
        self.total, self.done, self.current = total, 0, 0
        self.on_progress, self.check_interrupt = on_progress, check_interrupt
        self.stopped: BaseException | None = None  # an interruption raised inside huggingface_hub

    def report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(min(self.done + self.current, self.total), self.total)

    def advance(self, n) -> None:
        self.current += int(n or 0)
        self.report()
        try:
            self.check_interrupt()
        except BaseException as exc:
            # Xet downloads call back from hf_xet, which may swallow or wrap the exception, and
            # ComfyUI's check clears its flag as it raises: keep it to raise it again ourselves.
            self.stopped = exc
            raise

    def raise_if_stopped(self) -> None:
        if self.stopped is not None:
            raise self.stopped

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
                progress.report()

            def update(self, n=1):
                self.n += int(n or 0)
                progress.advance(n)

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


def _network_message(repo_id: str, final: Path, manual: str, exc: BaseException) -> str:
    from huggingface_hub import constants

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    return (f"cannot reach the Hugging Face Hub at {endpoint} to download {repo_id} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else 'no details'}). "
            f"Check the connection (or HF_ENDPOINT for a mirror) and run again; finished files are kept. "
            f"Target folder: {final}. {manual}")


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
    check_interrupt(): called between chunks and files; whatever it raises
        stops the download (the finished files are kept for the next run).
    Raises DownloadError (offline, network, access, disk) or AdaTPInputError
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
        plan = plan_download(repo_id)
        _check_space(root, partial, plan)
        partial.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s (%d files, %.2f GB) into %s", repo_id, len(plan.files), plan.total_bytes / 1e9,
                 final)
        _fetch(plan, partial, _ByteProgress(plan.total_bytes, on_progress, check), check)
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
        try:
            hf_hub_download(plan.repo_id, f.name, revision=plan.commit, local_dir=partial, tqdm_class=bar, **hub)
        except Exception:
            progress.raise_if_stopped()
            raise
        progress.raise_if_stopped()
        progress.file_done(f.size or 0)
