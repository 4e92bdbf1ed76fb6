"""Captioning a folder of clips: which clips, where captions go, resume, atomic
writes, the manifest, the summary, two processes, and the node against the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pack import ROOT, pack_module

from adatp_core import caption as cap
from adatp_core.cli import main as cli_main
from adatp_core.errors import AdaTPInterrupted
from adatp_core.generate import SamplingConfig
from adatp_core.pipeline import PipelineConfig
from adatp_core.samples import scene_frames, write_video

SETTINGS = ["--frames", "2", "--max-new-tokens", "3", "--workers", "1"]
CFG = PipelineConfig(num_frames=2, generation=SamplingConfig(max_new_tokens=3))
GOOD = ["a.mp4", "sub/b.mp4", "sub/deeper/c.mkv"]


@pytest.fixture(scope="session")
def clip_bytes(tmp_path_factory) -> bytes:
    path = write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", scene_frames(6, 64, 48, scenes=2), fps=4.0)
    return path.read_bytes()


@pytest.fixture
def folder(tmp_path, clip_bytes) -> Path:
    """Nested clips, a corrupt clip, a 0-byte clip, a non-video file, a hidden clip
    and a clip that already has its caption."""
    root = tmp_path / "clips"
    for rel in GOOD + ["done.mp4", ".hidden.mp4", ".cache/x.mp4"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(clip_bytes)
    (root / "corrupt.mp4").write_bytes(clip_bytes[:600])  # truncated: no index
    (root / "empty.mp4").write_bytes(b"")
    (root / "notes.md").write_text("not a video")
    (root / "done.txt").write_text("an earlier caption")
    return root


def txt_files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*.txt"))}


def job(root, **kw) -> cap.CaptionJob:
    return cap.CaptionJob(folder=root, pipeline=CFG, workers=kw.pop("workers", 1), **kw)


def test_clip_discovery_is_sorted_and_skips_hidden_and_other_files(folder):
    assert [p.relative_to(folder).as_posix() for p in cap.find_clips(folder)] == [
        "a.mp4", "corrupt.mp4", "done.mp4", "empty.mp4"]
    every = [p.relative_to(folder).as_posix() for p in cap.find_clips(folder, recursive=True)]
    assert every == ["a.mp4", "corrupt.mp4", "done.mp4", "empty.mp4", "sub/b.mp4", "sub/deeper/c.mkv"]
    assert cap.find_clips(folder, True, exclude=[folder / "sub"]) == cap.find_clips(folder)
    assert cap.caption_path(folder / "sub/b.mp4", folder) == folder / "sub/b.txt"
    assert cap.caption_path(folder / "sub/b.mp4", folder, folder / "out") == folder / "out/sub/b.txt"


def test_folder_run_rerun_and_overwrite(tiny, folder, tmp_path):
    manifest = tmp_path / "m.jsonl"
    summary = cap.caption_folder(tiny, job(folder, recursive=True, prefix="trig, ", suffix=" END"),
                                 manifest=manifest)
    files = txt_files(folder)
    assert sorted(files) == ["a.txt", "done.txt", "sub/b.txt", "sub/deeper/c.txt"]
    assert files["done.txt"] == "an earlier caption"
    assert summary.done == GOOD and summary.skipped == ["done.mp4"] and summary.found == 6
    failed = dict(summary.failed)
    assert sorted(failed) == ["corrupt.mp4", "empty.mp4"]
    assert "empty (0 bytes)" in failed["empty.mp4"] and "cannot be read as a video" in failed["corrupt.mp4"]
    for rel in GOOD:
        text = files[rel.rsplit(".", 1)[0] + ".txt"]
        assert text.startswith("trig, ") and text.endswith(" END") and len(text) > len("trig,  END")
    assert list(summary.captions) == ["a.mp4", "done.mp4", "sub/b.mp4", "sub/deeper/c.mkv"]
    assert summary.captions["done.mp4"] == "an earlier caption"
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["path"] for r in records] == ["a.mp4", "corrupt.mp4", "empty.mp4", "sub/b.mp4", "sub/deeper/c.mkv"]
    for r in records:
        if r["path"] in GOOD:
            assert r["caption"] == files[r["path"].rsplit(".", 1)[0] + ".txt"]
            assert r["tokens_kept"] == 2 * 49 and r["tokens_total"] == 2 * 196
            assert 0 < r["flops_ratio"] < 1 and r["ttft_s"] > 0 and r["tokens_per_s"] > 0
        else:
            assert r["error"] == failed[r["path"]] and "caption" not in r
    text = summary.text()
    assert "Captioned 3 clip(s), skipped 1 already captioned, failed 2, of 6 found." in text
    assert "clips/min" in text and "model busy" in text and "empty (0 bytes)" in text
    assert summary.exit_code() == 0

    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*.txt")}
    again = cap.caption_folder(tiny, job(folder, recursive=True, workers=0), manifest=manifest)
    assert again.done == [] and sorted(again.skipped) == ["a.mp4", "done.mp4", "sub/b.mp4", "sub/deeper/c.mkv"]
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.txt")} == stamps
    assert again.captions == summary.captions and again.exit_code() == 0

    redo = cap.caption_folder(tiny, job(folder, recursive=True, overwrite=True, workers=0))
    assert redo.done == ["a.mp4", "done.mp4", "sub/b.mp4", "sub/deeper/c.mkv"] and redo.skipped == []
    after = txt_files(folder)
    assert after["done.txt"] != "an earlier caption" and after["done.txt"] == after["a.txt"]
    assert after["a.txt"] == files["a.txt"][len("trig, "):-len(" END")]  # same clip, same greedy caption


def test_out_folder_mirrors_and_is_not_scanned(tiny, folder):
    out = folder / "captions"
    (out / "sub").mkdir(parents=True)
    shutil.copy(folder / "a.mp4", out / "sub" / "stray.mp4")  # inside --out: never a clip
    summary = cap.caption_folder(tiny, job(folder, out=out, recursive=True))
    assert summary.done == ["a.mp4", "done.mp4", *GOOD[1:]]
    assert sorted(txt_files(out)) == ["a.txt", "done.txt", "sub/b.txt", "sub/deeper/c.txt"]
    assert sorted(txt_files(folder)) == ["captions/" + k for k in sorted(txt_files(out))] + ["done.txt"]


def test_a_failed_write_leaves_no_partial_caption_and_the_rerun_completes(tiny, folder, monkeypatch):
    real_replace = os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(cap.os, "replace", crash_on_second)
    stopped = cap.caption_folder(tiny, job(folder, recursive=True))  # a full disk stops the run, reported
    assert stopped.exit_code() == 2 and "Writing failed, run stopped" in stopped.text()
    assert "No space left" in stopped.write_error and stopped.done == ["a.mp4"]
    assert sorted(txt_files(folder)) == ["a.txt", "done.txt"]  # sub/b.txt was never half-written
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.setattr(cap.os, "replace", real_replace)
    rerun = cap.caption_folder(tiny, job(folder, recursive=True))
    assert rerun.done == GOOD[1:] and sorted(txt_files(folder)) == ["a.txt", "done.txt", "sub/b.txt",
                                                                   "sub/deeper/c.txt"]


def test_model_failure_stops_the_run_and_is_reported(tiny, folder, monkeypatch):
    real = cap.run_pipeline
    seen = []

    def fail_second(*args, **kwargs):
        seen.append(1)
        if len(seen) == 2:
            raise RuntimeError("CUDA error: device-side assert")
        return real(*args, **kwargs)

    monkeypatch.setattr(cap, "run_pipeline", fail_second)
    summary = cap.caption_folder(tiny, job(folder, recursive=True))
    assert summary.done == ["a.mp4"] and summary.exit_code() == 2
    assert "The model failed, run stopped: RuntimeError: CUDA error" in summary.text()


def test_interrupt_between_clips_keeps_what_is_done(tiny, folder):
    def stop(rel, result, summary):
        if summary.done:
            raise AdaTPInterrupted("interrupted")

    with pytest.raises(AdaTPInterrupted):
        cap.caption_folder(tiny, job(folder, recursive=True), on_clip=stop)
    assert sorted(txt_files(folder)) == ["a.txt", "done.txt"]


def test_cli_exit_codes_and_progress(tiny_dir, folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADATP_CACHE_DIR", str(tiny_dir.parent))
    assert cli_main(["caption", str(folder), *SETTINGS, "--prefix", "p: "]) == 0
    out, err = capsys.readouterr()
    assert "Captioned 1 clip(s), skipped 1 already captioned, failed 2, of 4 found." in out
    assert "3/3 clips" in err and "clips/min, ETA" in err
    assert txt_files(folder)["a.txt"].startswith("p: ")
    (tmp_path / "nothing").mkdir()
    assert cli_main(["caption", str(tmp_path / "nothing"), *SETTINGS]) == 1
    assert "Nothing could be captioned" in capsys.readouterr().out
    assert cli_main(["caption", str(tmp_path / "missing"), *SETTINGS]) == 2
    assert "does not exist" in capsys.readouterr().err
    for bad in (["--frames", "0"], ["--retention", "1.5"], ["--layer", "99"], ["--prompt", " "]):
        assert cli_main(["caption", str(folder), *bad]) == 2, bad
        assert "error: " in capsys.readouterr().err


def _run(cmd, timeout, **kw):
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd} took more than {timeout} s:\n{err[-2000:]}")
    return proc.returncode, out, err


def test_a_killed_run_leaves_whole_captions_and_its_rerun_completes(tiny_dir, tmp_path, clip_bytes):
    root = tmp_path / "many"
    root.mkdir()
    names = [f"clip{k:02d}.mp4" for k in range(8)]
    for name in names:
        (root / name).write_bytes(clip_bytes)
    env = {**os.environ, "ADATP_CACHE_DIR": str(tiny_dir.parent)}
    cmd = [sys.executable, "-m", "adatp_core", "caption", str(root), *SETTINGS]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while len(list(root.glob("*.txt"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its decode workers, mid-run
        proc.wait()
    written = txt_files(root)
    assert 2 <= len(written) < len(names), "the run was not stopped halfway"
    assert len(set(written.values())) == 1 and next(iter(written.values()))  # whole, identical captions
    code, out, err = _run(cmd, 180, env=env)
    assert code == 0 and f"skipped {len(written)} already captioned" in out, err[-3000:]
    final = txt_files(root)
    assert sorted(final) == [n.replace(".mp4", ".txt") for n in names]
    assert set(final.values()) == set(written.values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_processes_caption_every_clip_exactly_once(tiny_dir, folder, tmp_path):
    """accelerate launch with 2 processes on CPU (gloo): shards, per-process manifests, one merge.

    accelerate's ``--cpu`` launcher starts a single process unless MPI is set up,
    so two local processes are started through its torchrun launcher; on a
    machine without CUDA the CLI then uses the CPU (gloo)."""
    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("accelerate's launcher is not installed")
    manifest = tmp_path / "manifest.jsonl"
    env = {**os.environ, "ADATP_CACHE_DIR": str(tiny_dir.parent), "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true"}
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "adatp_core", "caption", str(folder), "--recursive", "--manifest", str(manifest), *SETTINGS]
    code, out, err = _run(cmd, 240, env=env)
    assert code == 0, err[-3000:]
    assert "[1/2]" in err and "[2/2]" in err  # both processes captioned
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    paths = [r["path"] for r in records]
    assert paths == sorted(set(paths)) == ["a.mp4", "corrupt.mp4", "empty.mp4", "sub/b.mp4", "sub/deeper/c.mkv"]
    assert not list(tmp_path.glob("manifest.jsonl.part*"))
    assert sorted(txt_files(folder)) == ["a.txt", "done.txt", "sub/b.txt", "sub/deeper/c.txt"]
    assert out.count("Captioned 3 clip(s), skipped 1 already captioned, failed 2, of 6 found.") == 1


def test_node_lists_the_same_captions_as_the_cli(tiny, tiny_dir, folder, tmp_path, monkeypatch, capsys):
    bridge = pack_module("nodes.comfy_bridge")
    node = pack_module("nodes.caption_folder").AdaTP_CaptionFolder
    monkeypatch.setattr(bridge.HEADLESS, "input_dir", tmp_path / "input")
    shutil.copytree(folder, tmp_path / "input" / "set")
    monkeypatch.setenv("ADATP_CACHE_DIR", str(tiny_dir.parent))
    assert cli_main(["caption", str(folder), "--recursive", "--overwrite", *SETTINGS]) == 0
    capsys.readouterr()
    cli_captions = [(folder / rel).with_suffix(".txt").read_text()
                    for rel in ["a.mp4", "done.mp4", *GOOD[1:]]]
    assert node.VALIDATE_INPUTS("../clips") != True  # noqa: E712  (outside the input directory)
    assert node.VALIDATE_INPUTS(str(folder)) != True  # noqa: E712  (an absolute path outside the input folder)
    monkeypatch.setenv("ADATP_CAPTION_ROOTS", str(folder.parent))  # unless the server owner allows it
    assert node.VALIDATE_INPUTS(str(folder)) is True
    out = node().caption(tiny, "set", cap.DEFAULT_PROMPT, "", "", True, True, 2, 0.25, 2, max_new_tokens=3)
    captions, summary = out["result"]
    assert captions == cli_captions
    assert node.OUTPUT_IS_LIST == (True, False) and out["ui"]["text"] == [summary]
    assert "Captioned 4 clip(s)" in summary and "failed 2" in summary


def test_node_interrupt_stops_between_clips(tiny, folder, tmp_path, monkeypatch):
    bridge = pack_module("nodes.comfy_bridge")
    node = pack_module("nodes.caption_folder").AdaTP_CaptionFolder
    monkeypatch.setattr(bridge.HEADLESS, "input_dir", folder.parent)
    steps = []

    class Progress:
        def __init__(self, total):
            steps.append(total)

        def step(self):
            bridge.HEADLESS.interrupt.set()  # Cancel pressed while the first clip ran
            bridge.check_interrupt()

    monkeypatch.setattr(bridge, "Progress", Progress)
    with pytest.raises(Exception, match="interrupted"):
        node().caption(tiny, folder.name, "Describe.", "", "", False, True, 2, 0.25, 2, max_new_tokens=3)
    assert steps == [5] and sorted(txt_files(folder)) == ["a.txt", "done.txt"]


def test_sample_folder_is_made_in_the_input_directory(tmp_path, monkeypatch):
    bridge = pack_module("nodes.comfy_bridge")
    mod = pack_module("nodes.caption_folder")
    monkeypatch.setattr(bridge.HEADLESS, "input_dir", tmp_path)
    path = mod.resolve_folder(mod.SAMPLE_FOLDER)
    assert path == (tmp_path / mod.SAMPLE_FOLDER).resolve() and (path / "adatp_sample_video.mp4").is_file()
    with pytest.raises(ValueError, match="does not exist"):
        mod.resolve_folder("no_such_folder")


def test_the_decoded_clips_frame_times_reach_the_model(tiny, folder, monkeypatch):
    """Qwen models place frames in time: each clip's video_info (its sampled frames'
    times) goes with its frames into the pipeline, so no time is assumed."""
    seen = []
    real = cap.run_pipeline

    def spy(model, frames, prompt, cfg, **kw):
        seen.append(kw.get("video_info"))
        return real(model, frames, prompt, cfg, **kw)

    monkeypatch.setattr(cap, "run_pipeline", spy)
    results = list(cap.caption_videos(tiny, [folder / "a.mp4"], "Describe.", CFG, workers=1))
    assert results[0].error is None
    (info,) = seen
    assert info is not None and len(info.timestamps) == 2 and info.timestamps[1] > info.timestamps[0]


def test_captions_beside_save_videos_clips_and_save_caption_off(tiny, clip_bytes, tmp_path, monkeypatch):
    """Clips made in ComfyUI: Save Video writes output/video/ComfyUI_00001_.mp4; Caption Folder on
    'video [output]' writes each caption beside its clip there. save_caption off writes nothing."""
    bridge = pack_module("nodes.comfy_bridge")
    mod = pack_module("nodes.caption_folder")
    monkeypatch.setattr(bridge.HEADLESS, "output_dir", tmp_path / "output")
    saved = tmp_path / "output" / "video"
    saved.mkdir(parents=True)
    for k in (1, 2):
        (saved / f"ComfyUI_{k:05}_.mp4").write_bytes(clip_bytes)
    settings = (cap.DEFAULT_PROMPT, "", "", False, False, 2, 0.25, 2)
    out = mod.AdaTP_CaptionFolder().caption(tiny, "video [output]", *settings, max_new_tokens=3, save_caption=False)
    captions, summary = out["result"]
    assert len(captions) == 2 and all(captions) and "Captioned 2 clip(s)" in summary
    assert txt_files(saved) == {}, "save_caption off wrote a file"
    out = mod.AdaTP_CaptionFolder().caption(tiny, "video [output]", *settings, max_new_tokens=3)
    assert txt_files(saved) == {"ComfyUI_00001_.txt": out["result"][0][0], "ComfyUI_00002_.txt": out["result"][0][1]}
    for bad in ("../video [output]", "/etc [output]", "missing [output]"):
        assert mod.AdaTP_CaptionFolder.VALIDATE_INPUTS(bad) != True, bad  # noqa: E712
    # appended after the inputs of earlier releases (a saved workflow's widget values keep their places)
    assert list(mod.AdaTP_CaptionFolder.INPUT_TYPES()["optional"]) == [
        "max_new_tokens", "repetition_penalty", "top_k", "save_caption", "batch_size"]


def test_cli_no_save_keeps_captions_in_the_manifest_only(tiny_dir, folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ADATP_CACHE_DIR", str(tiny_dir.parent))
    before = txt_files(folder)
    manifest = tmp_path / "m.jsonl"
    assert cli_main(["caption", str(folder), *SETTINGS, "--no-save", "--manifest", str(manifest)]) == 0
    assert txt_files(folder) == before
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["path"] for r in lines if "caption" in r] == ["a.mp4"] and lines[0]["caption"]
    capsys.readouterr()
    assert cli_main(["caption", str(folder), *SETTINGS, "--no-save"]) == 2
    assert "--manifest" in capsys.readouterr().err
