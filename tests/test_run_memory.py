"""Frame limits from memory (issue 30, item 7): the run's peak is estimated before any work (the
weights, the frames or one chunk of them, the encoded rows, layers < K's keys and values, R·N's
from K, one chunk's working memory), a run that cannot fit is refused with that estimate and what
to change, and an absolute frame cap stays against hostile input."""

from __future__ import annotations

import pytest

from adatp_core import budget
from adatp_core import video as vid
from adatp_core.attention import check_video_fits
from adatp_core.errors import AdaTPInputError
from adatp_core.models.loader import load_video_llm
from adatp_core.models.tiny_qwen import ensure_tiny_qwen3_vl
from test_positions_context import QUESTION, sample_plan


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return load_video_llm(ensure_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3")), device="cpu", dtype="float32")


def planned(model, frames: int, **kwargs) -> dict:
    return check_video_fits(model, sample_plan(frames), [QUESTION], retention=0.25, **kwargs).figures


def test_the_streamed_peak_follows_what_survives_not_the_frames(qwen3):
    """Streamed, the frames are one chunk whatever their count; one pass holds them all as an IMAGE."""
    streamed = {n: planned(qwen3, n, streamed=True, prefill_chunk=8192) for n in (128, 1024)}
    one_pass = {n: planned(qwen3, n) for n in (128, 1024)}
    for n in (128, 1024):
        parts = streamed[n]["memory_plan"]["host"]
        assert "one chunk of decoded frames [16, 360, 640, 3] uint8" in parts
        assert not any("IMAGE" in what for what in parts)
        assert "the IMAGE [%d, 360, 640, 3] float32" % n in one_pass[n]["memory_plan"]["host"]
        assert parts["the model's weights"] > 0
    growth = streamed[1024]["memory_planned_host_mb"] / streamed[128]["memory_planned_host_mb"]
    assert growth < one_pass[1024]["memory_planned_host_mb"] / one_pass[128]["memory_planned_host_mb"]
    assert streamed[1024]["memory_planned_host_mb"] < one_pass[1024]["memory_planned_host_mb"] / 5


def test_pruning_and_k_show_in_the_estimate(qwen3):
    kept = planned(qwen3, 256, streamed=True)["memory_plan"]["host"]
    vanilla = check_video_fits(qwen3, sample_plan(256), [QUESTION], streamed=True).figures["memory_plan"]["host"]
    later = [(what, b) for what, b in kept.items() if what.startswith("layers >= K's keys and values")]
    assert later
    # no pruning: every token goes on through layers >= K, about four times the kept quarter and the text
    every = [b for what, b in vanilla.items() if what.startswith("layers >= K's keys and values")]
    assert every and every[0] > 3 * later[0][1]
    assert any(what.startswith("the answer's copy of layers < K's keys and values (2 layers") for what in vanilla)


def test_a_run_that_cannot_fit_is_refused_with_the_estimate_and_what_to_change(qwen3, monkeypatch):
    monkeypatch.setattr(vid, "decode_frames", lambda *a, **k: pytest.fail("a frame was decoded"))
    need = planned(qwen3, 512, streamed=True)["memory_planned_host_mb"] * 1e6
    monkeypatch.setattr(budget, "available_host_bytes", lambda: int(need / budget.HOST_MEMORY_SHARE) + 10**6)
    planned(qwen3, 512, streamed=True)  # fits, streamed
    with pytest.raises(AdaTPInputError, match=r"long.mp4: 512 frame\(s\) would need about .* of host memory "
                                              r"\(decoded frames \[512, 360, 640, 3\] uint8 .*the IMAGE .*layers < K's "
                                              r"keys and values.*; the run's peak would be about .* with the .* already "
                                              r"loaded; about \d+ frame\(s\) would fit. Sample fewer frames .*stream the "
                                              r"video file.*nothing was decoded"):
        planned(qwen3, 512)


def test_the_frames_that_fit_leave_room_for_what_does_not_grow():
    estimate = budget.MemoryEstimate(parts=(("rows", 100 * 10**6, "host"),), frames=100,
                                     fixed=(("one chunk", 50 * 10**6, "host"),),
                                     resident=(("weights", 10**9, "host"),))
    assert estimate.bytes_on("host") == 150 * 10**6 and estimate.peak_on("host") == 1150 * 10**6
    with pytest.raises(AdaTPInputError, match=r"about 50 frame\(s\) would fit"):  # (100 MB - 50 MB) / 1 MB a frame
        budget.check_memory(estimate, "x.mp4", available=lambda where: 100 * 10**6 / budget.HOST_MEMORY_SHARE)


def test_an_absolute_cap_stays_against_hostile_input():
    probe = vid.VideoProbe(fps=30.0, duration=24 * 3600.0, frame_count=24 * 3600 * 30, width=64, height=48,
                           codec="h264", start_time=0.0)
    assert len(vid.sample_times(probe, vid.MAX_FRAMES)) == vid.MAX_FRAMES
    for bad in (vid.MAX_FRAMES + 1, 10**9, -1, 0):
        with pytest.raises(AdaTPInputError, match="num_frames must be an integer"):
            vid.sample_times(probe, bad)
    with pytest.raises(AdaTPInputError, match=r"1 frame\(s\) a second over 86400 s are 86400 frames, more than the pack's limit of 16384"):
        vid.sample_times(probe, 0, "fps", fps=1.0)


def test_one_frame_a_second_for_the_whole_video():
    probe = vid.VideoProbe(fps=30.0, duration=1800.0, frame_count=54000, width=64, height=48, codec="h264",
                           start_time=0.0)
    times = vid.sample_times(probe, 0, "fps", fps=1.0)
    assert len(times) == 1800 and times[:3] == [0.0, 1.0, 2.0] and times[-1] == 1799.0
    assert len(vid.sample_times(probe, 32, "fps", fps=1.0)) == 32  # a count still thins them evenly


def test_a_chunked_calls_mask_is_one_blocks(qwen3):
    """A chunked prefill call's mask is one block's (TailCausal), not [chunk, L]."""
    figures = planned(qwen3, 256, streamed=True, prefill_chunk=8192)
    length = figures["prompt_tokens_planned"]
    call = figures["memory_plan"]["host"]["one prefill call's activations (8192 tokens)"] * 1e6
    assert length > 8192 and call < 8192 * length  # a [chunk, L] bool mask alone would be more


def test_captions_check_each_clip_with_the_runs_settings(qwen3, monkeypatch):
    """A caption run's check before decoding a clip weighs its own K, retention, chunks and answer length
    (it had the defaults: no pruning, K=2), its frames decoded as one IMAGE."""
    from adatp_core import pipeline
    from adatp_core.caption.stream import fits_check
    from adatp_core.generate import SamplingConfig

    cfg = pipeline.PipelineConfig(layer=3, retention=0.5, prefill_chunk=4096, chunk_frames=8,
                                  generation=SamplingConfig(max_new_tokens=40), encoded="host")
    figures = fits_check(qwen3, QUESTION, cfg)(sample_plan(64)).figures
    assert any(what.startswith("layers < K's keys and values (3 layers") for what in figures["memory_plan"]["host"])
    seen = {}
    monkeypatch.setattr(pipeline, "check_video_fits", lambda *a, **k: seen.update(k))
    fits_check(qwen3, QUESTION, cfg)(sample_plan(64))
    assert seen == {"layer": 3, "retention": 0.5, "streamed": False, "chunk_frames": 8, "prefill_chunk": 4096,
                    "max_new_tokens": 40, "encoded": "host", "rows": "auto", "kv": "device"}
