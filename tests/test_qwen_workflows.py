"""The shipped workflows, run headless on the tiny Qwen models (their default stays the LLaVA-OV tiny),
with Load Video's video_info connected to Extract Attention's optional input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from pack import ROOT, load_pack, pack_module
from test_workflows import bypass_gives_fastv

from adatp_core.models.tiny_qwen import (TINY_QWEN2_5_VL_NAME, TINY_QWEN3_5_MOE_NAME, TINY_QWEN3_5_NAME,
                                        TINY_QWEN3_VL_MOE_NAME, TINY_QWEN3_VL_NAME)

MODELS = {"qwen2.5-vl": TINY_QWEN2_5_VL_NAME, "qwen3-vl": TINY_QWEN3_VL_NAME, "qwen3.5": TINY_QWEN3_5_NAME,
          "qwen3.5-moe": TINY_QWEN3_5_MOE_NAME, "qwen3-vl-moe": TINY_QWEN3_VL_MOE_NAME}

# The question-answering workflows (Caption Folder has no Extract Attention; test_caption.py covers it).
WORKFLOWS = sorted(p for p in (ROOT / "workflows").glob("*.json") if "AdaTP_ExtractAttention" in p.read_text())


@pytest.fixture(scope="module")
def env(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("ADATP_CACHE_DIR", str(tmp_path_factory.mktemp("adatp-qwen-workflows")))
    pack = load_pack()
    pack_module("nodes.comfy_bridge").HEADLESS.output_dir = tmp_path_factory.mktemp("out")
    return pack, pack_module("nodes.headless")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _on_qwen(data: dict, model: str, frames: int = 8, link_info: bool = True) -> dict:
    """The workflow with the Qwen tiny model and fewer frames. The shipped workflows link
    Load Video's video_info to Extract Attention; ``link_info=False`` unplugs it."""
    wf = copy.deepcopy(data)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for node in wf["nodes"]:
        if node["type"] == "AdaTP_LoadVideoLLM":
            node["widgets_values"][0] = model
        if node["type"] == "AdaTP_LoadVideo":
            node["widgets_values"][1] = frames
        if node["type"] == "AdaTP_SampleVideo":  # generated_video_qa.json: core Load Video's VIDEO
            node["widgets_values"][0] = frames
        if node["type"] == "AdaTP_ExtractAttentionVideo":  # long_video_qa.json: at most `frames` at 1 fps
            node["widgets_values"][3] = frames
    info_links = [link for link in wf["links"]
                  if link[5] == "ADATP_VIDEO_INFO" and nodes[link[3]]["type"] == "AdaTP_ExtractAttention"]
    extracts = [n for n in wf["nodes"] if n["type"] == "AdaTP_ExtractAttention"]
    streamed = [n for n in wf["nodes"] if n["type"] == "AdaTP_ExtractAttentionVideo"]  # it reads its own times
    assert len(info_links) == len(extracts) and extracts or streamed, "a shipped workflow does not connect video_info"
    if not link_info:
        for link_id, src, src_slot, dst, dst_slot, _ in info_links:
            wf["links"].remove([link_id, src, src_slot, dst, dst_slot, "ADATP_VIDEO_INFO"])
            nodes[src]["outputs"][src_slot]["links"].remove(link_id)
            nodes[dst]["inputs"][dst_slot]["link"] = None
    return wf


@pytest.mark.parametrize("model", MODELS.values(), ids=MODELS.keys())
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflows_run_on_qwen(env, path, model):
    pack, headless = env
    result = headless.run_workflow(_on_qwen(json.loads(path.read_text()), model), pack.NODE_CLASS_MAPPINGS,
                                   log=lambda m: None)
    texts = [t for _, t in result.texts()]
    assert any(t.startswith("Tokens kept:") for t in texts)
    videos = [line for t in texts for line in t.splitlines() if line.startswith("Video:")]
    assert videos and all("8 frames" in v and "temporal patches of 2" in v and "from the video" in v for v in videos)
    for image in result.images():
        assert open(image, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_without_video_info_the_stats_say_times_are_assumed(env):
    pack, headless = env
    data = json.loads((ROOT / "workflows" / "fastv_baseline.json").read_text())
    result = headless.run_workflow(_on_qwen(data, TINY_QWEN2_5_VL_NAME, link_info=False),
                                   pack.NODE_CLASS_MAPPINGS, log=lambda m: None)
    assert any("frame times assumed at 24 fps" in t for _, t in result.texts())


def test_bypassing_both_debias_nodes_gives_fastv_on_qwen(env):
    data = _on_qwen(json.loads((ROOT / "workflows" / "adatp_video_qa.json").read_text()), TINY_QWEN3_VL_NAME)
    bypass_gives_fastv(*env, data)


@pytest.mark.parametrize("model_name", MODELS.values(), ids=MODELS.keys())
def test_spec_invariants_through_the_nodes(env, model_name):
    """Grid of temporal patches, budgets, segment coverage, no repeated cell after Local Debias,
    branch safety, keep-all = vanilla and Preview Tokens, node by node on a tiny Qwen model."""
    pack, _ = env
    m = pack.NODE_CLASS_MAPPINGS
    model = m["AdaTP_LoadVideoLLM"]().load(model_name, "float32", "sdpa", "cpu", True)[0]
    frames, info = m["AdaTP_LoadVideo"]().load("adatp_sample_video.mp4", 7, "uniform", 1.0, 0.0, 0.0)
    state = m["AdaTP_ExtractAttention"]().extract(model, frames, "What moves?", 2, "text", info, 160 * 160)[0]
    t, h, w = state.grid
    assert t == 4 and not state.stats["frame_times_assumed"]  # 7 frames: 4 temporal patches, the last padded
    assert state.layer == model.adapter.default_layer()  # K = 2, moved to 4 on the hybrid models
    forced = m["AdaTP_GlobalDebias"]().debias(state, 1.0, 1.0)[0]  # every temporal patch its own segment
    assert forced.segments == tuple((i, i) for i in range(t))
    debiased = m["AdaTP_LocalDebias"]().debias(forced, 1)[0]
    out = m["AdaTP_PruneTokens"]().prune(debiased, 0.3)
    pruned = out["result"][0]
    assert sum(pruned.budgets) == pruned.keep.numel() == round(0.3 * t * h * w)
    for (first, last), b in zip(pruned.segments, pruned.budgets):
        lo, hi = first * h * w, (last + 1) * h * w
        kept = pruned.keep[(pruned.keep >= lo) & (pruned.keep < hi)]
        assert kept.numel() == b <= (last - first + 1) * h * w
        if b <= h * w:
            assert (kept % (h * w)).unique().numel() == b
    natural = m["AdaTP_GlobalDebias"]().debias(state, 0.95, 1.0)[0]
    covered = [f for a, b in natural.segments for f in range(a, b + 1)]
    assert covered == list(range(t))
    gen = m["AdaTP_GenerateAnswer"]()
    args = (8, False, 1.0, 1.0, 0)
    full = m["AdaTP_PruneTokens"]().prune(state, 1.0)["result"][0]
    assert gen.generate(full, *args)["result"][0] == gen.generate(state, *args)["result"][0]  # keep-all = vanilla
    first = gen.generate(pruned, *args)["result"][0]
    gen.generate(full, *args)
    assert gen.generate(pruned, *args)["result"][0] == first  # branches do not affect each other
    assert state.keep is None and debiased.keep is None
    image = m["AdaTP_PreviewTokens"]().preview(pruned, frames)[0]  # 7 frames -> one picture per patch
    assert image.ndim == 4 and image.shape[-1] == 3
    with pytest.raises(ValueError, match="frames"):
        m["AdaTP_PreviewTokens"]().preview(pruned, frames[:2])
