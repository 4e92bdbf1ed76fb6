"""Clips that decode only in part (issue 32, item 2): each sampled frame is counted as decoded at its
own time or taken from elsewhere; below video.MIN_OWN_SHARE the clip is refused (Load Video, Sample
Video, the CLI) or failed alone (Caption Folder), and the damage is logged at WARNING."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_video import VideoFromFile
from pack import pack_module
from test_caption import CFG

from adatp_core import caption as cap
from adatp_core import video as vid
from adatp_core.pipeline import PipelineConfig, run_pipeline
from adatp_core.report import stats_text
from adatp_core.samples import write_video

FPS = 8.0
HAS_DECORD = importlib.util.find_spec("decord") is not None


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """clip.mp4: 48 frames at 8 fps, a keyframe every 8; frame i is flat with red = 32 (i % 8) and
    green = 32 (i // 8), so its number reads back, and a noisy corner (packets of some size).
    mild.mp4: the bytes of frames 16-23 (one keyframe interval) overwritten with 0xFF;
    heavy.mp4: those of frames 8-39."""
    folder = tmp_path_factory.mktemp("damaged")
    rng = np.random.default_rng(0)
    frames = np.zeros((48, 64, 96, 3), dtype=np.uint8)
    for i in range(48):
        frames[i, ..., 0] = 32 * (i % 8)
        frames[i, ..., 1] = 32 * (i // 8)
        frames[i, :16, :16] = rng.integers(0, 256, (16, 16, 3))
    clip = write_video(folder / "clip.mp4", frames, fps=FPS, gop=8)
    return {"clip": clip, "mild": garbled(clip, folder / "mild.mp4", range(16, 24)),
            "heavy": garbled(clip, folder / "heavy.mp4", range(8, 40))}


def garbled(src: Path, dst: Path, lost: range) -> Path:
    """A copy of ``src`` with the byte range that holds the packets of frames ``lost`` set to 0xFF."""
    import av

    with av.open(str(src)) as container:
        stream = container.streams.video[0]
        spans = [(p.pos, p.size) for p in container.demux(stream)
                 if p.pts is not None and round(float(p.pts * p.time_base) * FPS) in lost]
    lo, hi = min(pos for pos, _ in spans), max(pos + size for pos, size in spans)
    data = bytearray(src.read_bytes())
    data[lo:hi] = b"\xff" * (hi - lo)
    dst.write_bytes(bytes(data))
    return dst


def numbers(frames: np.ndarray) -> list[int]:
    rg = frames[:, 16:, 16:, :2].astype(float).mean(axis=(1, 2)) / 32
    return [int(round(g)) * 8 + int(round(r)) for r, g in rg.tolist()]


def test_a_whole_clip_decodes_every_frame_at_its_own_time(clips):
    for backend in ("pyav", *(("decord",) if HAS_DECORD else ())):
        frames, info = vid.read_video(clips["clip"], 8, backend=backend)
        assert info.frames_own_time == 8 and info.frames_substituted == (), backend
        assert numbers(frames) == [0, 7, 13, 20, 27, 34, 40, 47]


def test_pyav_decodes_past_a_damaged_interval_and_names_the_frame_from_elsewhere(clips, caplog):
    """One keyframe interval lost: the sampled frame in it (#4, frame 20 at 2.5 s) is the last good
    frame before it; the frames after the damage decode at their own times again."""
    with caplog.at_level(logging.WARNING, logger="adatp_core.video"):
        frames, info = vid.read_video(clips["mild"], 8, backend="pyav")
    assert info.frames_own_time == 7 and info.frames_substituted == ((3, 2.5),)
    got = numbers(frames)
    assert got[:3] + got[4:] == [0, 7, 13, 27, 34, 40, 47] and got[3] < 20
    assert info.timestamps[3] == pytest.approx(got[3] / FPS)  # the time of the frame given, not the one wanted
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("damaged packet(s) skipped" in w for w in warnings), warnings
    assert any("7 of 8 sampled frames decoded at their own times" in w and "#4 (wanted 2.50s)" in w
               for w in warnings), warnings


@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_a_clip_damaged_in_most_of_its_frames_is_refused(clips, backend, caplog):
    with caplog.at_level(logging.WARNING, logger="adatp_core.video"):
        with pytest.raises(vid.DamagedVideo, match=r"heavy.mp4 is damaged: only \d of 8 sampled frames decoded at "
                                                   r"their own times.*copies of other frames.*Re-download"):
            vid.read_video(clips["heavy"], 8, backend=backend)
    assert any("damaged packet(s) skipped" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.skipif(not HAS_DECORD, reason="decord is not installed")
def test_decord_refuses_damage_it_reads_and_decodes_around_damage_it_does_not(clips, caplog):
    """decord stops at a damaged packet (no frames from elsewhere, a refusal logged at WARNING); the auto
    backend then gives PyAV's account. Frames whose decoding never touches the damage are its own."""
    for name in ("mild", "heavy"):
        with caplog.at_level(logging.WARNING, logger="adatp_core.video"):
            with pytest.raises(vid.AdaTPInputError, match="could not be decoded|is damaged"):
                vid.read_video(clips[name], 8, backend="decord")
        assert any("decord could not decode" in r.getMessage() for r in caplog.records)
    frames, info = vid.read_video(clips["mild"], 2, backend="decord")  # frames 0 and 47
    assert info.frames_own_time == 2 and numbers(frames) == [0, 47]
    _, info = vid.read_video(clips["mild"], 8, backend="auto")
    assert (info.backend, info.frames_own_time) == ("pyav", 7)


def test_the_threshold():
    info = vid.VideoInfo(path="x.mp4", fps=8.0, duration=6.0, frame_count=48, width=96, height=64,
                         timestamps=(0.0,) * 8, backend="pyav", frames_own_time=6,
                         frames_substituted=((1, 0.9), (2, 1.6)))
    vid.check_damage(info, "x.mp4")  # 6 of 8 = MIN_OWN_SHARE: kept, with a warning
    with pytest.raises(vid.DamagedVideo, match="only 5 of 8"):
        vid.check_damage(replace(info, frames_own_time=5,
                                 frames_substituted=info.frames_substituted + ((3, 2.0),)), "x.mp4")
    assert vid.MIN_OWN_SHARE == 0.75  # README, "Damaged clips"


def test_the_stats_say_which_frames_came_from_elsewhere(tiny, clips):
    result = run_pipeline(tiny, clips["mild"], "What happens?", PipelineConfig(num_frames=8))
    assert result.stats["frames_own_time"] == 7
    assert [k for k, _, _ in result.stats["frames_substituted"]] == [3]
    text = stats_text(result.stats)
    assert "DAMAGED CLIP: 7 of 8 decoded at their own times, 1 from elsewhere: #4 (wanted 2.50s)" in text
    whole = run_pipeline(tiny, clips["clip"], "What happens?", PipelineConfig(num_frames=8))
    assert "all 8 decoded at their own times" in stats_text(whole.stats)
    # Frames sampled from a VIDEO in memory were never decoded: the stats claim nothing of them.
    frames, info = vid.sample_frames(torch.rand(16, 48, 64, 3), 8.0, num_frames=8)
    memory = run_pipeline(tiny, frames, "What happens?", PipelineConfig(num_frames=8), video_info=info)
    assert "frames_own_time" not in memory.stats and "decoded at their own" not in stats_text(memory.stats)


def test_load_video_and_sample_video_refuse_a_damaged_clip(clips, monkeypatch):
    bridge = pack_module("nodes.comfy_bridge")
    monkeypatch.setattr(bridge.HEADLESS, "input_dir", clips["heavy"].parent)
    with pytest.raises(ValueError, match="heavy.mp4 is damaged: only"):
        pack_module("nodes.load_video").AdaTP_LoadVideo().load("heavy.mp4", 8, "uniform", 1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="heavy.mp4 is damaged: only"):
        pack_module("nodes.sample_video").AdaTP_SampleVideo().sample(VideoFromFile(str(clips["heavy"])), 8,
                                                                     "uniform", 1.0, 0.0, 0.0)
    frames, info = pack_module("nodes.load_video").AdaTP_LoadVideo().load("mild.mp4", 8, "uniform", 1.0, 0.0, 0.0)
    assert frames.shape[0] == 8 and info.frames_own_time == 7


def test_caption_folder_fails_a_damaged_clip_alone_and_writes_no_caption_for_it(tiny, clips, tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("clip", "heavy"):
        (folder / f"{name}.mp4").write_bytes(clips[name].read_bytes())
    job = cap.CaptionJob(folder=folder, pipeline=replace(CFG, num_frames=8), workers=1,
                         processes=False)
    summary = cap.caption_folder(tiny, job)
    assert summary.done == ["clip.mp4"] and [rel for rel, _ in summary.failed] == ["heavy.mp4"]
    assert "is damaged: only" in summary.failed[0][1]
    assert (folder / "clip.txt").is_file() and not (folder / "heavy.txt").exists()
    assert "failed (1): <clip> is damaged" in summary.text()
