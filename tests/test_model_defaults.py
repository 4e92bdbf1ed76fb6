"""The model's own defaults, one choice away (issue 31): its video budget and sampling, its
generation settings on Generate Answer, and its end-of-turn token as the stop."""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import QUESTION
from qwen_fixtures import qwen_cache  # noqa: F401
from test_generation_config import load_pair, stock_tokens, with_generation_config

from adatp_core.attention import extract_attention
from adatp_core.generate import SamplingConfig, generate_answer
from adatp_core.models.loader import load_video_llm
from adatp_core.models.tiny_qwen import ensure_tiny_qwen3_5, ensure_tiny_qwen3_vl
from adatp_core.samples import scene_frames, write_video
from adatp_core.video import PRESETS, QWEN_VL_PRESET, ProcessorSampling, VideoProbe, sample_times

# Qwen3.5 / Qwen3.6's video_preprocessor_config.json as the issue describes the published files: fps 2,
# 4 to 768 frames, a budget of longest_edge pixels over the whole video, 16 px patches merged 2x2, 2 frames
# a temporal patch; the rest as transformers' Qwen3-VL video processor and Qwen3-VL's published file.
REAL_QWEN3_5_VIDEO_PREPROCESSOR = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "fps": 2, "min_frames": 4,
    "max_frames": 768, "processor_class": "Qwen3VLProcessor", "video_processor_type": "Qwen3VLVideoProcessor",
}
# What Qwen3.5 / Qwen3.6 ship in generation_config.json (the review of the published files).
QWEN3_5_GENERATION = {"do_sample": True, "temperature": 1.0, "top_k": 20, "top_p": 0.95}


def _real_folder(qwen_cache, tmp_path):  # noqa: F811
    folder = tmp_path / "qwen3_5-real-processor"
    shutil.copytree(ensure_tiny_qwen3_5(qwen_cache), folder)
    (folder / "video_preprocessor_config.json").write_text(json.dumps(REAL_QWEN3_5_VIDEO_PREPROCESSOR, indent=2))
    return folder


def stock_video_tokens(num_frames: int, height: int, width: int, cfg: dict) -> int:
    """Visual tokens that the installed transformers' Qwen3-VL video processor gives these frames.

    Where its module imports (it needs PIL), its own ``get_num_of_video_patches``; else (PIL and
    torchvision are not importable beside torch 2.13 here) its own ``smart_resize``, taken from the
    installed source, with the budget as its ``resize`` sets it and its class's cap setting."""
    import transformers

    merge = cfg["merge_size"]
    kwargs = {k: v for k, v in cfg.items() if k not in ("processor_class", "video_processor_type")}
    try:
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    except ImportError:
        Qwen3VLVideoProcessor = None
    if Qwen3VLVideoProcessor is not None:
        processor = Qwen3VLVideoProcessor(**kwargs)
        return processor.get_num_of_video_patches(num_frames, height, width) // merge ** 2
    spec = importlib.util.find_spec("transformers.models.qwen3_vl.video_processing_qwen3_vl")
    tree = ast.parse(open(spec.origin, encoding="utf-8").read())
    code = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "smart_resize")
    space = {"math": math}
    exec(compile(ast.Module(body=[code], type_ignores=[]), spec.origin, "exec"), space)
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Qwen3VLVideoProcessor")
    attrs = {t.targets[0].id: t.value for t in cls.body if isinstance(t, ast.Assign) and
             isinstance(t.targets[0], ast.Name)}
    cap = cfg.get("cap_pixels_per_frame", ast.literal_eval(attrs["cap_pixels_per_frame"])
                  if "cap_pixels_per_frame" in attrs else None)
    assert not cap, f"transformers {transformers.__version__} caps frames by default: extend this reference"
    factor = cfg["patch_size"] * merge
    h, w = space["smart_resize"](num_frames, height, width, temporal_factor=cfg["temporal_patch_size"], factor=factor,
                                 min_pixels=cfg["size"]["shortest_edge"], max_pixels=cfg["size"]["longest_edge"])
    grid_t = -(-num_frames // cfg["temporal_patch_size"])
    return grid_t * (h // factor) * (w // factor)


def test_model_budget_on_32_frames_of_720p_is_stock_processors_count(qwen_cache, tmp_path, capsys):  # noqa: F811
    """--max-pixels model: the folder's budget spread over the frames as transformers' processor
    spreads it, on the frames as stored (720p, not the 1024-px decode the pack's default uses)."""
    from adatp_core import cli

    folder = _real_folder(qwen_cache, tmp_path)
    clip = write_video(tmp_path / "hd.mp4", scene_frames(32, 1280, 720, scenes=2), fps=8)
    assert cli.main(["--model", str(folder), "--video", str(clip), "--frames", "32", "--max-pixels", "model",
                     "--max-new-tokens", "1", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    expected = stock_video_tokens(32, 720, 1280, REAL_QWEN3_5_VIDEO_PREPROCESSOR)
    assert stats["frames"] == 32 and stats["tokens_total"] == expected == 11520
    assert stats["frame_size"] == "1152x640"
    assert stats["pixel_budget"] == "the model's: 25,165,824 px over the 32 frames (its video processor, no " \
                                    "per-frame cap)"
    # the pack's default on the same clip, for the README's table
    assert cli.main(["--model", str(folder), "--video", str(clip), "--frames", "32", "--max-new-tokens", "1",
                     "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert (default["tokens_total"], default["frame_size"]) == (2880, "576x320")
    assert default["pixel_budget"] == "200,704 px per frame (the pack's default, 448x448)"


def test_model_budget_follows_the_per_frame_cap_where_the_folder_turns_it_on(qwen_cache, tmp_path):  # noqa: F811
    folder = _real_folder(qwen_cache, tmp_path)
    cfg = {**REAL_QWEN3_5_VIDEO_PREPROCESSOR, "cap_pixels_per_frame": True}
    (folder / "video_preprocessor_config.json").write_text(json.dumps(cfg))
    adapter = load_video_llm(folder, device="cpu", dtype="float32").adapter
    plan = adapter.plan_video(8, 720, 1280, max_pixels="model")
    # 5.25's resize: min(768 tokens' pixels, longest_edge // frames), floored at 1.05 x shortest_edge, per frame
    per_frame = max(min(768 * 32 * 32, 25165824 // 8), int(4096 * 1.05))
    assert plan.size[0] * plan.size[1] <= per_frame and plan.grid[1] * plan.grid[2] <= 768
    assert "per-frame cap on" in adapter.budget_text(plan, "model")


def test_sampling_as_the_models_processor(qwen_cache, tmp_path):  # noqa: F811
    """transformers' Qwen3-VL sample_frames: int(seconds x fps) frames within [min, max] and the
    frames there are, spread by linspace(...).round() over the clip."""
    probe = VideoProbe(fps=30.0, duration=10.0, frame_count=300, width=64, height=64, codec="h264", start_time=0.0)
    rule = ProcessorSampling(2.0, 4, 768)
    times = sample_times(probe, 32, rule)
    assert len(times) == 20
    assert [round(t * 30) for t in times] == np.linspace(0, 299, 20).round().astype(int).tolist()
    short = VideoProbe(fps=30.0, duration=1.0, frame_count=30, width=64, height=64, codec="h264", start_time=0.0)
    assert len(sample_times(short, 32, rule)) == 4  # min_frames
    assert sample_times(probe, 32, QWEN_VL_PRESET) == times and PRESETS[QWEN_VL_PRESET] == rule
    assert QWEN_VL_PRESET == "Qwen-VL default: 2 fps, 4-768 frames"

    folder = _real_folder(qwen_cache, tmp_path)
    assert load_video_llm(folder, device="cpu", dtype="float32").adapter.processor_sampling() == (2.0, 4, 768)
    from adatp_core.errors import AdaTPInputError
    from adatp_core.models.tiny import ensure_tiny_model

    with pytest.raises(AdaTPInputError, match="does not sample frames itself"):
        load_video_llm(ensure_tiny_model(qwen_cache), device="cpu", dtype="float32").adapter.processor_sampling()


def test_node_follows_the_models_generation_config_as_stock_generate(qwen_cache, tmp_path):  # noqa: F811
    """Generate Answer with settings "model": the folder's generation_config.json (Qwen3.5's sampling)
    token for token as stock generate() with the same seed; a call without the input (a saved
    workflow, an API prompt) keeps the widgets' greedy answer."""
    from pack import pack_module

    folder = with_generation_config(ensure_tiny_qwen3_vl(qwen_cache), tmp_path / "q3", QWEN3_5_GENERATION)
    llm, stock = load_pair(folder)
    frames = torch.from_numpy(scene_frames(num_frames=4, width=128, height=96, scenes=2)).float() / 255
    state = extract_attention(llm, frames, QUESTION, layer=2)
    node = pack_module("nodes.generate_answer").AdaTP_GenerateAnswer
    spec = node.INPUT_TYPES()["optional"]
    assert list(spec) == ["repetition_penalty", "top_k", "settings"]  # appended last
    assert spec["settings"][1]["default"] == "model" and spec["settings"][1]["saved_default"] == "widgets"
    out = node().generate(state, 12, False, 1.0, 1.0, 7, 0.0, -1, "model")["result"]
    torch.manual_seed(7)
    theirs = stock_tokens(llm, stock, state, frames)
    ours = generate_answer(state, SamplingConfig(max_new_tokens=12, seed=7))
    assert list(ours.token_ids) == theirs and out[0] == ours.text
    assert "sampling (seed 7): temperature 1, top_k 20, top_p 0.95" in out[1] and "the model's" in out[1]
    saved = node().generate(state, 12, False, 1.0, 1.0, 7)["result"]  # saved before the input
    greedy = generate_answer(state, SamplingConfig(max_new_tokens=12, do_sample=False, seed=7))
    assert saved[0] == greedy.text and "greedy" in saved[1] and "this node's widgets" in saved[1]
    assert node().generate(state, 12, False, 1.0, 1.0, 7, settings="widgets")["result"][0] == greedy.text
    with pytest.raises(ValueError, match="settings"):
        node().generate(state, 2, False, 1.0, 1.0, 0, settings="mine")


def test_a_workflow_saved_before_the_settings_input_keeps_the_widgets():
    """headless.py fills a missing saved value with saved_default, as web/adatp.js does in ComfyUI; a
    workflow made now (the shipped ones, regenerated) holds "model"."""
    from pack import ROOT, load_pack, pack_module

    pack, headless = load_pack(), pack_module("nodes.headless")
    data = json.loads((ROOT / "workflows" / "adatp_video_qa.json").read_text())
    node = next(n for n in data["nodes"] if n["type"] == "AdaTP_GenerateAnswer")
    assert node["widgets_values"][-1] == "model"
    old = copy.deepcopy(data)
    next(n for n in old["nodes"] if n["type"] == "AdaTP_GenerateAnswer")["widgets_values"].pop()
    api = headless.Workflow(old, pack.NODE_CLASS_MAPPINGS).to_api()
    assert api[str(node["id"])]["inputs"]["settings"] == "widgets"
    api = headless.Workflow(data, pack.NODE_CLASS_MAPPINGS).to_api()
    assert api[str(node["id"])]["inputs"]["settings"] == "model"


def test_stop_at_the_end_of_turn_without_generation_config(qwen_cache, tmp_path):  # noqa: F811
    """A folder without generation_config.json, whose config.json and tokenizer name <|endoftext|> as
    eos (so transformers would run on past the turn): the chat template's <|im_end|> stops too."""
    folder = tmp_path / "no-generation-config"
    shutil.copytree(ensure_tiny_qwen3_5(qwen_cache), folder)
    (folder / "generation_config.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    llm = load_video_llm(ensure_tiny_qwen3_5(qwen_cache), device="cpu", dtype="float32")
    im_end, end_of_text = (llm.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
    config["eos_token_id"] = config["text_config"]["eos_token_id"] = end_of_text
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config["eos_token"] = "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    bare = load_video_llm(folder, device="cpu", dtype="float32")
    stock_eos = bare.model.generation_config.eos_token_id
    assert im_end not in (stock_eos if isinstance(stock_eos, list) else [stock_eos])  # stock would run on
    assert bare.adapter.end_of_turn == im_end and im_end in bare.adapter.eos_token_ids
    assert end_of_text in bare.adapter.eos_token_ids
    # with a generation config of its own, the model's stop set is left as it is
    assert set(llm.adapter.eos_token_ids) == set(llm.model.generation_config.eos_token_id)
    # the decode loop stops there: the first <|im_end|> of an answer run past it ends the answer
    frames = torch.from_numpy(scene_frames(num_frames=4, width=128, height=96, scenes=2)).float() / 255
    state = extract_attention(bare, frames, QUESTION, layer=4)
    bias = torch.zeros(bare.model.lm_head.weight.shape[0])
    bias[im_end] = 1e4  # make the end of turn the likeliest token at once
    hook = bare.model.lm_head.register_forward_hook(lambda module, args, out: out + bias.to(out.dtype))
    try:
        answer = generate_answer(state, SamplingConfig(max_new_tokens=16, do_sample=False))
    finally:
        hook.remove()
    assert answer.stats["new_tokens"] <= 1


def test_the_stop_set_asks_the_disk_once_per_model_not_per_answer(tiny, frames, monkeypatch):
    """Whether the folder has a generation_config.json is read once per loaded model: two answers
    (each asks for the stop ids) look for the file once; a change to the config in memory still acts."""
    from pathlib import Path

    looked = []
    is_file = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda self: looked.append(self.name) or is_file(self))
    monkeypatch.delitem(tiny.adapter.__dict__, "has_generation_config", raising=False)  # as freshly loaded
    for question in (QUESTION, "What is shown?"):
        state = extract_attention(tiny, frames, question, layer=2)
        generate_answer(state, SamplingConfig(max_new_tokens=2, do_sample=False))
    assert looked.count("generation_config.json") == 1
    config = tiny.model.generation_config
    monkeypatch.setattr(config, "eos_token_id", [7])
    assert tiny.adapter.eos_token_ids == (7,) and looked.count("generation_config.json") == 1
