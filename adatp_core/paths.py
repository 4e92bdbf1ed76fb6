"""Path checks for names and folders that a remote client controls.

A ComfyUI server may be on a network: every node input is a stranger's input.
These helpers answer two questions without opening anything:

- ``bare_name``: is a name one plain file or folder name (no separator, no
  ``..``, no drive, nothing that another OS would read as a path)? Used for
  model names, weight-index entries and downloaded file names.
- ``inside`` / ``check_inside``: is a path inside a root after resolving
  symlinks? Used for Load Video, Caption Folder and every clip it lists.

Both take the ``os.path`` flavour as an argument so that Windows rules
(``ntpath``) are tested on any OS.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import AdaTPInputError

NAME_MAX_BYTES = 255  # one file or folder name (ext4, XFS, btrfs, APFS; NTFS counts UTF-16 units)
PATH_MAX_BYTES = 4096  # a whole path (Linux's PATH_MAX)
SHOWN_CHARS = 60  # of a long name in a message

# Characters that make a name more than one name somewhere: separators of POSIX and Windows, the
# drive/stream colon (C:name, name:stream), and NUL.
_PATH_CHARS = ("/", "\\", ":", "\x00")


def check_name(name, what: str) -> str:
    """``name`` (a file or folder name or a path, as a client typed it) if it can name anything
    at all; else AdaTPInputError saying what is wrong and what to do. Opens nothing.

    Refused: a value that is not text; text that is not valid Unicode (a lone surrogate, which
    JSON can carry and no file-system encoding takes); a part over 255 bytes or a whole over
    4096 bytes in UTF-8, which the OS would refuse with "File name too long". Empty names, NUL
    and what a name may point at are the callers' rules.
    """
    if not isinstance(name, str):
        raise AdaTPInputError(f"the {what} name must be text, got {type(name).__name__} {short_repr(name)}; "
                              f"pick a {what} from the list or type its name.")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise AdaTPInputError(f"the {what} name {short_repr(name)} holds {name[exc.start]!r} (character {exc.start + 1}), "
                              f"a lone surrogate: not valid Unicode, so it names no file. Retype the name, or "
                              f"rename the {what} to valid UTF-8.") from None
    longest = max(re.split(rb"[/\\]", raw), key=len)
    if len(longest) > NAME_MAX_BYTES:
        raise AdaTPInputError(f"the {what} name {short_repr(name)} has a part {len(longest)} bytes long; a file or "
                              f"folder name may have at most {NAME_MAX_BYTES} bytes. Shorten it.")
    if len(raw) > PATH_MAX_BYTES:
        raise AdaTPInputError(f"the {what} name {short_repr(name)} is {len(raw)} bytes long; a path may have at most "
                              f"{PATH_MAX_BYTES} bytes. Shorten it.")
    return name


def short_repr(value) -> str:
    """repr(value), cut to SHOWN_CHARS characters for a message (a cut string keeps its closing quote)."""
    text = repr(value)
    if len(text) <= SHOWN_CHARS:
        return text
    return text[:SHOWN_CHARS] + "..." + (text[0] if text[0] in "'\"" else "")


def bare_name(name, pathmod=os.path) -> bool:
    """True when ``name`` is a single plain name: not empty, no '/', '\\', ':' or NUL, no '..',
    no drive or UNC prefix, and not '.'."""
    if not isinstance(name, str) or not name.strip() or name == "." or ".." in name:
        return False
    if any(c in name for c in _PATH_CHARS):
        return False
    drive, _ = pathmod.splitdrive(name)
    return not drive and not pathmod.isabs(name)


def inside(root, path, pathmod=os.path) -> bool:
    """True when ``path`` is ``root`` or below it. Both must already be absolute and resolved
    (symlinks followed); paths on different drives are simply not inside (no ValueError)."""
    root, path = str(root), str(path)
    try:
        return pathmod.commonpath([root, path]) == pathmod.commonpath([root])
    except ValueError:  # different drives on Windows, or a relative path mixed with an absolute one
        return False


def resolved(path) -> Path:
    """``path`` made absolute with every symlink resolved, each '..' applied after the link
    before it, as the OS does (missing parts kept as typed)."""
    return Path(path).expanduser().resolve()


def followed(path, shown: str, advice: str) -> Path:
    """``resolved(path)``, or AdaTPInputError when a link on the way cannot be followed (a loop);
    ``shown`` is the name as the client gave it, ``advice`` what else to do."""
    try:
        return resolved(path)
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise AdaTPInputError(f"{shown!r} is a link that cannot be followed ({exc}); fix the link or "
                              f"{advice}.") from None


def check_inside(roots, path, what: str, shown: str | None = None) -> Path:
    """``path`` resolved, if it lies inside one of ``roots``; else AdaTPInputError.

    ComfyUI's own check (commonpath of the absolute paths) and the same check after
    resolving symlinks must both pass: a typed path outside every root is refused
    even when it is a symlink into one. The message names ``shown`` (what the user
    typed), never the resolved target, and is the same whether an outside path
    exists or not, so that it tells a client nothing about the server's files.
    """
    typed = Path(os.path.abspath(Path(path).expanduser()))
    shown = shown if shown is not None else str(path)
    for root in roots:
        forms = (Path(os.path.abspath(Path(root).expanduser())), resolved(root))
        # The typed path first, without touching the disk: an outside path (a UNC path on Windows
        # would connect to its server) is never opened or resolved.
        if any(inside(r, typed) for r in forms):
            real = followed(path, shown, "give another path")
            if inside(forms[1], real):
                return real
    places = ", ".join(str(r) for r in roots) or "(none)"
    raise AdaTPInputError(f"{shown!r} points outside the folders this {what} may use ({places}); put it there.")


def confined(root, path) -> bool:
    """True when ``root`` is None (the CLI: any path) or when ``path`` and the folder
    that holds it both resolve inside ``root`` (a clip and the caption written beside it)."""
    if root is None:
        return True
    real_root = resolved(root)
    path = Path(path)
    return inside(real_root, resolved(path)) and inside(real_root, resolved(path.parent))


def default_cache_dir() -> Path:
    """Where built-in assets go: $ADATP_CACHE_DIR, else ~/.cache/comfyui-adatp."""
    env = os.environ.get("ADATP_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "comfyui-adatp"
