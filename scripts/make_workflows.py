#!/usr/bin/env python3
"""Write the shipped workflow files in workflows/ from the node definitions.

Widget values are laid out from each node's INPUT_TYPES, so the files always
match the nodes. Run it after changing a node's defaults:

    python scripts/make_workflows.py                      # every workflow
    python scripts/make_workflows.py two_questions.json   # only the ones named

Nodes are laid out in columns from their real size in ComfyUI's frontend
(``node_size``: litegraph's computeSize from the node's sockets and widgets,
plus the text that the pack's web extension shows after a run), so no two
nodes overlap, whatever an answer's length.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_workflow import PACK_DIR, PACK_NAME, load_pack  # noqa: E402

OUT = PACK_DIR / "workflows"
QUESTION = "What happens in this video?"
CAPTION = ("Describe this video in detail: the setting, every object and person, what moves and how, "
           "and the order in which things happen.")

# (id, type, column, widget overrides); a column's nodes stack top to bottom in this order.
# "align": {id: other id} starts a node no higher than another one (a branch beside its twin).
# links: (from id, output name, to id, input name)
QA = {
    "note": "AdaTP video QA: load a model and a video, extract attention at layer K, debias globally "
            "(segments) and locally (positions), keep 25% of the visual tokens, answer. Preview Tokens "
            "shows what was kept. Bypass a debias node (Ctrl+B) to see what it does.",
    "nodes": [
        (1, "AdaTP_LoadVideoLLM", 0, {}),
        (2, "AdaTP_LoadVideo", 0, {}),
        (3, "AdaTP_ExtractAttention", 1, {"question": QUESTION}),
        (4, "AdaTP_GlobalDebias", 2, {}),
        (5, "AdaTP_LocalDebias", 2, {}),
        (6, "AdaTP_PruneTokens", 3, {}),
        (7, "AdaTP_GenerateAnswer", 4, {"max_new_tokens": 64}),
        (8, "AdaTP_PreviewTokens", 3, {}),
        (9, "PreviewImage", 3, {}),
    ],
    "links": [
        (1, "model", 3, "model"), (2, "frames", 3, "frames"), (2, "video_info", 3, "video_info"), (3, "state", 4, "state"),
        (4, "state", 5, "state"), (5, "state", 6, "state"), (6, "state", 7, "state"),
        (6, "state", 8, "state"), (2, "frames", 8, "frames"), (8, "image", 9, "images"),
    ],
}

VANILLA_VS_ADATP = {
    "note": "The same video and question answered twice from ONE Extract Attention: the top branch is "
            "the vanilla model (no pruning), the bottom branch AdaTP at 25% retention. Compare the "
            "answers and the stats lines (tokens kept, FLOPs, time to first token).",
    "nodes": [
        (1, "AdaTP_LoadVideoLLM", 0, {}),
        (2, "AdaTP_LoadVideo", 0, {}),
        (3, "AdaTP_ExtractAttention", 1, {"question": QUESTION}),
        (4, "AdaTP_GenerateAnswer", 2, {"max_new_tokens": 64}),
        (5, "AdaTP_GlobalDebias", 2, {}),
        (6, "AdaTP_LocalDebias", 2, {}),
        (7, "AdaTP_PruneTokens", 3, {}),
        (8, "AdaTP_GenerateAnswer", 4, {"max_new_tokens": 64}),
    ],
    "align": {7: 5, 8: 5},  # the AdaTP branch runs below the vanilla answer
    "titles": {4: "Vanilla: Generate Answer", 8: "AdaTP: Generate Answer"},
    "links": [
        (1, "model", 3, "model"), (2, "frames", 3, "frames"), (2, "video_info", 3, "video_info"), (3, "state", 4, "state"),
        (3, "state", 5, "state"), (5, "state", 6, "state"), (6, "state", 7, "state"), (7, "state", 8, "state"),
    ],
}

CAPTION_FLOW = {
    "note": "Detailed video captioning with AdaTP: a captioning instruction instead of a question, and "
            "longer generation. 32 frames, 25% of the visual tokens kept.",
    "nodes": [
        (1, "AdaTP_LoadVideoLLM", 0, {}),
        (2, "AdaTP_LoadVideo", 0, {}),
        (3, "AdaTP_ExtractAttention", 1, {"question": CAPTION}),
        (4, "AdaTP_GlobalDebias", 2, {}),
        (5, "AdaTP_LocalDebias", 2, {}),
        (6, "AdaTP_PruneTokens", 3, {}),
        (7, "AdaTP_GenerateAnswer", 4, {"max_new_tokens": 384}),
    ],
    "links": [
        (1, "model", 3, "model"), (2, "frames", 3, "frames"), (2, "video_info", 3, "video_info"), (3, "state", 4, "state"),
        (4, "state", 5, "state"), (5, "state", 6, "state"), (6, "state", 7, "state"),
    ],
}

FASTV = {
    "note": "The FastV baseline: no debias stages, so Prune Tokens keeps the tokens with the highest "
            "layer K-1 attention over the whole video. Compare its Preview Tokens with AdaTP's: the "
            "kept tokens crowd into the last frames and the same positions.",
    "nodes": [
        (1, "AdaTP_LoadVideoLLM", 0, {}),
        (2, "AdaTP_LoadVideo", 0, {}),
        (3, "AdaTP_ExtractAttention", 1, {"question": QUESTION, "query": "last"}),
        (4, "AdaTP_PruneTokens", 2, {}),
        (5, "AdaTP_GenerateAnswer", 3, {"max_new_tokens": 64}),
        (6, "AdaTP_PreviewTokens", 2, {}),
        (7, "PreviewImage", 2, {}),
    ],
    "links": [
        (1, "model", 3, "model"), (2, "frames", 3, "frames"), (2, "video_info", 3, "video_info"), (3, "state", 4, "state"),
        (4, "state", 5, "state"), (4, "state", 6, "state"), (2, "frames", 6, "frames"), (6, "image", 7, "images"),
    ],
}

FOLLOW_UP = "What changes between the first and the last frames?"
TWO_QUESTIONS = {
    "note": "Two questions about one video: two Extract Attention nodes share Load Video. The video is "
            "encoded once: the Extract Attention that runs second reuses the video's prefix (the vision "
            "encoder and layers < K over the video) and runs only its question's tokens; its stats say "
            "\"Video prefix: reused\". Change a question and Run again: only that question's part runs.",
    "nodes": [
        (1, "AdaTP_LoadVideoLLM", 0, {}),
        (2, "AdaTP_LoadVideo", 0, {}),
        (3, "AdaTP_ExtractAttention", 1, {"question": QUESTION}),
        (4, "AdaTP_ExtractAttention", 1, {"question": FOLLOW_UP}),
        (5, "AdaTP_GlobalDebias", 2, {}),
        (6, "AdaTP_GlobalDebias", 2, {}),
        (7, "AdaTP_LocalDebias", 3, {}),
        (8, "AdaTP_LocalDebias", 3, {}),
        (9, "AdaTP_PruneTokens", 4, {}),
        (10, "AdaTP_PruneTokens", 4, {}),
        (11, "AdaTP_GenerateAnswer", 5, {"max_new_tokens": 64}),
        (12, "AdaTP_GenerateAnswer", 6, {"max_new_tokens": 64}),
    ],
    "align": {6: 4, 8: 4, 10: 4},
    "titles": {3: "Question 1: Extract Attention", 4: "Question 2: Extract Attention",
               11: "Question 1: Generate Answer", 12: "Question 2: Generate Answer"},
    "links": [
        (1, "model", 3, "model"), (2, "frames", 3, "frames"), (2, "video_info", 3, "video_info"),
        (1, "model", 4, "model"), (2, "frames", 4, "frames"), (2, "video_info", 4, "video_info"),
        (3, "state", 5, "state"), (5, "state", 7, "state"), (7, "state", 9, "state"), (9, "state", 11, "state"),
        (4, "state", 6, "state"), (6, "state", 8, "state"), (8, "state", 10, "state"), (10, "state", 12, "state"),
    ],
}

CAPTION_FOLDER = {
    "note": "Caption a folder of clips for video LoRA training: every clip in ComfyUI's input folder "
            "adatp_caption_samples (the pack's sample video; type your own folder, or an absolute path) gets "
            "a .txt beside it with prefix + caption + suffix. Clips that already have one are skipped unless "
            "overwrite is on, so a stopped run continues. Preview Any lists the captions.",
    "nodes": [
        (1, "AdaTP_LoadVideoLLM", 0, {}),
        (2, "AdaTP_CaptionFolder", 1, {}),
        (3, "PreviewAny", 2, {}),
    ],
    "links": [(1, "model", 2, "model"), (2, "captions", 3, "source")],
}

CLIP_DATASET = {
    "note": "From long footage to a video training set: Clip Dataset finds the shots of every video in sources "
            "(ComfyUI's input folder; adatp_clip_samples holds the pack's sample video, three shots), cuts them "
            "into clips of min to max seconds at fps with 4k+1 frames (Wan; 8k+1 for LTX-Video), captions each "
            "clip and writes the set to output/adatp_clips: videos/NAME.mp4 + NAME.txt, clips.jsonl and "
            "subtitles/ (.srt, .vtt). Run it again and only what is missing is done.",
    "nodes": [
        (1, "AdaTP_LoadVideoLLM", 0, {}),
        (2, "AdaTP_ClipDataset", 1, {}),
    ],
    "links": [(1, "model", 2, "model")],
}

SELF_CHECK = {
    "note": "Does the pack work on this machine? Self Check runs the built-in tiny models (nothing is "
            "downloaded) on ComfyUI's device and shows a table: each fast path against the plain one, "
            "pass, fail or skip, and for a failure the setting that avoids it. Run it before downloading "
            "a real model.",
    "nodes": [(1, "AdaTP_SelfCheck", 0, {})],
    "links": [],
}

GENERATED_VIDEO_QA = {
    "note": "Ask about a clip made in ComfyUI: any VIDEO (core Load Video here; Create Video after a video "
            "model, or an API node's output) goes into AdaTP Sample Video, which decodes only the sampled frames "
            "(a video held as frames is sampled in memory) and gives their times to Extract Attention. Replace "
            "Load Video by your generation's Create Video to ask about what you just made.",
    "nodes": [
        (1, "AdaTP_LoadVideoLLM", 0, {}),
        (2, "LoadVideo", 0, {"file": "adatp_sample_video.mp4"}),
        (3, "AdaTP_SampleVideo", 1, {}),
        (4, "AdaTP_ExtractAttention", 2, {"question": QUESTION}),
        (5, "AdaTP_GlobalDebias", 3, {}),
        (6, "AdaTP_LocalDebias", 3, {}),
        (7, "AdaTP_PruneTokens", 4, {}),
        (8, "AdaTP_GenerateAnswer", 5, {"max_new_tokens": 64}),
    ],
    "links": [
        (1, "model", 4, "model"), (2, "VIDEO", 3, "video"), (3, "frames", 4, "frames"),
        (3, "video_info", 4, "video_info"), (4, "state", 5, "state"), (5, "state", 6, "state"),
        (6, "state", 7, "state"), (7, "state", 8, "state"),
    ],
}

LONG_VIDEO_QA = {
    "note": "A long video, streamed: AdaTP Extract Attention (Video File) takes core Load Video's VIDEO and "
            "decodes, preprocesses and encodes the sampled frames a chunk at a time, so all of them never exist "
            "at once. Sampling fps with num_frames 0 takes one frame every 1/fps seconds of the whole video "
            "(here one a second). Before decoding anything it checks the model's context and the run's peak "
            "memory, and says what to change if they do not fit. Pick any long video in Load Video.",
    "nodes": [
        (1, "AdaTP_LoadVideoLLM", 0, {}),
        (2, "LoadVideo", 0, {"file": "adatp_sample_video.mp4"}),
        (3, "AdaTP_ExtractAttentionVideo", 1, {"question": QUESTION, "num_frames": 0, "sampling": "fps",
                                               "fps": 1.0}),
        (4, "AdaTP_GlobalDebias", 2, {}),
        (5, "AdaTP_LocalDebias", 2, {}),
        (6, "AdaTP_PruneTokens", 3, {}),
        (7, "AdaTP_GenerateAnswer", 4, {"max_new_tokens": 64}),
    ],
    "links": [
        (1, "model", 3, "model"), (2, "VIDEO", 3, "video"), (3, "state", 4, "state"), (4, "state", 5, "state"),
        (5, "state", 6, "state"), (6, "state", 7, "state"),
    ],
}

# litegraph's constants (ComfyUI frontend): title bar, a socket row, a widget row.
TITLE_HEIGHT, SLOT_HEIGHT, WIDGET_HEIGHT, NODE_WIDTH = 30, 20, 20, 140
TITLE_CHAR, LABEL_CHAR = 14 * 0.6, 12 * 0.6  # litegraph's text width estimate (font size * 0.6 a character)
WIDGET_PADDING = 104  # BaseWidget.minValueWidth 42 + 2 * (margin 15 + arrowMargin 6 + arrowWidth 10)
MULTILINE_HEIGHT = 50  # a multiline STRING's text box (DOM widget) at its minimum
# The text box that web/adatp_display.js adds after a run: up to 24 rows of 15 px, at least 420 wide.
DISPLAY_ROWS, DISPLAY_LINE, DISPLAY_WIDTH = 24, 15, 420
# The nodes that get that box: the web extension's list.
TEXT_NODES = tuple(json.loads(re.search(r"TEXT_NODES = Object\.freeze\((\[.*?\])\)",
                                        (PACK_DIR / "web" / "adatp_display.js").read_text()).group(1)))
# Room for what a node shows beyond its widgets: Load Video's video preview (the frontend computes
# 450 x 552 at 450 wide with the sample video), the images, Preview Any's text box (it scrolls).
MIN_SIZES = {"AdaTP_ExtractAttention": [360, 0], "AdaTP_ExtractAttentionVideo": [360, 0], "AdaTP_LoadVideo": [450, 560], "LoadVideo": [450, 560],
             "PreviewImage": [420, 300],
             "AdaTP_PreviewTokens": [340, 0], "PreviewAny": [420, 300]}
DISPLAY_NAMES = {"PreviewImage": "Preview Image", "PreviewAny": "Preview Any", "SaveImage": "Save Image",
                 "LoadVideo": "Load Video"}
LEFT, TOP, GAP_X, GAP_Y = 40, 60, 60, 50


def node_size(cls, kind: str, title: str, headless, after_run: bool = False) -> list[int]:
    """[width, height] of a node's body (the title bar is above it) in ComfyUI's
    frontend, as litegraph's LGraphNode.computeSize works it out: socket rows,
    then each widget's height + 4, + 8, + 6; widths from the title and the
    labels. after_run: with the text box that a text node shows after a run,
    at its tallest (the layout leaves room for it)."""
    spec = dict(headless._inputs(cls))
    sockets = [n for n, s in spec.items() if not headless.is_widget(s)]
    slots = headless.widget_slots(cls)
    outputs = list(getattr(cls, "RETURN_NAMES", getattr(cls, "RETURN_TYPES", ())))
    heights = []
    for name, extra in slots:
        opts = spec[name][1] if extra is None and len(spec[name]) > 1 else {}
        heights.append(MULTILINE_HEIGHT if opts.get("multiline") else WIDGET_HEIGHT)
    if kind in TEXT_NODES and after_run:
        heights.append(MULTILINE_HEIGHT)
    height = max(len(sockets), len(outputs), 1) * SLOT_HEIGHT
    height += (sum(h + 4 for h in heights) + 8 if heights else 0) + 6
    labels = lambda names: max((len(n) * LABEL_CHAR for n in names), default=0)  # noqa: E731
    width = max(TITLE_HEIGHT * 1.33 + len(title) * TITLE_CHAR,
                labels(sockets) + labels(outputs) + 2 * SLOT_HEIGHT + (5 if sockets and outputs else 0),
                labels([n for n, _ in slots]) + WIDGET_PADDING if slots else 0,
                NODE_WIDTH * (1.5 if slots else 1))
    if kind in TEXT_NODES and after_run:
        width = max(width, DISPLAY_WIDTH)
        height += DISPLAY_ROWS * DISPLAY_LINE
    low = MIN_SIZES.get(kind, [0, 0])
    return [int(-(-max(width, low[0]) // 10) * 10), int(-(-max(height, low[1]) // 10) * 10)]


def layout(flow: dict, sizes: dict) -> dict:
    """{id: [x, y]}: columns left to right, each as wide as its widest node; a column's
    nodes stacked in order with their title bars, no higher than an "align" partner."""
    pos, x = {}, LEFT
    align = flow.get("align", {})
    for col in sorted({c for _, _, c, _ in flow["nodes"]}):
        ids = [nid for nid, _, c, _ in flow["nodes"] if c == col]
        y = TOP
        for nid in ids:
            y = max(y, pos[align[nid]][1]) if nid in align else y
            pos[nid] = [x, y]
            y += sizes[nid][1] + TITLE_HEIGHT + GAP_Y
        x += max(sizes[nid][0] for nid in ids) + GAP_X
    return pos


WORKFLOWS = {
    "adatp_video_qa.json": QA,
    "vanilla_vs_adatp.json": VANILLA_VS_ADATP,
    "video_caption.json": CAPTION_FLOW,
    "fastv_baseline.json": FASTV,
    "caption_folder.json": CAPTION_FOLDER,
    "clip_dataset.json": CLIP_DATASET,
    "self_check.json": SELF_CHECK,
    "generated_video_qa.json": GENERATED_VIDEO_QA,
    "two_questions.json": TWO_QUESTIONS,
    "long_video_qa.json": LONG_VIDEO_QA,
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


def title_of(kind: str, flow: dict, nid: int, display_names: dict) -> str:
    return flow.get("titles", {}).get(nid) or display_names.get(kind) or DISPLAY_NAMES.get(kind, kind)


def build(flow: dict, mappings: dict, headless, display_names: dict | None = None) -> dict:
    classes = {**headless.CORE_NODES, **mappings}
    titles = {nid: title_of(kind, flow, nid, display_names or {}) for nid, kind, _, _ in flow["nodes"]}
    sizes = {nid: node_size(classes[kind], kind, titles[nid], headless) for nid, kind, _, _ in flow["nodes"]}
    room = {nid: node_size(classes[kind], kind, titles[nid], headless, after_run=True)
            for nid, kind, _, _ in flow["nodes"]}
    positions = layout(flow, room)
    nodes, links = {}, []
    for order, (nid, kind, _, overrides) in enumerate(flow["nodes"]):
        cls = classes[kind]
        sockets = [(n, s) for n, s in headless._inputs(cls) if not headless.is_widget(s)]
        nodes[nid] = {
            "id": nid, "type": kind, "pos": positions[nid], "size": sizes[nid],
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
    bottom = max(positions[nid][1] + room[nid][1] for nid in nodes)
    all_nodes = list(nodes.values()) + [{
        "id": note_id, "type": "Note", "pos": [LEFT, bottom + GAP_Y + TITLE_HEIGHT], "size": [700, 110],
        "flags": {}, "order": len(nodes),
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
    only = set(sys.argv[1:])  # file names to write (default: every workflow)
    for name, flow in WORKFLOWS.items():
        if only and name not in only:
            continue
        data = build(flow, pack.NODE_CLASS_MAPPINGS, headless, pack.NODE_DISPLAY_NAME_MAPPINGS)
        headless.Workflow(json.loads(json.dumps(data)), pack.NODE_CLASS_MAPPINGS)  # must pass its own checks
        (OUT / name).write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
