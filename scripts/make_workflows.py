#!/usr/bin/env python3
"""Write the shipped workflow files in workflows/ from the node definitions.

Widget values are laid out from each node's INPUT_TYPES, so the files always
match the nodes. Run it after changing a node's defaults:

    python scripts/make_workflows.py
"""

from __future__ import annotations

import importlib
import json
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_workflow import PACK_DIR, PACK_NAME, load_pack  # noqa: E402

OUT = PACK_DIR / "workflows"
QUESTION = "What happens in this video?"
CAPTION = ("Describe this video in detail: the setting, every object and person, what moves and how, "
           "and the order in which things happen.")

# (id, type, position, widget overrides); links: (from id, output name, to id, input name)
QA = {
    "note": "AdaTP video QA: load a model and a video, extract attention at layer K, debias globally "
            "(segments) and locally (positions), keep 25% of the visual tokens, answer. Preview Tokens "
            "shows what was kept. Bypass a debias node (Ctrl+B) to see what it does.",
    "nodes": [
        (1, "AdaTP_LoadVideoLLM", (40, 60), {}),
        (2, "AdaTP_LoadVideo", (40, 330), {}),
        (3, "AdaTP_ExtractAttention", (420, 60), {"question": QUESTION}),
        (4, "AdaTP_GlobalDebias", (820, 60), {}),
        (5, "AdaTP_LocalDebias", (820, 220), {}),
        (6, "AdaTP_PruneTokens", (1180, 60), {}),
        (7, "AdaTP_GenerateAnswer", (1620, 60), {"max_new_tokens": 64}),
        (8, "AdaTP_PreviewTokens", (1180, 330), {}),
        (9, "PreviewImage", (1180, 470), {}),
    ],
    "links": [
        (1, "model", 3, "model"), (2, "frames", 3, "frames"), (3, "state", 4, "state"),
        (4, "state", 5, "state"), (5, "state", 6, "state"), (6, "state", 7, "state"),
        (6, "state", 8, "state"), (2, "frames", 8, "frames"), (8, "image", 9, "images"),
    ],
}

VANILLA_VS_ADATP = {
    "note": "The same video and question answered twice from ONE Extract Attention: the top branch is "
            "the vanilla model (no pruning), the bottom branch AdaTP at 25% retention. Compare the "
            "answers and the stats lines (tokens kept, FLOPs, time to first token).",
    "nodes": [
        (1, "AdaTP_LoadVideoLLM", (40, 60), {}),
        (2, "AdaTP_LoadVideo", (40, 330), {}),
        (3, "AdaTP_ExtractAttention", (420, 60), {"question": QUESTION}),
        (4, "AdaTP_GenerateAnswer", (1180, 40), {"max_new_tokens": 64}),
        (5, "AdaTP_GlobalDebias", (820, 360), {}),
        (6, "AdaTP_LocalDebias", (820, 540), {}),
        (7, "AdaTP_PruneTokens", (1180, 400), {}),
        (8, "AdaTP_GenerateAnswer", (1560, 400), {"max_new_tokens": 64}),
    ],
    "titles": {4: "Vanilla: Generate Answer", 8: "AdaTP: Generate Answer"},
    "links": [
        (1, "model", 3, "model"), (2, "frames", 3, "frames"), (3, "state", 4, "state"),
        (3, "state", 5, "state"), (5, "state", 6, "state"), (6, "state", 7, "state"), (7, "state", 8, "state"),
    ],
}

CAPTION_FLOW = {
    "note": "Detailed video captioning with AdaTP: a captioning instruction instead of a question, and "
            "longer generation. 32 frames, 25% of the visual tokens kept.",
    "nodes": [
        (1, "AdaTP_LoadVideoLLM", (40, 60), {}),
        (2, "AdaTP_LoadVideo", (40, 330), {}),
        (3, "AdaTP_ExtractAttention", (420, 60), {"question": CAPTION}),
        (4, "AdaTP_GlobalDebias", (820, 60), {}),
        (5, "AdaTP_LocalDebias", (820, 220), {}),
        (6, "AdaTP_PruneTokens", (1180, 60), {}),
        (7, "AdaTP_GenerateAnswer", (1560, 60), {"max_new_tokens": 384}),
    ],
    "links": [
        (1, "model", 3, "model"), (2, "frames", 3, "frames"), (3, "state", 4, "state"),
        (4, "state", 5, "state"), (5, "state", 6, "state"), (6, "state", 7, "state"),
    ],
}

FASTV = {
    "note": "The FastV baseline: no debias stages, so Prune Tokens keeps the tokens with the highest "
            "layer K-1 attention over the whole video. Compare its Preview Tokens with AdaTP's: the "
            "kept tokens crowd into the last frames and the same positions.",
    "nodes": [
        (1, "AdaTP_LoadVideoLLM", (40, 60), {}),
        (2, "AdaTP_LoadVideo", (40, 330), {}),
        (3, "AdaTP_ExtractAttention", (420, 60), {"question": QUESTION, "query": "last"}),
        (4, "AdaTP_PruneTokens", (820, 60), {}),
        (5, "AdaTP_GenerateAnswer", (1180, 60), {"max_new_tokens": 64}),
        (6, "AdaTP_PreviewTokens", (820, 330), {}),
        (7, "PreviewImage", (820, 470), {}),
    ],
    "links": [
        (1, "model", 3, "model"), (2, "frames", 3, "frames"), (3, "state", 4, "state"),
        (4, "state", 5, "state"), (4, "state", 6, "state"), (2, "frames", 6, "frames"), (6, "image", 7, "images"),
    ],
}

# Room for the multiline question and for the text that the web extension shows.
SIZES = {"AdaTP_ExtractAttention": [360, 260], "AdaTP_GenerateAnswer": [420, 380],
         "AdaTP_PruneTokens": [400, 220], "AdaTP_LoadVideo": [340, 420], "PreviewImage": [420, 300]}

WORKFLOWS = {
    "adatp_video_qa.json": QA,
    "vanilla_vs_adatp.json": VANILLA_VS_ADATP,
    "video_caption.json": CAPTION_FLOW,
    "fastv_baseline.json": FASTV,
}


def widget_values(cls, headless, overrides: dict) -> list:
    values = []
    spec = dict(headless._inputs(cls))
    for name, extra in headless.widget_slots(cls):
        if extra == "control":
            values.append("fixed")
        elif extra == "upload":
            values.append("image")
        elif name in overrides:
            values.append(overrides[name])
        else:
            kind, opts = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
            values.append(opts.get("default", kind[0] if isinstance(kind, (list, tuple)) else None))
    return values


def build(flow: dict, mappings: dict, headless) -> dict:
    classes = {**headless.CORE_DISPLAY_NODES, **mappings}
    nodes, links = {}, []
    for order, (nid, kind, pos, overrides) in enumerate(flow["nodes"]):
        cls = classes[kind]
        sockets = [(n, s) for n, s in headless._inputs(cls) if not headless.is_widget(s)]
        slots = headless.widget_slots(cls)
        nodes[nid] = {
            "id": nid, "type": kind, "pos": list(pos),
            "size": SIZES.get(kind, [340, 60 + 26 * (len(sockets) + len(slots))]),
            "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": n, "type": s[0], "link": None} for n, s in sockets],
            "outputs": [{"name": name, "type": t, "links": [], "slot_index": i}
                        for i, (name, t) in enumerate(zip(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
                                                          if hasattr(cls, "RETURN_TYPES") else (), getattr(cls, "RETURN_TYPES", ())))],
            "properties": {"Node name for S&R": kind, **({"cnr_id": "comfyui-adatp"} if kind.startswith("AdaTP_") else {})},
            "widgets_values": widget_values(cls, headless, overrides),
        }
        if nid in flow.get("titles", {}):
            nodes[nid]["title"] = flow["titles"][nid]
    for link_id, (src, out_name, dst, in_name) in enumerate(flow["links"], start=1):
        src_slot = next(o["slot_index"] for o in nodes[src]["outputs"] if o["name"] == out_name)
        dst_slot = next(i for i, inp in enumerate(nodes[dst]["inputs"]) if inp["name"] == in_name)
        kind = nodes[src]["outputs"][src_slot]["type"]
        nodes[src]["outputs"][src_slot]["links"].append(link_id)
        nodes[dst]["inputs"][dst_slot]["link"] = link_id
        links.append([link_id, src, src_slot, dst, dst_slot, kind])
    note_id = max(nodes) + 1
    all_nodes = list(nodes.values()) + [{
        "id": note_id, "type": "Note", "pos": [40, 880], "size": [700, 110], "flags": {}, "order": len(nodes),
        "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": [flow["note"]],
        "color": "#432", "bgcolor": "#653"}]
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "comfyui-adatp/" + flow["note"][:40])),
        "revision": 0, "last_node_id": note_id, "last_link_id": len(links),
        "nodes": all_nodes, "links": links, "groups": [], "config": {},
        "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4,
    }


def main() -> int:
    pack = load_pack()
    headless = importlib.import_module(f"{PACK_NAME}.nodes.headless")
    OUT.mkdir(exist_ok=True)
    for name, flow in WORKFLOWS.items():
        data = build(flow, pack.NODE_CLASS_MAPPINGS, headless)
        headless.Workflow(json.loads(json.dumps(data)), pack.NODE_CLASS_MAPPINGS)  # must pass its own checks
        (OUT / name).write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
