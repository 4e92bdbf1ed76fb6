"""Video probing, sampling and decoding with both backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adatp_core.errors import AdaTPInputError
from adatp_core.samples import scene_frames, write_video
from adatp_core.video import load_video, probe_video, sample_times


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """48 frames at 8 fps; frame i is flat with red = 32 (i % 8) and green = 32 (i // 8),
    steps wide enough to survive lossy coding, so the frame number reads back."""
    frames = np.zeros((48, 64, 96, 3), dtype=np.uint8)
    for i in range(48):
        frames[i, ..., 0] = 32 * (i % 8)
        frames[i, ..., 1] = 32 * (i // 8)
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", frames, fps=8.0)


def _frame_numbers(frames: torch.Tensor) -> list[int]:
    rg = frames[..., :2].mean(dim=(1, 2)) * 255 / 32
    return [int(round(g)) * 8 + int(round(r)) for r, g in rg.tolist()]


def test_probe(clip):
    p = probe_video(clip)
    assert (p.width, p.height, p.frame_count) == (96, 64, 48)
    assert p.fps == pytest.approx(8.0) and p.duration == pytest.approx(6.0)


def test_uniform_sampling_matches_llava_indices(clip):
    p = probe_video(clip)
    times = sample_times(p, 8)
    expected = np.linspace(0, 47, 8).round().astype(int)
    assert [round(t * 8) for t in times] == expected.tolist()


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_decoded_frames_are_the_sampled_ones(clip, backend):
    frames, info = load_video(clip, 8, backend=backend)
    assert frames.shape == (8, 64, 96, 3) and frames.dtype == torch.float32
    assert 0.0 <= frames.min() and frames.max() <= 1.0
    expected = np.linspace(0, 47, 8).round().astype(int).tolist()
    assert _frame_numbers(frames) == expected
    assert info.backend == backend
    assert list(info.timestamps) == sorted(info.timestamps)
    assert info.timestamps == pytest.approx([i / 8 for i in expected])


def test_backends_agree(clip):
    a, _ = load_video(clip, 5, backend="decord")
    b, _ = load_video(clip, 5, backend="pyav")
    assert torch.equal(a, b)


def test_fps_sampling_with_window_and_cap(clip):
    frames, info = load_video(clip, 100, sampling="fps", fps=2.0, start_time=1.0, end_time=3.0)
    assert info.timestamps == pytest.approx([1.0, 1.5, 2.0, 2.5, 3.0])
    capped, info = load_video(clip, 3, sampling="fps", fps=2.0, start_time=1.0, end_time=3.0)
    assert info.timestamps == pytest.approx([1.0, 2.0, 3.0])


def test_more_frames_than_video_clamps_to_every_frame(clip):
    frames, info = load_video(clip, 500)
    assert frames.shape[0] == 48
    assert _frame_numbers(frames) == list(range(48))


def test_max_side_resizes_while_decoding(tmp_path):
    path = write_video(tmp_path / "wide.mp4", scene_frames(4, 640, 360), fps=4)
    frames, info = load_video(path, 4, max_side=320)
    assert frames.shape[1:] == (180, 320, 3)
    assert (info.width, info.height) == (640, 360)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(AdaTPInputError, match="does not exist"):
        load_video(tmp_path / "nope.mp4")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(AdaTPInputError, match="empty"):
        load_video(empty)


def test_window_outside_video(clip):
    with pytest.raises(AdaTPInputError, match="start_time"):
        load_video(clip, 4, start_time=10.0)
    with pytest.raises(AdaTPInputError, match="start_time"):
        load_video(clip, 4, start_time=3.0, end_time=2.0)


# PyAV's av.open keywords across the supported releases: 12-18 take metadata_errors, 19 removed it
# (a TypeError for any caller that still passes it). These fakes accept exactly one release's
# keywords and hand on to the installed av.open, so both signatures are exercised whatever is installed.
def _pyav19_open(real, calls):
    def open(file, mode=None, format=None, options=None, container_options=None, buffer_size=32768,
             timeout=None, io_open=None, hwaccel=None):
        calls.append({"mode": mode})
        return real(file, mode)
    return open


def _pyav12_open(real, calls):
    def open(file, mode=None, format=None, options=None, container_options=None, stream_options=None,
             metadata_encoding="utf-8", metadata_errors="strict", buffer_size=32768, timeout=None,
             io_open=None, hwaccel=None):
        calls.append({"mode": mode, "metadata_errors": metadata_errors})
        return real(file, mode)
    return open


@pytest.mark.parametrize("fake", [_pyav19_open, _pyav12_open])
def test_video_opens_with_either_pyav_open_signature(clip, monkeypatch, fake):
    import av

    calls = []
    monkeypatch.setattr(av, "open", fake(av.open, calls))
    frames, info = load_video(clip, 4, backend="pyav")
    assert info.backend == "pyav" and frames.shape[0] == 4
    assert calls and all(c["mode"] in (None, "r") for c in calls)  # the probe and the decoder both opened it
    if fake is _pyav12_open:  # PyAV 12-18 are told to tolerate badly encoded tags
        assert all(c["metadata_errors"] != "strict" for c in calls)


def test_open_container_keeps_other_type_errors(monkeypatch):
    import av

    from adatp_core.video import open_container

    def broken(file, mode=None, **kwargs):
        raise TypeError("expected str, bytes or os.PathLike object")

    monkeypatch.setattr(av, "open", broken)
    with pytest.raises(TypeError, match="PathLike"):
        open_container(123)


def test_video_with_non_utf8_metadata_is_readable(tmp_path):
    """A Latin-1 title (byte 0xE9 alone) made PyAV 12-18 refuse the whole file under strict decoding."""
    import av

    from adatp_core.video import open_container

    path = tmp_path / "latin1.mp4"
    with open_container(str(path), "w") as container:
        container.metadata["title"] = "caf\udce9"  # written as the raw byte 0xE9 on every PyAV
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for img in scene_frames(8, 64, 48, scenes=1):
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    frames, info = load_video(path, 4, backend="pyav")
    assert frames.shape == (4, 48, 64, 3) and info.frame_count == 8


@pytest.mark.parametrize("width", [16, 48])
def test_narrow_frames_reach_the_model_as_pyav_decodes_them(tmp_path, width):
    """decord 0.6 returns (H, W, 6) arrays for some frame widths; read as (H, W, 3) rows they were
    garbled frames, silently. The worker refuses any frame that is not (H, W, 3) and the parent
    any bytes past the frames, so PyAV decodes such a clip (and every backend agrees)."""
    pytest.importorskip("decord")
    rng = np.random.default_rng(0)
    path = write_video(tmp_path / f"narrow_{width}.mp4",
                       rng.integers(0, 256, (6, 100, width, 3), dtype=np.uint8), fps=6.0)
    auto, info = load_video(path, 2)
    pyav, _ = load_video(path, 2, backend="pyav")
    assert auto.shape == pyav.shape and torch.equal(auto, pyav), info.backend


def test_a_folder_given_as_the_video_is_named_a_folder(tmp_path):
    with pytest.raises(AdaTPInputError, match="is a folder"):
        probe_video(tmp_path)
