"""Check before decoding (issue 32, item 3): the context and the memory a video's frames will take
are checked from the probe and the sampling plan; a run that cannot fit is refused with the
estimate and what to change, and nothing is decoded. Caption Folder fails such a clip alone."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from pack import pack_module
from test_caption import CFG

from adatp_core import budget
from adatp_core import caption as cap
from adatp_core import cli
from adatp_core import video as vid
from adatp_core.errors import AdaTPInputError
from adatp_core.pipeline import PipelineConfig, run_pipeline
from adatp_core.samples import write_video


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """short.mp4: 4 frames; long.mp4: 48 frames (both 64x48)."""
    folder = tmp_path_factory.mktemp("fits")
    frames = np.zeros((48, 48, 64, 3), dtype=np.uint8)
    frames[..., 0] = (np.arange(48) * 5)[:, None, None]
    return {"short": write_video(folder / "short.mp4", frames[:4], fps=8.0),
            "long": write_video(folder / "long.mp4", frames, fps=8.0)}


@pytest.fixture
def no_decoding(monkeypatch):
    """Decoding fails the test."""
    monkeypatch.setattr(vid, "decode_frames", lambda *a, **k: pytest.fail("a frame was decoded"))


@pytest.fixture
def small_context(tiny, monkeypatch):
    """The tiny model's context cut to 2000 tokens: 10 frames of 196 tokens and a question."""
    monkeypatch.setattr(tiny.model.config.text_config, "max_position_embeddings", 2000)


def test_the_plan_knows_what_the_frames_take(clips):
    plan = vid.plan_sampling(clips["long"], 32)
    assert (plan.num_frames, plan.size) == (32, (64, 48))
    assert plan.memory().bytes_on("host") == 32 * 64 * 48 * 3 * (1 + 4)  # uint8 frames + float32 IMAGE
    assert budget.frames_bytes(1024, 1024, 1024) == (3 * 2**30, 12 * 2**30)  # README, "What frames cost"


def test_a_video_longer_than_the_context_is_refused_before_decoding(tiny, clips, small_context, no_decoding):
    with pytest.raises(AdaTPInputError, match=r"long.mp4: the prompt needs \d+ tokens but this model's context is "
                                              r"2000; use fewer frames or a shorter question \(about 10 frames "
                                              r"fit.*Nothing was decoded"):
        run_pipeline(tiny, clips["long"], "What happens?", PipelineConfig(num_frames=32))


def test_the_cli_refuses_it_with_a_message(tiny, clips, small_context, no_decoding, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: tiny)
    for questions in (["--question", "Why?"], ["--question", "Why?", "--question", "Where?"]):
        assert cli.main(["--video", str(clips["long"]), "--frames", "1024", *questions]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: long.mp4: the prompt needs") and "Traceback" not in err


def test_frames_beyond_the_hosts_memory_are_refused_before_decoding(clips, no_decoding, monkeypatch):
    need = 32 * 64 * 48 * 3 * 5
    monkeypatch.setattr(budget, "available_host_bytes", lambda: need)  # 75% of it may be planned
    with pytest.raises(AdaTPInputError, match=r"long.mp4: 32 frame\(s\) would need about 1.47 MB of host memory "
                                              r"\(decoded frames \[32, 48, 64, 3\] uint8 0.29 MB, the IMAGE .* "
                                              r"float32 1.18 MB\), more than the 75% of the 1.47 MB available.*"
                                              r"about 24 frame\(s\) would fit. Sample fewer frames.*nothing was "
                                              r"decoded"):
        vid.load_video(clips["long"], 32)


def test_load_video_node_refuses_it_too(clips, no_decoding, monkeypatch):
    bridge = pack_module("nodes.comfy_bridge")
    monkeypatch.setattr(bridge.HEADLESS, "input_dir", clips["long"].parent)
    monkeypatch.setattr(pack_module("adatp_core.budget"), "available_host_bytes", lambda: 1000)
    with pytest.raises(ValueError, match="host memory.*not even one frame fits"):
        pack_module("nodes.load_video").AdaTP_LoadVideo().load("long.mp4", 32, "uniform", 1.0, 0.0, 0.0)


def test_frames_in_memory_are_checked_before_they_are_copied(monkeypatch):
    import torch

    images = torch.zeros(40, 48, 64, 3)
    monkeypatch.setattr(budget, "available_host_bytes", lambda: 1000)
    with pytest.raises(AdaTPInputError, match="the VIDEO: 32 frame"):
        vid.sample_frames(images, 8, 32)


def test_the_models_input_counts_on_its_device(tiny, clips):
    """On the CPU the model's pixels and embeddings are host memory; on a GPU, that GPU's."""
    from adatp_core.attention import check_video_fits

    plan = vid.plan_sampling(clips["long"], 8)
    figures = check_video_fits(tiny, plan, ["What happens?"]).figures
    parts = figures["memory_plan"]["host"]  # each part of the run's peak, in MB (budget.run_memory)
    assert parts["decoded frames [8, 48, 64, 3] uint8"] * 1e6 + parts["the IMAGE [8, 48, 64, 3] float32"] * 1e6 \
        == pytest.approx(plan.memory().bytes_on("host"), abs=1e5)
    assert parts["one chunk's pixels [8, 3, 384, 384]"] * 1e6 == pytest.approx(8 * 3 * 384 * 384 * (4 + 4), abs=1e5)
    length = figures["prompt_tokens_planned"]
    assert parts[f"the prompt's embeddings and layer K's input rows [2 x {length}, 64]"] * 1e6 == pytest.approx(
        2 * length * 64 * 4, abs=1e5)
    weights = parts.pop("the model's weights")
    assert figures["memory_planned_host_mb"] == pytest.approx(sum(parts.values()), abs=0.5)
    assert figures["memory_planned_peak_host_mb"] == pytest.approx(sum(parts.values()) + weights, abs=0.5)
    estimate = budget.MemoryEstimate(parts=(("frames", 10, "host"), ("the model's pixel input", 9 * 2**30, "cuda:0")),
                                     frames=8)
    with pytest.raises(AdaTPInputError, match=r"memory on cuda:0 \(the model's pixel input 9.66 GB\).*90% of the "
                                              r"8.00 GB.*about 5 frame\(s\) would fit"):
        budget.check_memory(estimate, "x.mp4", available=lambda where: 8e9 if where == "cuda:0" else 1e12)
    budget.check_memory(estimate, "x.mp4", available=lambda where: None)  # unknown: not checked


def test_caption_folder_fails_a_clip_that_cannot_fit_alone_before_decoding(tiny, clips, tmp_path, small_context,
                                                                          monkeypatch):
    """short.mp4 has 4 frames (sampling clamps to them), long.mp4 gives 32: only long.mp4 is too long,
    and it is never decoded."""
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("short", "long"):
        (folder / f"{name}.mp4").write_bytes(clips[name].read_bytes())
    decoded = []
    real = cap.decode_plan
    monkeypatch.setattr(cap, "decode_plan", lambda plan, *a: decoded.append(plan.name) or real(plan, *a))
    job = cap.CaptionJob(folder=folder, pipeline=replace(CFG, num_frames=32), workers=1, processes=False)
    summary = cap.caption_folder(tiny, job)
    assert summary.done == ["short.mp4"] and [rel for rel, _ in summary.failed] == ["long.mp4"]
    assert "context is 2000" in summary.failed[0][1] and "Nothing was decoded" in summary.failed[0][1]
    assert decoded == ["short.mp4"] and not (folder / "long.txt").exists()


def test_available_memory_is_read_without_psutil_too(monkeypatch):
    import sys

    assert budget.available_host_bytes() > 0
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now raises ImportError
    assert budget.available_host_bytes() > 0  # /proc/meminfo, or os.sysconf


def test_the_probe_runs_in_a_worker_and_the_check_here(clips, monkeypatch):
    """An untrusted clip's container is opened by a decode worker, never by the consumer (ComfyUI's
    own thread, or the CLI's process when workers are processes); only the plan comes back to be
    checked here."""
    import threading

    probed, checked = [], []
    real = vid.probe_video
    monkeypatch.setattr(vid, "probe_video", lambda *a, **k: probed.append(threading.current_thread().name)
                        or real(*a, **k))
    paths = [clips["short"], clips["long"], clips["short"]]
    with cap.DecodeAhead(paths, replace(CFG, num_frames=4), workers=2, processes=False,
                         check=lambda plan: checked.append(threading.current_thread().name)) as ahead:
        got = [get()[0].shape[0] for _, get in ahead]
    assert got == [4, 4, 4]
    assert len(probed) == 3 and all(name.startswith("adatp-decode") for name in probed), probed
    assert checked == [threading.current_thread().name] * 3


def test_a_transformers_failure_in_the_check_stops_the_run(clips):
    """The model failing (here in the check) is not one clip's fault: DecodeAhead raises it, where a
    clip's own error (a probe that fails, a plan too large) fails that clip alone."""
    from adatp_core.errors import AdaTPTransformersError

    def check(plan):
        if plan.name == "long.mp4":
            raise AdaTPTransformersError("model family x: transformers 9.0 failed")
        raise AdaTPInputError(f"{plan.name}: too large")

    with cap.DecodeAhead([clips["short"], clips["long"]], replace(CFG, num_frames=4), workers=1,
                         processes=False, check=check) as ahead:
        with pytest.raises(AdaTPTransformersError):
            for _, get in ahead:
                with pytest.raises(AdaTPInputError, match="short.mp4: too large"):
                    get()
