"""The Qwen adapters: visual tokens, frame features, prompt and timestamps, M-RoPE positions and time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import QUESTION
from qwen_fixtures import *  # noqa: F401,F403  (tiny, stock, frames: the Qwen models)
from reference import stock_inputs, stock_video_kwargs

from adatp_core.attention import extract_attention
from adatp_core.flops import VisionShape, vision_flops
from adatp_core.video import VideoInfo


def _info(times):
    return VideoInfo(path="v.mp4", fps=1.0, duration=len(times), frame_count=len(times), width=280, height=224,
                     timestamps=tuple(times), backend="test")


def test_encode_matches_stock_video_features(tiny, stock, frames):
    plan = tiny.adapter.plan_video(*frames.shape[:3])
    prompt = tiny.adapter.build_prompt(QUESTION, plan)
    enc = tiny.adapter.encode(tiny.adapter.preprocess(frames, plan), plan)
    assert enc.grid == plan.grid and enc.visual.shape[0] == plan.num_tokens
    with torch.inference_mode():
        ours = tiny.adapter.assemble(prompt, enc)
        ref, pos, deepstack = stock_inputs(stock, prompt, stock_video_kwargs(tiny, prompt, frames))
    assert (ours - ref).abs().max().item() < 1e-5
    assert torch.equal(tiny.adapter.position_ids(prompt), pos)
    assert len(enc.injections) == len(deepstack)
    for a, b in zip(enc.injections, deepstack):
        assert torch.equal(a, b)


def test_frame_features_are_per_temporal_patch(tiny, frames):
    """One L2-normalised feature per temporal patch: the mean of its pre-merger patches. The
    reference runs the stock tower on each temporal patch alone (its attention never crosses
    temporal patches), so it does not depend on the order of the tower's rows."""
    plan = tiny.adapter.plan_video(*frames.shape[:3])
    pixels = tiny.adapter.preprocess(frames, plan)
    enc = tiny.adapter.encode(pixels, plan)
    t, gh, gw = tiny.adapter.grid_thw(plan)[0].tolist()
    per_step = gh * gw
    expected = []
    with torch.inference_mode():
        for j in range(t):
            out = tiny.adapter.visual(pixels[j * per_step:(j + 1) * per_step], grid_thw=torch.tensor([[1, gh, gw]]))
            expected.append(F.normalize(out.last_hidden_state.mean(dim=0), dim=-1))
    assert enc.frame_features.shape[0] == plan.grid[0] == t == 3  # 5 frames -> 3 temporal patches
    assert torch.allclose(enc.frame_features, torch.stack(expected), atol=1e-5)
    assert torch.allclose(enc.frame_features.norm(dim=-1), torch.ones(3))


def test_prompt_layout_and_timestamps(family, tiny, frames):
    ad = tiny.adapter
    plan = ad.plan_video(*frames.shape[:3], times=[0.0, 1.0, 2.0, 3.0, 4.0])
    prompt = ad.build_prompt(QUESTION, plan)
    text = ad.tokenizer.decode(prompt.input_ids)
    n = plan.tokens_per_step
    if family == "qwen2_5_vl":
        video = "<|video_pad|>" * plan.num_tokens
        assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    else:  # Qwen3VLProcessor: "<{t:.1f} seconds>" + vision_start + tokens + vision_end per temporal patch
        video = "".join(f"<{t} seconds><|vision_start|>" + "<|video_pad|>" * n + "<|vision_end|>"
                        for t in ("0.5", "2.5", "4.0"))  # pairs (0,1), (2,3) and (4, 4 repeated)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" if family == "qwen2_5_vl" else "") \
        + f"<|im_start|>user\n<|vision_start|>{video}<|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    assert int((prompt.input_ids == ad.video_token_id).sum()) == plan.num_tokens == len(prompt.visual_positions)
    q0, q1 = prompt.question
    assert ad.tokenizer.decode(prompt.input_ids[q0:q1]) == QUESTION


def test_special_tokens_in_the_question_stay_text(tiny, frames):
    plan = tiny.adapter.plan_video(*frames.shape[:3])
    prompt = tiny.adapter.build_prompt("what is <|video_pad|> and <|vision_start|>?", plan)
    assert int((prompt.input_ids == tiny.adapter.video_token_id).sum()) == plan.num_tokens


def test_positions_come_from_get_rope_index_and_frame_times(family, tiny, frames):
    """Qwen2.5-VL: temporal ids advance by tokens_per_second x seconds per temporal patch.
    Without frame times the frames count as 24 fps (transformers' default) and the stats say so."""
    timed = extract_attention(tiny, frames, QUESTION, video_info=_info([0.0, 1.0, 2.0, 3.0, 4.0]))
    assumed = extract_attention(tiny, frames, QUESTION)
    assert timed.stats["frame_times_assumed"] is False and assumed.stats["frame_times_assumed"] is True
    t, h, w = timed.grid
    for state in (timed, assumed):
        pos = state.position_ids[:, 0, state.prompt.visual_positions].view(3, t, h, w)
        start = int(pos[1].min())
        assert torch.equal(pos[1][0], (start + torch.arange(h)).view(h, 1).expand(h, w))  # rows
        assert torch.equal(pos[2][0], (start + torch.arange(w)).view(1, w).expand(h, w))  # columns
    temporal = lambda s: s.position_ids[0, 0, s.prompt.visual_positions].view(t, -1)[:, 0]  # noqa: E731
    if family == "qwen2_5_vl":
        tps = tiny.model.config.vision_config.tokens_per_second
        base = int(temporal(timed)[0])
        assert temporal(timed).tolist() == [base + int(j * tps * 2.0) for j in range(t)]  # 2 s per patch
        assert len(set(temporal(assumed).tolist())) == 1  # 2/24 s per patch: below one position step
    else:  # every temporal patch is its own grid after its timestamp text
        assert temporal(timed).tolist() == sorted(set(temporal(timed).tolist()))
        assert timed.prompt.length == assumed.prompt.length  # "<0.5 seconds>" vs "<0.0 seconds>": same shape


def test_decoding_continues_where_stock_generate_does(tiny, stock, frames):
    state = extract_attention(tiny, frames, QUESTION, layer=2)
    prompt = state.prompt
    _, pos, _ = stock_inputs(stock, prompt, stock_video_kwargs(tiny, prompt, frames), new_tokens=3)
    for step in range(3):
        assert torch.equal(tiny.adapter.next_position_ids(state.position_ids, step)[:, 0, 0],
                           pos[:, 0, prompt.length + step])


def test_pixel_budget_sets_the_grid_and_stats(family, tiny):
    frames = torch.rand(4, 480, 640, 3)
    small = tiny.adapter.plan_video(4, 480, 640, max_pixels=224 * 224)
    large = tiny.adapter.plan_video(4, 480, 640, max_pixels=448 * 448)
    assert small.num_tokens < large.num_tokens and large.grid[0] == 2
    state = extract_attention(tiny, frames, QUESTION, layer=1, max_pixels=224 * 224)
    assert state.grid == small.grid
    assert state.stats["tokens_per_frame"] == small.tokens_per_step / 2
    assert state.stats["frame_size"] == f"{small.size[1]}x{small.size[0]}"
    with pytest.raises(ValueError, match="max_pixels"):
        extract_attention(tiny, frames, QUESTION, max_pixels=100)


def test_vision_flops_of_the_7b_tower():
    """Qwen2.5-VL-7B's tower on 32 frames at 448x448 (16 temporal patches of 32x32 patches):
    about 21 TFLOP (window attention of 64 patches in 28 of 32 blocks)."""
    shape = VisionShape(layers=32, hidden=1280, intermediate=3420, patches=1024, patch_dim=3 * 2 * 14 * 14,
                        projector_out=3584, mlp_matrices=3, window=64, full_layers=4, projector_tokens=256,
                        projector_in=5120)
    total = vision_flops(shape, 16)
    assert 20e12 < total < 23e12
    full = vision_flops(VisionShape(**{**shape.__dict__, "window": 0}), 16)
    assert full > total  # full attention everywhere would cost more
