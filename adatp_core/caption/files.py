"""The file-system side of captioning, with no torch: names, atomic writes, claims, the manifest.

Everything here works on paths and bytes only, so a process that lists, claims or
writes captions (a clip job's planner, a test) imports it without the model side.
- names: any bytes (``shown``, ``name_record``), and where a clip's caption goes;
- safe writes and reads: never through a planted link, never half a file;
- claims: two runs on one folder never caption the same clip (``ClipClaim``);
- the manifest: JSON lines appended whole, even from two runs (``Manifest``).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import re
import socket
import stat
import tempfile
from pathlib import Path

from ..errors import OptionError
from ..paths import inside
from ..video import VIDEO_EXTENSIONS

CAPTION_SUFFIX = ".txt"


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


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str) -> str:
    """``text`` for a terminal or a log line: ``shown``, and control characters (a newline or an escape
    sequence in a file name) written as Python escapes (\\n, \\x1b), so a name takes one line and
    cannot move the cursor."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], shown(text))


def name_record(rel: str) -> dict:
    """The manifest's fields for a clip's relative path: ``path`` (readable), and
    ``path_b64`` (the exact bytes) when the name is not valid UTF-8."""
    record = {"path": shown(rel)}
    if record["path"] != rel:
        record["path_b64"] = base64.b64encode(os.fsencode(rel)).decode("ascii")
    return record


def valid_text(value, name: str) -> str:
    if not isinstance(value, str):
        raise OptionError(name, f"{name} must be text, got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise OptionError(name, f"{name} is not valid UTF-8 text (byte {shown(value[exc.start:exc.end])}); "
                                "type it again in UTF-8.") from None
    return value


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


def hold_file(path: Path, create: bool = True) -> int | None:
    """An open descriptor of the file at ``path`` (made if missing, when ``create``) holding its lock
    (flock on POSIX), or None when another open file holds it (another process, or another part of this
    one) or, without ``create``, when there is no file. The lock goes when the descriptor is closed or
    its process ends, however it ends: a lock that can be taken has no live holder, whatever the PIDs."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0) | _NOFOLLOW | _CLOEXEC, 0o600)
        except FileNotFoundError:
            if create:
                raise
            return None
        if not _try_lock(fd):
            os.close(fd)
            return None
        try:  # the previous holder may have removed the file: hold the one at the path
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
        if not create:
            return None


_HOLDER = re.compile(rb"pid (\d+) host (\S*)")


def _write_holder(fd: int) -> None:
    """Say in the claim file which process holds it (for a message naming it; the lock, not
    this text, decides whether the claim is held). From byte 1: Windows locks byte 0."""
    try:
        os.ftruncate(fd, 1)
        os.lseek(fd, 1, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()} host {socket.gethostname() or '-'}\n".encode("utf-8", "replace"))
    except OSError:  # a full disk: the claim holds all the same
        pass


class ClipClaim:
    """A lock on one caption, held while its clip is captioned: a hidden file beside
    the caption (a short fixed-length name) locked with flock. The lock goes when the
    process ends, however it ends, so a killed run never blocks the next one."""

    def __init__(self, target: Path):
        digest = hashlib.sha1(os.fsencode(target.name)).hexdigest()[:24]
        self.path = target.parent / f".adatp-claim-{digest}"
        self.fd = None

    def acquire(self) -> bool:
        self.fd = hold_file(self.path)
        if self.fd is None:
            return False
        _write_holder(self.fd)
        return True

    def holder(self) -> tuple[int, str] | None:
        """(pid, host) of the process holding this claim, as it wrote itself in; None if not said
        (a claim written by an older version, or one being taken right now)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(1)  # byte 0 is the Windows lock's (msvcrt locks it): read past it
                found = _HOLDER.search(f.read(300))
        except OSError:
            return None
        return (int(found[1]), found[2].decode("utf-8", "replace")) if found else None

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


def append_whole(fd: int, data: bytes) -> None:
    """Append ``data`` (whole lines) to the file open at ``fd`` (O_RDWR | O_APPEND): after a newline when
    its last line is unfinished (cut by a crash or another tool: the two would read as one bad line),
    and every byte of it (os.write may write fewer than asked)."""
    size = os.fstat(fd).st_size
    if size:
        if hasattr(os, "pread"):
            last = os.pread(fd, 1, size - 1)
        else:  # Windows: O_APPEND writes go to the end wherever the offset is
            os.lseek(fd, size - 1, os.SEEK_SET)
            last = os.read(fd, 1)
        if last != b"\n":
            data = b"\n" + data
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


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
            append_whole(self.fd, data)
        finally:
            if locked:
                _unlock(self.fd)

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

