"""AdaTP Sample Video on ComfyUI's VIDEO (file, bytes, frames in memory, trimmed, cropped),
AdaTP Frame Times, and the pack on a ComfyUI without the VIDEO type."""

from __future__ import annotations

import io
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from comfy_video import TrimmedVideoFromFile, VideoComponents, VideoFromComponents, VideoFromFile, real_classes
from pack import ROOT, pack_module

from adatp_core.samples import write_video

REAL = real_classes()
# (VideoFromFile, VideoFromComponents, VideoComponents): the stand-ins, and ComfyUI's own when importable
KINDS = [pytest.param((VideoFromFile, VideoFromComponents, VideoComponents), id="stand-in"),
         pytest.param(REAL, id="comfyui", marks=pytest.mark.skipif(REAL is None, reason="ComfyUI not importable "
                                                                                      "(set ADATP_COMFYUI)"))]
SETTINGS = [dict(num_frames=8), dict(num_frames=500), dict(num_frames=5, start_time=1.3, end_time=4.2),
            dict(num_frames=100, sampling="fps", fps=2.0, start_time=1.0, end_time=3.0),
            dict(num_frames=3, sampling="fps", fps=3.0), dict(num_frames=20, sampling="fps", fps=20.0)]


def _call(settings: dict) -> dict:
    return {"num_frames": 32, "sampling": "uniform", "fps": 1.0, "start_time": 0.0, "end_time": 0.0, **settings}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """48 frames at 8 fps; frame i is flat with red = 32 (i % 8) and green = 32 (i // 8)."""
    frames = np.zeros((48, 64, 96, 3), dtype=np.uint8)
    for i in range(48):
        frames[i, ..., 0] = 32 * (i % 8)
        frames[i, ..., 1] = 32 * (i // 8)
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", frames, fps=8.0)


@pytest.fixture(scope="module")
def node():
    return pack_module("nodes.sample_video").AdaTP_SampleVideo()


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(pack_module("nodes.comfy_bridge").HEADLESS, "temp_dir", tmp_path / "temp")
    return tmp_path / "temp"


def load_video(path, **settings):
    """What AdaTP Load Video gives for the same file and settings."""
    return pack_module("adatp_core.video").load_video(path, **_call(settings))


@pytest.mark.parametrize("kinds", KINDS)
@pytest.mark.parametrize("settings", SETTINGS, ids=str)
@pytest.mark.parametrize("source", ["path", "bytes"])
def test_file_video_gives_load_videos_frames_and_times(clip, node, temp_dir, kinds, settings, source, monkeypatch):
    """A file-backed VIDEO (core Load Video: a path; API nodes: a BytesIO) is decoded by Load Video's
    decoders, sampled frames only: the same frames and times, never every frame."""
    file_cls = kinds[0]
    video = file_cls(str(clip) if source == "path" else io.BytesIO(clip.read_bytes()))
    monkeypatch.setattr(type(video), "get_components", lambda self: pytest.fail("decoded every frame"))
    frames, info = node.sample(video, **_call(settings))
    want, want_info = load_video(clip, **settings)
    assert torch.equal(frames, want) and frames.dtype == torch.float32
    assert info.timestamps == want_info.timestamps and info.backend == want_info.backend == "decord"
    assert (info.fps, info.width, info.height, info.duration) == (8.0, 96, 64, want_info.duration)
    assert info.path == (str(clip) if source == "path" else "(VIDEO in memory)")
    assert not temp_dir.exists() or not any(temp_dir.iterdir()), "the temp copy was left behind"


@pytest.mark.parametrize("kinds", KINDS)
@pytest.mark.parametrize("settings", SETTINGS, ids=str)
def test_video_in_memory_gives_load_videos_frames_and_times(clip, node, kinds, settings):
    """Create Video's VideoFromComponents of a file's frames: sampled from the tensor with the
    same frames and times as Load Video on the file (every frame of it decoded by Load Video)."""
    _, components_cls, video_components = kinds
    every, _ = load_video(clip, num_frames=1000)
    video = components_cls(video_components(images=every, frame_rate=Fraction(8)))
    frames, info = node.sample(video, **_call(settings))
    want, want_info = load_video(clip, **settings)
    assert torch.equal(frames, want)
    assert info.timestamps == pytest.approx(want_info.timestamps, abs=1e-9)
    assert (info.fps, info.frame_count, info.width, info.height, info.backend) == (8.0, 48, 96, 64, "memory")


def test_video_in_memory_times_come_from_its_frame_rate(node):
    """NTSC 29.97 fps as a Fraction: frame i is at i * 1001 / 30000 s, and only sampled frames are copied."""
    images = torch.arange(90, dtype=torch.float32)[:, None, None, None].expand(90, 4, 6, 3) / 100
    video = VideoFromComponents(VideoComponents(images=images, frame_rate=Fraction(30000, 1001)))
    frames, info = node.sample(video, 4, "fps", 1.0, 0.0, 0.0)
    index = [round(float(f[0, 0, 0]) * 100) for f in frames]
    assert index == [0, 29, 59]  # the frames on screen at 0, 1 and 2 s (frame 30 starts at 1.001 s)
    assert info.timestamps == pytest.approx([i * 1001 / 30000 for i in index])
    assert frames.shape == (len(index), 4, 6, 3) and frames.data_ptr() != images.data_ptr()


def test_large_video_in_memory_is_resized_like_load_video(node):
    images = torch.rand(3, 720, 1920, 3)
    frames, info = node.sample(VideoFromComponents(VideoComponents(images, Fraction(24))), 3, "uniform", 1.0, 0.0, 0.0)
    assert frames.shape == (3, 384, 1024, 3) and (info.width, info.height) == (1920, 720)
    assert 0.0 <= float(frames.min()) and float(frames.max()) <= 1.0


def test_trimmed_video_samples_its_window_of_the_file(clip, node):
    """A later ComfyUI's trimmed VideoFromFile (Video Slice): the window of the file, times from the
    clip's start, still through the decoders."""
    video = TrimmedVideoFromFile(str(clip), start_time=2.0, duration=3.0)
    video.get_components = lambda: pytest.fail("decoded every frame")
    frames, info = node.sample(video, 500, "uniform", 1.0, 0.0, 0.0)
    want, want_info = load_video(clip, num_frames=500, start_time=2.0, end_time=4.875)
    assert torch.equal(frames, want) and frames.shape[0] == 24  # frames 16..39, not the one at 5.0 s
    assert info.timestamps == pytest.approx([t - 2.0 for t in want_info.timestamps])
    assert info.duration == pytest.approx(3.0) and info.frame_count == 24
    frames, info = node.sample(video, 100, "fps", 1.0, 0.5, 2.5)
    assert info.timestamps == pytest.approx([0.5, 1.5, 2.5])
    assert torch.equal(frames, load_video(clip, num_frames=100, sampling="fps", start_time=2.5, end_time=4.5)[0])


def test_cropped_video_is_sampled_from_its_frames(clip, node):
    video = TrimmedVideoFromFile(str(clip)).as_cropped(16, 8, 32, 24)
    frames, info = node.sample(video, 4, "uniform", 1.0, 0.0, 0.0)
    assert frames.shape == (4, 24, 32, 3) and info.backend == "memory"
    full, _ = load_video(clip, num_frames=4)
    assert (frames - full[:, 8:32, 16:48]).abs().max() < 0.02  # ComfyUI's own decode of the same frames


def _input_error():
    return pack_module("adatp_core.errors").AdaTPInputError


@pytest.mark.parametrize("make, message", [
    (lambda tmp: VideoFromFile(str(tmp / "missing.mp4")), "does not exist"),
    (lambda tmp: VideoFromFile(io.BytesIO(b"")), "empty"),
    (lambda tmp: VideoFromFile(io.BytesIO(b"not a video at all" * 100)), "cannot be read as a video"),
    (lambda tmp: VideoFromComponents(VideoComponents(torch.zeros(0, 4, 4, 3), Fraction(8))), "no frames"),
    (lambda tmp: VideoFromComponents(VideoComponents(torch.zeros(4, 4, 3), Fraction(8))), r"\[T, H, W, 3\]"),
    (lambda tmp: VideoFromComponents(VideoComponents(torch.zeros(2, 4, 4, 3), Fraction(0))), "frame rate"),
    (lambda tmp: "clip.mp4", "must be a ComfyUI VIDEO"),
    (lambda tmp: None, "must be a ComfyUI VIDEO"),
])
def test_bad_videos_get_clear_errors(node, temp_dir, tmp_path, make, message):
    with pytest.raises(_input_error(), match=message):
        node.sample(make(tmp_path), 8, "uniform", 1.0, 0.0, 0.0)
    assert not temp_dir.exists() or not any(temp_dir.iterdir())


@pytest.mark.parametrize("settings, message", [
    (dict(start_time=10.0), "start_time"), (dict(num_frames=0), "num_frames"),
    (dict(sampling="fps", fps=0.0), "fps must be"), (dict(sampling="every"), "sampling"),
])
def test_bad_settings_get_load_videos_errors(clip, node, settings, message):
    every, _ = load_video(clip, num_frames=1000)
    for video in (VideoFromFile(str(clip)), VideoFromComponents(VideoComponents(every, Fraction(8)))):
        with pytest.raises(_input_error(), match=message):
            node.sample(video, **_call(settings))
        with pytest.raises(_input_error(), match=message):
            load_video(clip, **settings)


def test_a_broken_reader_is_an_input_error_not_a_crash(node):
    class Broken(VideoFromComponents):
        def get_components(self):
            raise ValueError("No video stream found in file 'x'")

    with pytest.raises(_input_error(), match="cannot be read.*No video stream"):
        node.sample(Broken(None), 8, "uniform", 1.0, 0.0, 0.0)


def test_frame_times(node):
    times = pack_module("nodes.frame_times").AdaTP_FrameTimes()
    frames = torch.zeros(5, 32, 48, 3)
    (info,) = times.times(frames, 12.5, 2.0)
    assert info.timestamps == pytest.approx([2.0, 2.08, 2.16, 2.24, 2.32])
    assert (info.fps, info.frame_count, info.width, info.height, info.duration) == (12.5, 5, 48, 32, 0.4)
    assert times.times(frames, 24.0)[0].timestamps[:2] == pytest.approx((0.0, 1 / 24))
    for bad, message in (((frames, 0.0), "fps"), ((frames, float("nan")), "fps"),
                         ((frames[0], 24.0), r"\[T, H, W, 3\]"), ((frames[:0], 24.0), "no frames"),
                         ((frames, 24.0, -1.0), "start_time")):
        with pytest.raises(_input_error(), match=message):
            times.times(*bad)


def test_frame_times_give_qwen_the_video_time(clip):
    """Frames from another loader plus Frame Times: the same times Load Video gives its own frames."""
    frames, info = load_video(clip, num_frames=100, sampling="fps", fps=8.0)
    (times,) = pack_module("nodes.frame_times").AdaTP_FrameTimes().times(frames, 8.0)
    assert times.timestamps == pytest.approx(info.timestamps)


OLD_COMFYUI = """
import sys, types
folder_paths = types.ModuleType("folder_paths")
folder_paths.models_dir = sys.argv[2]
folder_paths.add_model_folder_path = lambda *a, **k: None
folder_paths.get_input_directory = lambda: sys.argv[2]
sys.modules["folder_paths"] = folder_paths
if sys.argv[3] == "video":
    for name in ("comfy_api", "comfy_api.input"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["comfy_api.input"].VideoInput = type("VideoInput", (), {})
sys.path.insert(0, sys.argv[1] + "/scripts")
from run_workflow import load_pack
pack = load_pack()
print(sorted(pack.NODE_CLASS_MAPPINGS) == sorted(pack.NODE_DISPLAY_NAME_MAPPINGS), *sorted(pack.NODE_CLASS_MAPPINGS))
import torch
print(pack.NODE_CLASS_MAPPINGS["AdaTP_FrameTimes"]().times(torch.zeros(2, 4, 4, 3), 2.0)[0].timestamps)
"""


@pytest.mark.parametrize("comfyui", ["old", "video"])
def test_pack_loads_on_a_comfyui_without_the_video_type(tmp_path, comfyui):
    """Before ComfyUI 0.3.30 there is no VIDEO type (no comfy_api.input): Sample Video is absent and
    every other node is there and works."""
    out = subprocess.run([sys.executable, "-c", OLD_COMFYUI, str(ROOT), str(tmp_path), comfyui],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    names, times = out.stdout.strip().splitlines()
    listed = names.split()
    assert listed[0] == "True" and ("AdaTP_SampleVideo" in listed) == (comfyui == "video")
    assert ("AdaTP_ExtractAttentionVideo" in listed) == (comfyui == "video")
    assert len(listed[1:]) == (14 if comfyui == "video" else 12) and "AdaTP_FrameTimes" in listed
    assert times == "(0.0, 0.5)"
