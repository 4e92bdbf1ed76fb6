"""AdaTP Extract Attention (Video File) (issue 30, item 8): a file-backed ComfyUI VIDEO is streamed
a chunk of frames at a time into Extract Attention, with the same state as the IMAGE path; a VIDEO
held as frames goes through its frames."""

from __future__ import annotations

import io
import re

import pytest
import torch
from comfy_video import VideoComponents, VideoFromComponents, VideoFromFile
from pack import pack_module

from adatp_core.samples import scene_frames, write_video

QUESTION = "What is the red square doing?"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", scene_frames(24, 96, 64, scenes=2), fps=8.0)


@pytest.fixture(scope="module")
def node_module():
    return pack_module("nodes.extract_attention_video")


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(pack_module("nodes.comfy_bridge").HEADLESS, "temp_dir", tmp_path / "temp")
    return tmp_path / "temp"


@pytest.mark.parametrize("source", ["path", "bytes"])
def test_a_file_video_is_streamed_with_the_image_paths_result(tiny, clip, node_module, temp_dir, source, monkeypatch):
    video = VideoFromFile(str(clip) if source == "path" else io.BytesIO(clip.read_bytes()))
    monkeypatch.setattr(type(video), "get_components", lambda self: pytest.fail("decoded every frame"))
    encoded = []
    streaming = pack_module("adatp_core.streaming")
    real = streaming.encode_video
    monkeypatch.setattr(node_module, "encode_video", lambda *a, **k: encoded.append(1) or real(*a, **k))
    state, info = node_module.AdaTP_ExtractAttentionVideo().extract(tiny, video, QUESTION, 2, "text", 8, "uniform",
                                                                    1.0, 0.0, 0.0)
    assert encoded == [1] and state.stats["video_streamed"] and len(info.timestamps) == 8
    assert state.stats["memory_peak_encode_host_mb"] > 0 and "memory_plan" in state.stats
    # planned for pruning at Prune Tokens' default retention, not as the stock model (every layer, every token)
    later = [int(re.search(r"x (\d+) tokens", part).group(1)) for part in state.stats["memory_plan"]["host"]
             if part.startswith("layers >= K's keys and values")]
    assert later and later[0] < state.stats["prompt_tokens_planned"] * 0.5, state.stats["memory_plan"]
    frames, want_info = pack_module("adatp_core.video").load_video(clip, 8)
    whole = pack_module("adatp_core.attention").extract_attention(tiny, frames, QUESTION, video_info=want_info,
                                                                  reuse_prefix=False)
    assert info.timestamps == want_info.timestamps
    torch.testing.assert_close(state.scores, whole.scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.hidden, whole.hidden, rtol=1e-4, atol=1e-5)
    assert not list(temp_dir.glob("*")) if temp_dir.exists() else True  # the bytes' file is gone


def test_a_video_held_as_frames_goes_through_its_frames(tiny, node_module):
    images = torch.from_numpy(scene_frames(12, 96, 64, scenes=2)).float() / 255
    from fractions import Fraction

    video = VideoFromComponents(VideoComponents(images=images, frame_rate=Fraction(8)))
    state, info = node_module.AdaTP_ExtractAttentionVideo().extract(tiny, video, QUESTION, 2, "text", 4, "uniform",
                                                                    1.0, 0.0, 0.0)
    assert not state.stats["video_streamed"] and info.backend == "memory" and state.stats["frames"] == 4


def test_a_run_too_large_is_refused_before_decoding(tiny, clip, node_module, monkeypatch):
    monkeypatch.setattr(pack_module("adatp_core.budget"), "available_host_bytes", lambda: 1000)
    monkeypatch.setattr(pack_module("adatp_core.video"), "iter_frames",
                        lambda *a, **k: pytest.fail("a frame was decoded"))
    with pytest.raises(ValueError, match="clip.mp4: 8 frame.*host memory.*nothing was decoded"):
        node_module.AdaTP_ExtractAttentionVideo().extract(tiny, VideoFromFile(str(clip)), QUESTION, 2, "text", 8,
                                                          "uniform", 1.0, 0.0, 0.0)


@pytest.mark.parametrize("data", [b"not a video at all\n" * 10, b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200])
def test_bad_bytes_are_named_as_the_video_input_not_the_servers_temp_file(tiny, node_module, temp_dir, data):
    """Hostile review 13: the error named the temp file the bytes were written to."""
    AdaTPInputError = pack_module("adatp_core.errors").AdaTPInputError  # noqa: N806  the pack's own class
    for run in (lambda v: node_module.AdaTP_ExtractAttentionVideo().extract(tiny, v, QUESTION, 2, "text", 8,
                                                                            "uniform", 1.0, 0.0, 0.0),
                lambda v: pack_module("nodes.sample_video").AdaTP_SampleVideo().sample(v, 8, "uniform", 1.0, 0.0,
                                                                                       0.0)):
        with pytest.raises(AdaTPInputError) as info:
            run(VideoFromFile(io.BytesIO(data)))
        assert "the VIDEO input" in str(info.value) and "adatp_video_" not in str(info.value)
        assert str(temp_dir) not in str(info.value)
    assert not list(temp_dir.glob("*"))  # the bytes' file is gone
