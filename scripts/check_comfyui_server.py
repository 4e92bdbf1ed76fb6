#!/usr/bin/env python3
"""Check the pack inside a running ComfyUI server.

Start ComfyUI with the pack in custom_nodes/, then:

    python scripts/check_comfyui_server.py --url http://127.0.0.1:8188 \
        [--models "adatp-tiny-qwen2.5-vl (built-in, random weights)" ...]

It checks that every AdaTP node is in /object_info with the expected inputs
(required and optional, in order), converts each shipped workflow to API
format, queues it with POST /prompt, waits for it in /history, and prints each
node's text output (answer, stats) and images. generated_video_qa.json runs a
second time on a VIDEO held as frames (core Create Video); a ComfyUI without the
VIDEO type skips both, long_video_qa.json, Sample Video and Extract Attention (Video File). --models runs every workflow
again with Load Video LLM switched to each named model (Caption Folder then
overwrites, so the model really captions). Exit status 0 only if every run
ended without an error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_workflow import PACK_DIR, PACK_NAME, load_pack  # noqa: E402


def call(url: str, path: str, payload=None):
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


IN_MEMORY = "in-memory VIDEO"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8188")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--models", nargs="*", default=[], metavar="NAME",
                   help="also run each workflow with Load Video LLM set to these entries of its list")
    args = p.parse_args(argv)
    pack = load_pack()
    headless = importlib.import_module(f"{PACK_NAME}.nodes.headless")

    info = call(args.url, "/object_info")
    ok = True
    has_video = "CreateVideo" in info  # ComfyUI 0.3.30 and later: the VIDEO type
    for key, cls in pack.NODE_CLASS_MAPPINGS.items():
        if key in ("AdaTP_SampleVideo", "AdaTP_ExtractAttentionVideo") and not has_video:
            print(f"skip /object_info: {key} (this ComfyUI has no VIDEO type, so the pack leaves it out)")
            continue
        served = info.get(key)
        types = cls.INPUT_TYPES()
        expected = {kind: list(types.get(kind, {})) for kind in ("required", "optional")}
        order = (served or {}).get("input_order", {})
        if served is None or {kind: order.get(kind, []) for kind in expected} != expected:
            print(f"FAIL /object_info: {key}")
            ok = False
        else:
            print(f"ok   /object_info: {key} ({served['display_name']}, category {served['category']})")

    listed = info.get("AdaTP_LoadVideoLLM", {}).get("input", {}).get("required", {}).get("model", [[]])[0]
    for name in args.models:
        if name not in listed:
            print(f"FAIL --models: {name!r} is not in Load Video LLM's list {listed}")
            ok = False
    client = str(uuid.uuid4())
    runs = [(path, None) for path in sorted((PACK_DIR / "workflows").glob("*.json"))
            if has_video or path.name not in ("generated_video_qa.json", "long_video_qa.json")]
    runs += [(path, name) for name in args.models if name in listed for path, _ in runs]
    if has_video:  # the same question on a VIDEO held as frames: Create Video from the sample's frames
        runs.append((PACK_DIR / "workflows" / "generated_video_qa.json", IN_MEMORY))
    for path, model in runs:
        prompt = headless.Workflow(json.loads(path.read_text()), pack.NODE_CLASS_MAPPINGS).to_api()
        label = path.name
        if model is IN_MEMORY:
            label = f"{path.name} on an in-memory VIDEO (Get Video Components -> Create Video)"
            loader = next(k for k, node in prompt.items() if node["class_type"] == "LoadVideo")
            prompt["900"], prompt["901"] = prompt[loader], {"class_type": "GetVideoComponents",
                                                            "inputs": {"video": ["900", 0]}}
            prompt[loader] = {"class_type": "CreateVideo", "inputs": {"images": ["901", 0], "fps": ["901", 2]}}
            model = None
        if model is not None:
            label = f"{path.name} with {model}"
            for node in prompt.values():
                if node["class_type"] == "AdaTP_LoadVideoLLM":
                    node["inputs"]["model"] = model
                elif node["class_type"] == "AdaTP_CaptionFolder":
                    node["inputs"]["overwrite"] = True
        start = time.time()
        try:
            queued = call(args.url, "/prompt", {"prompt": prompt, "client_id": client})
        except urllib.error.HTTPError as exc:
            print(f"FAIL {label}: POST /prompt refused: {exc.read().decode()[:500]}")
            ok = False
            continue
        pid = queued["prompt_id"]
        entry = None
        while time.time() - start < args.timeout:
            entry = call(args.url, f"/history/{pid}").get(pid)
            if entry and entry.get("status", {}).get("completed") is not None:
                break
            time.sleep(0.5)
        status = (entry or {}).get("status", {})
        if status.get("status_str") != "success":
            print(f"FAIL {label}: {json.dumps(status)[:800]}")
            ok = False
            continue
        print(f"ok   {label}: ran in {time.time() - start:.1f} s")
        for nid, out in sorted(entry["outputs"].items(), key=lambda kv: int(kv[0])):
            for text in out.get("text", []):
                print(f"     node {nid} text: {text[:160]!r}")
            for image in out.get("images", []):
                print(f"     node {nid} image: {image.get('filename')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
