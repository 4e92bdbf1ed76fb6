"""Import the pack the way ComfyUI does (a package named after its folder)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from run_workflow import PACK_NAME, load_pack  # noqa: E402


def pack_module(sub: str):
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.{sub}")
