"""Context from positions (issue 30, item 6): the M-RoPE families' limit is on position ids, which
grow with the video's time, not with its tokens; LLaVA-OneVision (1-D positions) keeps the token
check. Both are checked from the sampling plan, before any frame is decoded."""

from __future__ import annotations

import pytest
import torch

from adatp_core import video as vid
from adatp_core.attention import check_video_fits, plan_prompt
from adatp_core.errors import AdaTPInputError
from adatp_core.models.loader import load_video_llm
from adatp_core.models.tiny_qwen import ensure_tiny_qwen3_vl

QUESTION = "What happens in this video?"


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return load_video_llm(ensure_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3")), device="cpu", dtype="float32")


def sample_plan(num_frames: int, width: int = 640, height: int = 360, fps: float = 1.0) -> vid.SamplePlan:
    """A sampling plan of ``num_frames`` frames one second apart, made without a file (nothing to decode)."""
    probe = vid.VideoProbe(fps=fps, duration=num_frames / fps, frame_count=num_frames, width=width,
                           height=height, codec="h264", start_time=0.0)
    return vid.SamplePlan(path="/nonexistent/long.mp4", probe=probe,
                          times=tuple(i / fps for i in range(num_frames)), size=(width, height))


def test_1024_frames_fit_the_tiny_qwen3_vl_by_positions(qwen3, monkeypatch):
    monkeypatch.setattr(vid, "decode_frames", lambda *a, **k: pytest.fail("a frame was decoded"))
    adapter = qwen3.adapter
    limit = adapter.text_model.config.max_position_embeddings
    prompt = plan_prompt(adapter, QUESTION, 1024, 360, 640)
    assert prompt.length > limit  # more tokens than the context (98k against 32k)...
    assert adapter.position_extent(prompt) == int(adapter.position_ids(prompt).max()) + 1 <= limit  # ...in it
    figures = check_video_fits(qwen3, sample_plan(1024, 320, 180), [QUESTION]).figures
    assert figures["prompt_tokens_planned"] > limit


def test_a_position_overflow_is_refused_before_decoding(qwen3, monkeypatch):
    monkeypatch.setattr(vid, "decode_frames", lambda *a, **k: pytest.fail("a frame was decoded"))
    adapter = qwen3.adapter
    sample = sample_plan(1024, 320, 180)
    extent = adapter.position_extent(plan_prompt(adapter, QUESTION, 1024, 180, 320, sample.times))
    monkeypatch.setattr(adapter.text_model.config, "max_position_embeddings", extent - 1)
    with pytest.raises(AdaTPInputError, match=rf"long.mp4: the prompt's positions reach {extent} \(\d+ tokens; "
                                              r"this model's M-RoPE positions grow with the video's time\) but this "
                                              rf"model's context is {extent - 1} positions; use fewer frames.*"
                                              r"\(about 10\d\d frames fit\).*Nothing was decoded"):
        check_video_fits(qwen3, sample, [QUESTION])
    assert plan_prompt(adapter, QUESTION, 1000, 180, 320, sample.times[:1000]).length  # fewer frames fit


def test_positions_follow_time_not_tokens(qwen3):
    """The same frames at four times the pixels: four times the tokens, but positions grow with a
    temporal patch's longer side (Qwen3-VL's get_rope_index), so less than twice."""
    adapter = qwen3.adapter
    small = plan_prompt(adapter, QUESTION, 64, 720, 1280)
    large = plan_prompt(adapter, QUESTION, 64, 720, 1280, max_pixels=4 * 448 * 448)
    assert large.length > 3 * small.length
    assert adapter.position_extent(large) < 2 * adapter.position_extent(small)


def test_llava_onevision_keeps_the_token_check(tiny, monkeypatch):
    adapter = tiny.adapter
    assert not adapter.mrope
    prompt = plan_prompt(adapter, QUESTION, 4, 96, 128)
    assert adapter.position_extent(prompt) == prompt.length
    monkeypatch.setattr(adapter.text_model.config, "max_position_embeddings", prompt.length - 1)
    with pytest.raises(AdaTPInputError, match=rf"the prompt needs {prompt.length} tokens but this model's context"):
        plan_prompt(adapter, QUESTION, 4, 96, 128)
    assert torch.equal(adapter.position_ids(prompt)[0], torch.arange(prompt.length))


def test_the_answer_has_room_by_positions_too(qwen3, tiny):
    """generate.check_room: the answer's positions go on from the prompt's largest position id."""
    from types import SimpleNamespace

    from adatp_core.generate import SamplingConfig, check_room

    limit = qwen3.adapter.text_model.config.max_position_embeddings
    state = SimpleNamespace(model=qwen3, prompt=SimpleNamespace(length=3 * limit),
                            position_ids=torch.full((3, 1, 5), limit - 100))
    check_room(state, SamplingConfig(max_new_tokens=99))
    with pytest.raises(AdaTPInputError, match=rf"positions up to {limit - 100}\) plus max_new_tokens \(100\)"):
        check_room(state, SamplingConfig(max_new_tokens=100))
    small = tiny.adapter.text_model.config.max_position_embeddings
    flat = SimpleNamespace(model=tiny, prompt=SimpleNamespace(length=small), position_ids=torch.arange(small)[None])
    with pytest.raises(AdaTPInputError, match=rf"prompt \({small} tokens\) plus max_new_tokens"):
        check_room(flat, SamplingConfig(max_new_tokens=1))
