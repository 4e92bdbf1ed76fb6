"""Long videos in bounded memory (issue 30, items 1 and 2): every family's vision side encodes a
chunk of frames at a time, exactly (its tower attends within a frame or a temporal patch), and a
video file is decoded, preprocessed and encoded a chunk at a time, all of its frames never at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adatp_core import video as vid
from adatp_core.attention import extract_attention
from adatp_core.models.base import VideoPlan, join_encoded
from adatp_core.models.loader import load_video_llm
from adatp_core.models.tiny import ensure_tiny_model
from adatp_core.models.tiny_qwen import (ensure_tiny_qwen2_5_vl, ensure_tiny_qwen3_5, ensure_tiny_qwen3_5_moe,
                                         ensure_tiny_qwen3_vl, ensure_tiny_qwen3_vl_moe)
from adatp_core.samples import scene_frames, write_video
from adatp_core.streaming import EncodedVideo, encode_video

FAMILIES = {"llava_onevision": ensure_tiny_model, "qwen2_5_vl": ensure_tiny_qwen2_5_vl,
            "qwen3_vl": ensure_tiny_qwen3_vl, "qwen3_5": ensure_tiny_qwen3_5, "qwen3_5_moe": ensure_tiny_qwen3_5_moe,
            "qwen3_vl_moe": ensure_tiny_qwen3_vl_moe}
QUESTION = "What is the red square doing?"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("stream-models")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request, cache):
    return load_video_llm(FAMILIES[request.param](cache), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 7-frame clip (an odd count: Qwen's last temporal patch is padded) of two scenes."""
    folder = tmp_path_factory.mktemp("stream-clip")
    return write_video(folder / "clip.mp4", scene_frames(num_frames=7, width=96, height=64, scenes=2), fps=4.0)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def assert_same_encoding(one, chunked) -> None:
    assert one.grid == chunked.grid
    _close(one.visual, chunked.visual)
    _close(one.extras, chunked.extras)
    _close(one.frame_features, chunked.frame_features)
    assert len(one.injections) == len(chunked.injections)
    for a, b in zip(one.injections, chunked.injections):
        _close(a, b)


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 6])
def test_chunked_vision_equals_one_pass(model, chunk):
    """Chunk boundaries at several sizes (Qwen rounds a chunk up to whole temporal patches: 1 -> 2, 3 -> 4),
    7 frames so the last chunk is short and, for Qwen, padded as one pass pads."""
    adapter = model.adapter
    frames = torch.from_numpy(scene_frames(num_frames=7, width=96, height=64, scenes=2)).float() / 255
    plan = adapter.plan_video(7, 64, 96)
    one = adapter.encode(adapter.preprocess(frames, plan), plan)
    step = adapter.chunk_frames(plan, chunk)
    assert step % plan.frames_per_step == 0 and step >= chunk
    assert_same_encoding(one, adapter.encode_frames(frames, plan, chunk=chunk))


def test_a_chunk_that_starts_inside_a_temporal_patch_is_refused():
    plan = VideoPlan(num_frames=6, size=(64, 64), grid=(3, 2, 2), frame_times=tuple(range(6)), frames_per_step=2)
    assert plan.part(2, 5).grid == (2, 2, 2) and plan.part(2, 5).frame_times == (2, 3, 4)
    with pytest.raises(ValueError, match="whole temporal steps"):
        plan.part(1, 3)
    one = plan.part(0, 6)
    assert one == plan


def test_join_of_one_part_is_that_part(model):
    adapter = model.adapter
    frames = torch.rand(2, 32, 32, 3)
    plan = adapter.plan_video(2, 32, 32)
    enc = adapter.encode(adapter.preprocess(frames, plan), plan)
    assert join_encoded([enc]) is enc


def test_a_join_into_planned_buffers_equals_the_join_of_all_parts(model):
    """join_encoded with the plan's token count copies each part as it comes (a generator's parts are
    let go): the same Encoded as joining the list; fewer frames than planned give what they gave."""
    adapter = model.adapter
    frames = torch.from_numpy(scene_frames(num_frames=7, width=96, height=64, scenes=2)).float() / 255
    plan = adapter.plan_video(7, 64, 96)
    step = adapter.chunk_frames(plan, 2)
    parts = [adapter.encode(adapter.preprocess(frames[i:i + step], plan.part(i, min(i + step, 7))),
                            plan.part(i, min(i + step, 7))) for i in range(0, 7, step)]
    joined = join_encoded(iter(parts), plan.num_tokens)
    assert torch.equal(joined.visual, join_encoded(parts).visual) and joined.visual.shape[0] == plan.num_tokens
    assert_same_encoding(join_encoded(parts), joined)
    short = join_encoded(iter(parts[:2]), plan.num_tokens)
    assert_same_encoding(join_encoded(parts[:2]), short)
    with pytest.raises(ValueError, match="more visual rows than the 1 planned"):
        join_encoded(iter(parts), 1)


def test_streamed_file_equals_one_pass_over_its_frames(model, clip):
    """From the file, a chunk at a time: the same rows as the decoded IMAGE encoded at once, the same
    frame account, and Extract Attention keeps the same tokens with the same scores and hidden states."""
    adapter = model.adapter
    sample = vid.plan_sampling(clip, 7)
    video = encode_video(model, sample, chunk=2)
    frames, info = vid.decode_plan(sample, backend="pyav")  # what a stream decodes with (STREAM_BACKEND)
    image = vid.frames_to_image(frames)
    plan = adapter.plan_video(7, image.shape[1], image.shape[2], times=info.timestamps)
    assert video.plan == plan and video.info == info
    assert_same_encoding(adapter.encode(adapter.preprocess(image, plan), plan), video.encoded)
    streamed = extract_attention(model, video, QUESTION, reuse_prefix=False)
    whole = extract_attention(model, image, QUESTION, video_info=info, reuse_prefix=False)
    assert streamed.stats["video_streamed"] and not whole.stats["video_streamed"]
    assert torch.equal(streamed.prompt.input_ids, whole.prompt.input_ids)
    assert torch.equal(streamed.position_ids, whole.position_ids)
    _close(streamed.scores, whole.scores)
    # layer K's input rows reach |15|: float32 noise of the chunked tower is judged against their size
    # (as tests/test_chunked_prefill.py does), not against 1e-5 on each element
    err = (streamed.hidden - whole.hidden).abs().max().item()
    assert err <= 1e-5 * max(whole.hidden.abs().max().item(), 1.0), f"layer K's input rows: max error {err:.3g}"
    k = max(1, streamed.scores.numel() // 4)
    assert set(streamed.scores.topk(k).indices.tolist()) == set(whole.scores.topk(k).indices.tolist())


def test_a_second_question_over_a_streamed_video_reuses_its_prefix(model, clip):
    if model.adapter.prefix_refusal:
        pytest.skip(model.adapter.prefix_refusal)
    video = encode_video(model, vid.plan_sampling(clip, 7))
    first = extract_attention(model, video, QUESTION)
    second = extract_attention(model, video, "Where is it?")
    assert first.stats["prefix_cache"].startswith("miss") and second.stats["prefix_cache"] == "hit"


class CountingSource:
    """Stands in for the decoder (video.iter_frames): counts the frames it has given, and records, each
    time it gives one, how many of them the vision side has not preprocessed yet."""

    def __init__(self, adapter, monkeypatch):
        self.given = self.taken = 0
        self.ahead: list[int] = []
        real_pre = adapter.preprocess

        def preprocess(frames, plan=None):
            self.taken += int(frames.shape[0])
            return real_pre(frames, plan)

        monkeypatch.setattr(adapter, "preprocess", preprocess)
        monkeypatch.setattr(vid, "iter_frames", self)

    def __call__(self, path, times, probe, max_side, backend, on_frame, report, resume=True):
        frames = scene_frames(num_frames=len(times), width=96, height=64, scenes=2)
        for k, t in enumerate(times):
            self.given += 1
            self.ahead.append(self.given - self.taken)
            report.stamps.append(t)
            report.own.append(True)
            yield frames[k]
        report.backend = "counting"


def test_all_the_frames_never_exist_at_once(model, clip, monkeypatch):
    source = CountingSource(model.adapter, monkeypatch)
    sample = vid.plan_sampling(clip, 7)
    video = encode_video(model, sample, chunk=2)
    assert isinstance(video, EncodedVideo) and video.info.backend == "counting"
    assert source.given == source.taken == 7
    assert max(source.ahead) <= video.stats["frames_per_chunk"] == 2  # one chunk ahead of the vision side, at most
    assert video.encoded.grid[0] == model.adapter.plan_video(7, 64, 96).grid[0]


def test_the_frame_stream_is_lazy(clip):
    """FrameStream hands over one chunk at a time: after the first chunk, the decoder has given no more."""
    given = []
    stream = vid.FrameStream(vid.plan_sampling(clip, 7), chunk=3, backend="pyav", on_frame=given.append)
    chunks = iter(stream)
    first = next(chunks)
    assert first.shape == (3, 64, 96, 3) and first.dtype == np.uint8 and len(given) <= 3
    rest = list(chunks)
    assert [c.shape[0] for c in rest] == [3, 1] and len(given) == 7
    whole, info = vid.decode_plan(vid.plan_sampling(clip, 7), backend="pyav")
    assert np.array_equal(np.concatenate([first, *rest]), whole) and stream.info == info
    with pytest.raises(RuntimeError, match="read once"):
        next(iter(stream))


def test_an_encoded_video_belongs_to_its_model_and_settings(model, clip, tmp_path):
    video = encode_video(model, vid.plan_sampling(clip, 7))
    with pytest.raises(ValueError, match="encoded by another model"):
        extract_attention(load_video_llm(FAMILIES["llava_onevision"](tmp_path), device="cpu", dtype="float32"),
                          video, QUESTION)
    if model.adapter.mrope:
        with pytest.raises(ValueError, match="another pixel budget"):
            extract_attention(model, video, QUESTION, max_pixels=32 * 32)


def test_a_stream_decodes_in_this_process(model, clip, monkeypatch):
    """A stream's frames come from PyAV here, a frame when asked for: decord's child decodes ahead of a
    reader that stops to encode a chunk (at 1024 frames its memory reached 1.5 GB)."""
    monkeypatch.setattr(vid, "_decode_decord", lambda *a, **k: pytest.fail("a stream started decord's child"))
    assert encode_video(model, vid.plan_sampling(clip, 7)).info.backend == "pyav"


def test_one_pass_and_streamed_runs_decode_a_scaled_video_alike(tmp_path):
    """The pipeline's one pass (--no-stream) decodes with the stream's decoder: decord and PyAV scale a
    frame decoded smaller differently, so a video wider than the decode side gave the two runs other
    pixels (and another keep set)."""
    from adatp_core import pipeline

    path = tmp_path / "wide.mp4"
    write_video(path, scene_frames(6, 1280, 720), fps=8)
    model = load_video_llm(str(ensure_tiny_model()))
    cfg = pipeline.PipelineConfig(num_frames=4)
    frames, info, _ = pipeline.load_checked(model, path, [QUESTION], cfg)
    video, streamed_info, _ = pipeline.stream_checked(model, path, [QUESTION], cfg)
    assert info.backend == streamed_info.backend == "pyav" and info.timestamps == streamed_info.timestamps
    sample = vid.plan_sampling(path, 4, max_side=pipeline.decode_side(cfg.max_pixels))
    assert sample.size[0] < 1280  # decoded smaller: where the two decoders' scalers part
    stream, _ = vid.decode_plan(sample, backend="pyav")
    assert torch.equal(frames, vid.frames_to_image(stream))
