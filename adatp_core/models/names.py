"""One model name everywhere: what ``--model`` (the QA and caption command lines) and
``load_video_llm`` accept, and ``python -m adatp_core models``, which lists them.

A name is, in this order:
- a built-in tiny model, as Load Video LLM lists it ("adatp-tiny-qwen3-vl (built-in,
  random weights)") or without the "(built-in…)" suffix ("adatp-tiny-qwen3-vl");
- a catalog entry as Load Video LLM lists it before its download ("⬇ owner/name (1.8 GB)");
- a folder (a path to an existing directory);
- the name of a model folder under one of the models roots (what Load Video LLM lists
  for a local model);
- a catalog repository id ("Qwen/Qwen3-VL-2B-Instruct"): its local copy under a models
  root, else downloaded into the first root with the node's rules (download.py:
  safetensors and config files only, resumable, refused offline).

Models roots, outside ComfyUI: the folders in $ADATP_MODEL_DIRS (separated by the OS
path separator), then ./models/LLM (where the nodes look when ComfyUI is not running),
then ComfyUI's models/LLM when the pack sits in ComfyUI's custom_nodes. The first is
where downloads go.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import AdaTPEnvironmentError, AdaTPInputError
from .catalog import DOWNLOAD_MARK, catalog, entry_from_label, find_entry
from .download import download_model
from .files import MARKER_FILE
from .folder import check_model_folder
from .tiny import TINY_MODEL_FOLDER, TINY_MODEL_NAME, default_cache_dir, ensure_tiny_model
from .tiny_qwen import (TINY_QWEN2_5_VL_FOLDER, TINY_QWEN2_5_VL_NAME, TINY_QWEN3_5_FOLDER, TINY_QWEN3_5_MOE_FOLDER,
                        TINY_QWEN3_5_MOE_NAME, TINY_QWEN3_5_NAME, TINY_QWEN3_VL_FOLDER, TINY_QWEN3_VL_MOE_FOLDER,
                        TINY_QWEN3_VL_MOE_NAME, TINY_QWEN3_VL_NAME, ensure_tiny_qwen2_5_vl, ensure_tiny_qwen3_5,
                        ensure_tiny_qwen3_5_moe, ensure_tiny_qwen3_vl, ensure_tiny_qwen3_vl_moe)

MODEL_DIRS_ENV = "ADATP_MODEL_DIRS"
PACK_DIR = Path(__file__).resolve().parents[2]
# Load Video LLM's first entry: the tiny LLaVA-OneVision, under its short list name.
BUILTIN_TINY = "adatp-tiny (built-in, random weights)"
# Built-in name (as listed) -> (the function that builds its folder, the name the loaded
# model carries, its folder under the cache).
BUILTINS = {
    BUILTIN_TINY: (ensure_tiny_model, TINY_MODEL_NAME, TINY_MODEL_FOLDER),
    TINY_QWEN2_5_VL_NAME: (ensure_tiny_qwen2_5_vl, TINY_QWEN2_5_VL_NAME, TINY_QWEN2_5_VL_FOLDER),
    TINY_QWEN3_VL_NAME: (ensure_tiny_qwen3_vl, TINY_QWEN3_VL_NAME, TINY_QWEN3_VL_FOLDER),
    TINY_QWEN3_5_NAME: (ensure_tiny_qwen3_5, TINY_QWEN3_5_NAME, TINY_QWEN3_5_FOLDER),
    TINY_QWEN3_5_MOE_NAME: (ensure_tiny_qwen3_5_moe, TINY_QWEN3_5_MOE_NAME, TINY_QWEN3_5_MOE_FOLDER),
    TINY_QWEN3_VL_MOE_NAME: (ensure_tiny_qwen3_vl_moe, TINY_QWEN3_VL_MOE_NAME, TINY_QWEN3_VL_MOE_FOLDER),
}
_SUFFIX = re.compile(r"^(?P<base>\S+)\s+\(built-in\b[^)]*\)$")


def _short(name: str) -> str:
    """A built-in name without its "(built-in…)" suffix."""
    match = _SUFFIX.match(name)
    return match["base"] if match else name


# Every accepted spelling of a built-in name -> its listed name.
_BUILTIN_ALIASES = {**{_short(n): n for n in BUILTINS}, **{n: n for n in BUILTINS},
                    TINY_MODEL_NAME: BUILTIN_TINY, _short(TINY_MODEL_NAME): BUILTIN_TINY}


def builtin_name(name: str) -> str | None:
    """The listed built-in name that ``name`` spells, or None."""
    name = name.strip()
    return _BUILTIN_ALIASES.get(name) or _BUILTIN_ALIASES.get(_short(name))


def model_roots() -> list[Path]:
    """The models roots of the command line and the Python loader (see the module docstring)."""
    roots = [Path(p).expanduser() for p in os.environ.get(MODEL_DIRS_ENV, "").split(os.pathsep) if p.strip()]
    roots.append(Path.cwd() / "models" / "LLM")
    if PACK_DIR.parent.name == "custom_nodes":
        roots.append(PACK_DIR.parent.parent / "models" / "LLM")
    unique: list[Path] = []
    for root in roots:
        if root.resolve() not in (r.resolve() for r in unique):
            unique.append(root)
    return unique


def _is_model_folder(folder: Path) -> bool:
    return (folder / MARKER_FILE).is_file()


def local_folder(name: str, roots: list[Path]) -> Path | None:
    """The model folder called ``name`` directly under one of ``roots`` (hidden ones never)."""
    if not name or name.startswith(".") or "/" in name or "\\" in name or "\x00" in name:
        return None
    return next((root / name for root in roots if _is_model_folder(root / name)), None)


@dataclass(frozen=True)
class ResolvedModel:
    folder: Path
    name: str  # what the loaded model is called (VideoLLM.name)


def resolve_model_name(name, roots: list[Path] | None = None, download: bool = True,
                       on_progress=None) -> ResolvedModel:
    """The folder a model name stands for (see the module docstring), downloading a
    catalog model that has no local copy when ``download`` is set.

    Raises AdaTPInputError for a name that is none of these, naming what is accepted.
    """
    if isinstance(name, Path):
        return ResolvedModel(name.expanduser(), name.expanduser().name)
    if not isinstance(name, str) or not name.strip():
        raise AdaTPInputError("no model name given; name a folder, a built-in model or a catalog repository "
                              "(python -m adatp_core models lists them)")
    roots = model_roots() if roots is None else roots
    if (listed := builtin_name(name)) is not None:
        ensure, loaded_name, _ = BUILTINS[listed]
        return ResolvedModel(ensure(), loaded_name)
    name = name.strip()
    entry = entry_from_label(name) if name.startswith(DOWNLOAD_MARK) else None
    if name.startswith(DOWNLOAD_MARK) and entry is None:
        raise AdaTPInputError(f"{name!r} is not in the model catalog (any more); python -m adatp_core models "
                              "lists the catalog.")
    path = Path(name).expanduser()
    if entry is None and path.is_dir():
        return ResolvedModel(path, path.name)
    if entry is None and (folder := local_folder(name, roots)) is not None:
        return ResolvedModel(folder, folder.name)
    entry = entry or find_entry(name)
    if entry is not None:
        folder = local_folder(entry.folder_name, roots)
        if folder is None:
            if not download:
                raise AdaTPInputError(f"{entry.repo_id} is not downloaded yet.")
            if not roots:
                raise AdaTPEnvironmentError(f"no models folder to download {entry.repo_id} into; set {MODEL_DIRS_ENV}")
            folder = download_model(entry.repo_id, roots[0], on_progress=on_progress)
        return ResolvedModel(folder, folder.name)
    where = ", ".join(str(r) for r in roots) or "(no models folder)"
    raise AdaTPInputError(
        f"model {name!r} is not a folder (it does not exist), a built-in model, a model folder under {where}, "
        "or a catalog repository; python -m adatp_core models lists every name that works.")


# -- python -m adatp_core models -------------------------------------------------------


@dataclass(frozen=True)
class ModelListing:
    name: str   # what --model takes
    kind: str   # built-in, local or catalog
    size_gb: float | None  # on disk (the download size for a catalog model not downloaded)
    state: str
    path: str | None


def _folder_gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e9


def _folder_state(folder: Path) -> str:
    try:
        check_model_folder(folder)
    except AdaTPInputError as exc:
        return f"incomplete: {exc}"
    return "ready"


def list_models(roots: list[Path] | None = None) -> list[ModelListing]:
    """Built-in, local (under the models roots) and catalog models, as ``--model`` takes them."""
    roots = model_roots() if roots is None else roots
    out = []
    cache = default_cache_dir()
    for listed, (_, _, folder_name) in BUILTINS.items():
        built = cache / folder_name if _is_model_folder(cache / folder_name) else None
        out.append(ModelListing(_short(listed), "built-in", _folder_gb(built) if built else None,
                                "built" if built else "built on first use (random weights, no download)",
                                str(built) if built else None))
    seen = set()
    for root in roots:
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if not p.name.startswith(".") and _is_model_folder(p)):
            if folder.name in seen:
                continue  # the first root's copy is the one a name finds
            seen.add(folder.name)
            out.append(ModelListing(folder.name, "local", _folder_gb(folder), _folder_state(folder), str(folder)))
    for entry in catalog():
        folder = local_folder(entry.folder_name, roots)
        if folder is not None:
            state, size, path = f"downloaded ({folder.name})", _folder_gb(folder), str(folder)
        else:
            partial = next((r / f".{entry.folder_name}.partial" for r in roots[:1]
                            if (r / f".{entry.folder_name}.partial").is_dir()), None)
            state = "partly downloaded (run again to resume)" if partial else "not downloaded (downloads on first use)"
            size, path = entry.disk_gb, None
        out.append(ModelListing(entry.repo_id, "catalog", size, state, path))
    return out


def models_main(argv) -> int:
    """python -m adatp_core models [--json]"""
    p = argparse.ArgumentParser(prog="python -m adatp_core models",
                                description="List the models --model takes: built-in, local and catalog.")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    args = p.parse_args(argv)
    roots = model_roots()
    rows = list_models(roots)
    if args.json:
        print(json.dumps({"roots": [str(r) for r in roots], "models": [asdict(r) for r in rows]}, indent=2))
        return 0
    width = max(len(r.name) for r in rows)
    print(f"{'NAME':<{width}}  {'KIND':<8}  {'SIZE':>9}  STATE")
    for r in rows:
        size = f"{r.size_gb:.2f} GB" if r.size_gb is not None else "-"
        print(f"{r.name:<{width}}  {r.kind:<8}  {size:>9}  {r.state}")
    print(f"\nmodels folders (downloads go to the first): {', '.join(str(r) for r in roots)}")
    return 0
