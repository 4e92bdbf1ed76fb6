"""Caption many clips: a folder of videos in, one ``.txt`` per clip out. One concern per module:

- ``stream``:  clips through the model: decoding ahead (``DecodeAhead``), ``caption_videos``,
  clips decoded together;
- ``files``:   the file-system side, with no torch: names of any bytes, atomic writes, claims,
  the manifest and its locks;
- ``plan``:    what a folder holds (``scan_folder``), the job (``CaptionJob``) and each clip's
  fate before the model loads (``plan_folder``);
- ``summary``: one clip's result (``ClipResult``), its manifest record, a run's summary;
- ``run``:     the folder run (``caption_folder``, ``FolderRun``): claim, caption, write, log;
- ``cli``:     ``python -m adatp_core caption DIR``.

Every name those modules define or use is importable from here, as it was from the one
module this package replaced (``from adatp_core.caption import caption_folder``). The
parts load on the first such name, so ``adatp_core.caption.files`` imports without torch.
Setting a name here sets it in every part that uses the same object, so a test's
``monkeypatch.setattr(caption, "run_pipeline", fake)`` reaches the stream that calls it.
"""

from __future__ import annotations

import importlib
import sys
import types

PARTS = ("files", "summary", "stream", "plan", "run", "cli")
_MISSING = object()


def _parts(load: bool) -> list[types.ModuleType]:
    if load:  # the model side (torch) loads only when a name is asked of the package
        return [importlib.import_module(f"{__name__}.{part}") for part in PARTS]
    return [sys.modules[f"{__name__}.{part}"] for part in PARTS if f"{__name__}.{part}" in sys.modules]


def __getattr__(name: str):
    if not name.startswith("_"):
        for part in _parts(load=True):
            value = vars(part).get(name, _MISSING)
            if value is not _MISSING:
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *(n for part in _parts(load=True) for n in vars(part) if not n.startswith("_"))})


_ORIGINALS: dict = {}  # name -> the parts' own object, while the package holds another in its place


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        old = vars(self).get(name, _MISSING)
        if old is _MISSING and not name.startswith("_") and not isinstance(value, types.ModuleType):
            old = next((vars(p)[name] for p in _parts(load=False) if name in vars(p)), _MISSING)
            if old is not _MISSING:
                _ORIGINALS.setdefault(name, old)
        super().__setattr__(name, value)
        if old is not _MISSING and not isinstance(value, types.ModuleType):
            for part in _parts(load=False):
                if vars(part).get(name, _MISSING) is old:
                    setattr(part, name, value)

    def __delattr__(self, name: str) -> None:
        """Deleting a name set here (monkeypatch's undo of a name the package only looked up) puts
        the parts' own object back in every part that took the replacement."""
        current = vars(self).get(name, _MISSING)
        super().__delattr__(name)
        original = _ORIGINALS.pop(name, _MISSING)
        if original is not _MISSING and current is not _MISSING:
            for part in _parts(load=False):
                if vars(part).get(name, _MISSING) is current:
                    setattr(part, name, original)


sys.modules[__name__].__class__ = _Package
