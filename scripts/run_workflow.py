#!/usr/bin/env python3
"""Run a ComfyUI workflow file with the AdaTP pack, headless, without ComfyUI.

    python scripts/run_workflow.py workflows/adatp_video_qa.json
    python scripts/run_workflow.py my.json --input-dir ~/ComfyUI/input --models-dir ~/ComfyUI/models/LLM \\
        --set 3.question='"What color is the car?"'

The pack is imported the way ComfyUI imports custom nodes (as a package named
after its folder), so this exercises exactly what ComfyUI loads. Images from
Preview Image / Save Image go to --output-dir as PNG files; answers and stats
are printed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
PACK_NAME = "ComfyUI-AdaTP"


def load_pack(pack_dir: Path = PACK_DIR, name: str = PACK_NAME):
    """Import the pack like ComfyUI's load_custom_node does."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, pack_dir / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def parse_override(text: str):
    target, _, value = text.partition("=")
    node, _, name = target.partition(".")
    if not value or not name or not node.isdigit():
        raise SystemExit(f"--set wants NODE_ID.INPUT=JSON_VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value  # a bare string
    return (int(node), name), parsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workflow", type=Path)
    p.add_argument("--input-dir", type=Path, default=PACK_DIR / "input", help="where Load Video finds videos")
    p.add_argument("--output-dir", type=Path, default=PACK_DIR / "out", help="where images are written")
    p.add_argument("--models-dir", type=Path, action="append", help="a models/LLM folder (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], type=parse_override,
                   help="override a widget: NODE_ID.INPUT=JSON_VALUE")
    p.add_argument("--api", action="store_true", help="print the API-format prompt instead of running")
    args = p.parse_args(argv)

    pack = load_pack()
    bridge = importlib.import_module(f"{PACK_NAME}.nodes.comfy_bridge")
    headless = importlib.import_module(f"{PACK_NAME}.nodes.headless")
    errors = importlib.import_module(f"{PACK_NAME}.adatp_core.errors")
    bridge.HEADLESS.input_dir = args.input_dir
    bridge.HEADLESS.output_dir = args.output_dir
    if args.models_dir:
        bridge.HEADLESS.model_dirs = list(args.models_dir)
    try:
        if args.api:
            data = json.loads(args.workflow.read_text())
            print(json.dumps(headless.Workflow(data, pack.NODE_CLASS_MAPPINGS).to_api(), indent=2))
            return 0
        result = headless.run_workflow(args.workflow, pack.NODE_CLASS_MAPPINGS, dict(args.overrides),
                                       log=lambda m: print(m, file=sys.stderr))
    except (headless.WorkflowError, errors.AdaTPInputError, errors.AdaTPEnvironmentError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for nid in result.order:
        texts = result.ui.get(nid, {}).get("text", [])
        if texts:
            print(f"=== {result.labels[nid]} ===\n" + "\n\n".join(texts))
    for path in result.images():
        print(f"image: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
