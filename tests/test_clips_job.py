"""Issue 29, the back half: long footage -> shots -> clips -> captions -> the trainers' layouts,
through the CLI (``python -m adatp_core clips``) and the job, on the tiny built-in model."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
from pack import pack_module

from adatp_core.cli import main as cli_main
from adatp_core.clips import cli as clips_cli
from adatp_core.clips import job as clips_job
from adatp_core.clips import records as clips_records
from adatp_core.clips import settings as clips_settings
from adatp_core.clips import summary as clips_summary
from adatp_core.clips.job import run_clips, write_layouts
from adatp_core.clips.settings import ClipsJob
from adatp_core.clips.plan import ClipRules
from adatp_core.errors import AdaTPInputError
from adatp_core.generate import SamplingConfig
from adatp_core.pipeline import PipelineConfig
from adatp_core.samples import scene_frames, write_video
from adatp_core.video import probe_video

FPS, MIN_S, MAX_S = 8.0, 1.0, 1.5
RULES = ClipRules(min_seconds=MIN_S, max_seconds=MAX_S, fps=FPS, frames="4k+1")
SETTINGS = ["--fps", str(FPS), "--min-seconds", str(MIN_S), "--max-seconds", str(MAX_S), "--caption-frames", "2",
            "--max-new-tokens", "3", "--workers", "0", "--batch-size", "1"]
CFG = PipelineConfig(num_frames=2, generation=SamplingConfig(max_new_tokens=3))


@pytest.fixture(scope="module")
def footage(tmp_path_factory) -> bytes:
    """6 s at 8 fps: two 3 s shots with a hard cut; each gives two clips (13 + 9 frames)."""
    path = tmp_path_factory.mktemp("footage") / "long.mp4"
    return write_video(path, scene_frames(48, 64, 48, scenes=2), fps=FPS).read_bytes()


@pytest.fixture(scope="module")
def short(tmp_path_factory) -> bytes:
    """4 s: two 2 s shots, a clip each (few clips: the tiny model takes a second or two a clip here)."""
    path = tmp_path_factory.mktemp("short") / "short.mp4"
    return write_video(path, scene_frames(32, 64, 48, scenes=2), fps=FPS).read_bytes()


@pytest.fixture(scope="module")
def one_shot(tmp_path_factory) -> bytes:
    """2 s, no cut: one clip."""
    path = tmp_path_factory.mktemp("one") / "one.mp4"
    return write_video(path, scene_frames(16, 64, 48, scenes=1), fps=FPS).read_bytes()


@pytest.fixture
def cli(tiny, monkeypatch, capsys):
    """The clips command with the session's tiny model in place of loading one; records loads."""
    loads = []

    def load(*_a, **_k):
        loads.append(1)
        return tiny

    monkeypatch.setattr(clips_cli, "load_model", load)

    def run(*argv):
        code = cli_main(["clips", *map(str, argv)])
        out, err = capsys.readouterr()
        return code, out, err

    run.loads = loads
    return run


@pytest.fixture(scope="module")
def made(tmp_path_factory, footage, tiny):
    """One finished job (every layout) over a folder with the footage, for the tests that read it."""
    root = tmp_path_factory.mktemp("made")
    (root / "src").mkdir()
    (root / "src" / "long.mp4").write_bytes(footage)
    job = ClipsJob(sources=(root / "src",), out=root / "set", rules=RULES, layouts=clips_settings.LAYOUTS,
                   prefix="trig, ", pipeline=CFG, workers=0)
    summary = run_clips(tiny, job)
    return job, summary


def files(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def clips_of(job) -> list[Path]:
    return sorted(job.clips_dir.glob("*.mp4"))


def test_every_clip_obeys_the_rules_and_has_a_caption(made):
    job, summary = made
    assert summary.exit_code() == 0 and not summary.failed_sources and not summary.clips_failed
    record = json.loads(next((job.state_dir / "sources").glob("*.json")).read_text())
    plans = {c["name"]: c for c in record["clips"]}
    clips = clips_of(job)
    assert len(clips) == len(plans) == summary.clips_planned == 4
    assert sorted(c["frames"] for c in plans.values()) == [9, 9, 13, 13]
    for clip in clips:
        plan = plans[clip.stem]
        probe = probe_video(clip)
        assert plan["frames"] % 4 == 1, plan
        assert MIN_S - 1e-6 <= (plan["frames"] - 1) / FPS <= MAX_S + 1e-6, plan  # first frame to last
        assert abs(probe.fps - FPS) < 1e-3 and probe.frame_count == plan["frames"], (probe, plan)
        shot = record["shots"][plan["shot"]]
        assert shot["start"] - 1e-6 <= plan["start"] and plan["start"] + plan["frames"] / FPS <= shot["end"] + 1e-6
        caption = clip.with_suffix(".txt").read_text()
        assert caption.startswith("trig, ") and len(caption) > len("trig, ")
    assert len({c.stem for c in clips}) == len(clips)
    assert "Captioned" in summary.text() and summary.captions().done


def test_each_layout_is_right(made):
    job, _ = made
    clips = clips_of(job)
    captions = {c.name: c.with_suffix(".txt").read_text() for c in clips}
    # finetrainers: line n of prompts.txt captions the clip on line n of videos.txt
    videos = (job.out / "videos.txt").read_text().splitlines()
    prompts = (job.out / "prompts.txt").read_text().splitlines()
    assert sorted(videos) == sorted(f"videos/{c.name}" for c in clips) and len(prompts) == len(videos)
    for video, prompt in zip(videos, prompts):
        assert (job.out / video).is_file() and prompt == " ".join(captions[Path(video).name].split())
    # JSONL: musubi-tuner's video_path and caption, then where the clip came from
    records = [json.loads(line) for line in (job.out / "clips.jsonl").read_text().splitlines()]
    assert [Path(r["video_path"]).name for r in records] == [Path(v).name for v in videos]
    for r in records:
        assert Path(r["video_path"]).is_absolute() and Path(r["video_path"]).is_file()
        assert r["caption"] == captions[Path(r["video_path"]).name]
        assert r["source"].endswith("long.mp4") and r["fps"] == FPS and (r["width"], r["height"]) == (64, 48)
        assert r["end"] == pytest.approx(r["start"] + r["frames"] / r["fps"]) and r["shot"] >= 0
    # subtitles: one cue per shot, spanning it, with the captions of its clips
    key = next((job.state_dir / "sources").glob("*.json")).stem
    srt = (job.out / "subtitles" / f"{key}.srt").read_text()
    vtt = (job.out / "subtitles" / f"{key}.vtt").read_text()
    assert vtt.startswith("WEBVTT\n\n")
    spans = re.findall(r"(\d\d:\d\d:\d\d),(\d{3}) --> (\d\d:\d\d:\d\d),(\d{3})", srt)
    assert spans == [("00:00:00", "000", "00:00:03", "000"), ("00:00:03", "000", "00:00:06", "000")]
    assert len(re.findall(r"\d\d:\d\d:\d\d\.\d{3} --> ", vtt)) == 2
    for r in records:
        assert " ".join(r["caption"].split()) in srt and " ".join(r["caption"].split()) in vtt


def test_a_rerun_does_nothing(made, monkeypatch):
    job, _ = made
    before = files(job.out)

    def refuse(*_a, **_k):
        raise AssertionError("a rerun detected shots, cut a clip or loaded the model")

    monkeypatch.setattr(clips_job, "detect_shots", refuse)
    monkeypatch.setattr(clips_job, "cut_clips", refuse)
    summary = run_clips(refuse, job)
    assert files(job.out) == before
    assert (summary.detected, summary.clips_cut, summary.outputs) == (0, 0, [])
    assert summary.clips_existing == summary.clips_planned and not summary.captions().done
    assert "all up to date" in summary.text() and summary.exit_code() == 0


def test_the_cli_end_to_end_then_dry_run_and_rerun(cli, tmp_path, short):
    (tmp_path / "long.mp4").write_bytes(short)
    out = tmp_path / "dry"
    code, plan, _ = cli(tmp_path / "long.mp4", "--out", out, "--dry-run", *SETTINGS)
    assert code == 0 and not out.exists() and not cli.loads  # nothing written, no model
    assert re.search(r"shot 0: 0\.00-2\.00 s", plan) and "13 frames at 8 fps, 64x48" in plan
    assert "--cut copy" not in plan
    code, plan, _ = cli(tmp_path / "long.mp4", "--out", out, "--dry-run", "--cut", "copy", *SETTINGS)
    assert code == 0 and "--cut copy: each clip will start at the first keyframe" in plan
    code, out_json, _ = cli(tmp_path / "long.mp4", "--out", out, "--dry-run", "--json", *SETTINGS)
    planned = json.loads(out_json)["sources"][0]
    assert code == 0 and not out.exists() and all(c["frames"] % 4 == 1 for c in planned["clips"])
    code, text, _ = cli(tmp_path / "long.mp4", "--out", tmp_path / "set", "--layout", "txt,jsonl", *SETTINGS)
    assert code == 0 and len(cli.loads) == 1, text
    assert sorted(p.name for p in (tmp_path / "set" / "videos").glob("*.mp4")) == \
        sorted(f"{c['name']}.mp4" for c in planned["clips"])
    assert not (tmp_path / "set" / "prompts.txt").exists() and not (tmp_path / "set" / "subtitles").exists()
    code, text, _ = cli(tmp_path / "long.mp4", "--out", tmp_path / "set", "--layout", "txt,jsonl", *SETTINGS)
    assert code == 0 and len(cli.loads) == 1 and "0 cut now" in text and "all up to date" in text


def test_a_model_that_cannot_load_keeps_the_clips_and_says_why(cli, tmp_path, one_shot, monkeypatch):
    from adatp_core.errors import AdaTPEnvironmentError

    def broken(*_a, **_k):
        raise AdaTPEnvironmentError("the model folder holds no weights; download it again")

    monkeypatch.setattr(clips_cli, "load_model", broken)
    (tmp_path / "one.mp4").write_bytes(one_shot)
    code, out, err = cli(tmp_path / "one.mp4", "--out", tmp_path / "set", *SETTINGS)
    assert code == 2 and "error: the model folder holds no weights" in err and "Traceback" not in err
    assert "Stopped: the model folder holds no weights" in out
    assert len(list((tmp_path / "set" / "videos").glob("*.mp4"))) == 1  # cut, kept for the next run


def test_bad_options_stop_before_anything_is_read(cli, tmp_path, footage):
    (tmp_path / "long.mp4").write_bytes(footage)
    code, _, err = cli(tmp_path / "long.mp4", "--out", tmp_path / "o", "--min-seconds", "3", "--max-seconds", "2")
    assert code == 2 and "--min-seconds" in err and not (tmp_path / "o").exists()
    code, _, err = cli(tmp_path / "long.mp4", "--out", tmp_path / "o", "--crf", "99")
    assert code == 2 and "--crf" in err
    code, out, err = cli(tmp_path / "long.mp4", "--out", "", "--dry-run")  # not the current folder
    assert code == 2 and "--out" in err and "empty" in err
    code, out, err = cli("", "--out", tmp_path / "o", "--dry-run")
    assert code == 2 and "SOURCE" in err and "empty" in err
    code, out, err = cli(tmp_path / "long.mp4", "--out", tmp_path / "o", "--fps", "1e9", "--dry-run")
    assert code == 2 and "--fps" in err and "240" in err and not out  # no 2e9-frame clips planned
    code, _, err = cli(tmp_path / "long.mp4", "--out", tmp_path / "o", "--caption-frames", "0")
    assert code == 2 and "--caption-frames" in err
    (tmp_path / "file").write_text("x")
    code, _, err = cli(tmp_path / "long.mp4", "--out", tmp_path / "file" / "o")
    assert code == 2 and "is a file" in err
    with pytest.raises(SystemExit):
        clips_cli.build_parser().parse_args([str(tmp_path), "--out", "o", "--frames", "5k+1"])
    with pytest.raises(SystemExit):
        clips_cli.build_parser().parse_args([str(tmp_path), "--out", "o", "--layout", "txt,nope"])
    assert not cli.loads


def test_same_stem_sources_do_not_collide_and_a_non_video_is_reported(tiny, tmp_path, short):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "take.mp4").write_bytes(short)
    (tmp_path / "a" / "notes.mp4").write_text("not a video at all")
    job = ClipsJob(sources=(tmp_path / "a", tmp_path / "b", tmp_path / "missing.mp4"), out=tmp_path / "set",
                   rules=RULES, layouts=("txt", "jsonl"), pipeline=CFG, workers=0)
    summary = run_clips(tiny, job)
    text = summary.text()
    assert summary.sources == 4 and summary.exit_code() == 0  # the missing one counts (and fails)
    assert "Sources: 4 (2 failed)" in text
    assert [name for name, _ in summary.failed_sources] == ["a/notes.mp4", str(tmp_path / "missing.mp4")], text
    assert "notes.mp4" in text and "does not exist" in text
    clips = clips_of(job)
    keys = {json.loads(p.read_text())["source"]: p.stem for p in (job.state_dir / "sources").glob("*.json")}
    assert len(keys) == 2 and len(set(keys.values())) == 2  # the two takes, keyed apart
    assert len(clips) == summary.clips_planned == 4
    for key in keys.values():
        assert sum(c.name.startswith(key) for c in clips) == summary.clips_planned // 2
    assert all(c.with_suffix(".txt").read_text() for c in clips)
    assert len((job.out / "clips.jsonl").read_text().splitlines()) == len(clips)


def test_layouts_without_txt_keep_captions_aside_and_a_switch_needs_no_model(tiny, tmp_path, one_shot):
    (tmp_path / "long.mp4").write_bytes(one_shot)
    job = ClipsJob(sources=(tmp_path / "long.mp4",), out=tmp_path / "set", rules=RULES,
                   layouts=("finetrainers",), pipeline=CFG, workers=0)
    run_clips(tiny, job)
    assert not list(job.clips_dir.glob("*.txt")) and len(list((job.state_dir / "captions").glob("*.txt"))) == 1
    assert (job.out / "prompts.txt").read_text().count("\n") == len(clips_of(job))

    def refuse():
        raise AssertionError("the captions of the earlier run were not reused")

    txt = ClipsJob(sources=job.sources, out=job.out, rules=RULES, layouts=("txt",), pipeline=CFG, workers=0)
    summary = run_clips(refuse, txt)
    assert len(list(job.clips_dir.glob("*.txt"))) == len(clips_of(job)) and not summary.captions().done


def test_processes_share_the_sources(tiny, tmp_path, one_shot):
    """Under accelerate each process takes every n-th source; the first writes the layouts after."""
    for name in ("one", "two", "three"):
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / f"{name}.mp4").write_bytes(one_shot)
    job = ClipsJob(sources=(tmp_path / "src",), out=tmp_path / "set", rules=RULES, layouts=("txt", "jsonl"),
                   pipeline=CFG, workers=0)
    parts = [run_clips(tiny, job, shard=(i, 2), layouts=False) for i in range(2)]
    assert [p.sources for p in parts] == [2, 1] and not (job.out / "clips.jsonl").exists()
    total = clips_job.ClipsSummary.merge([p.to_dict() for p in parts])
    write_layouts(job, total)
    assert total.sources == 3 and total.captions().found == total.clips_planned == len(clips_of(job)) == 3
    assert len((job.out / "clips.jsonl").read_text().splitlines()) == len(clips_of(job))
    assert "Sources: 3 (0 failed)" in total.text()


def test_new_rules_set_the_earlier_clips_aside(tiny, tmp_path, footage, monkeypatch):
    (tmp_path / "long.mp4").write_bytes(footage)
    job = ClipsJob(sources=(tmp_path / "long.mp4",), out=tmp_path / "set", rules=RULES, pipeline=CFG, workers=0)
    run_clips(tiny, job)
    before = sorted(p.name for p in job.clips_dir.iterdir())
    assert len(before) == 8  # four clips, four captions

    def refuse(*_a, **_k):
        raise AssertionError("the shots were detected again for new clip rules")

    monkeypatch.setattr(clips_job, "detect_shots", refuse)
    longer = ClipsJob(sources=job.sources, out=job.out, rules=ClipRules(min_seconds=MIN_S, max_seconds=3.0, fps=FPS),
                      pipeline=CFG, workers=0)
    summary = run_clips(tiny, longer)
    clips = clips_of(longer)
    assert [probe_video(c).frame_count for c in clips] == [21, 21] and summary.clips_replaced == 4
    assert sorted(p.name for p in (job.state_dir / "replaced").iterdir()) == before  # set aside, not deleted
    assert sorted(p.name for p in job.clips_dir.iterdir()) == sorted([c.name for c in clips] +
                                                                     [c.stem + ".txt" for c in clips])
    listed = [json.loads(line)["path"] for line in (job.out / "clips.jsonl").read_text().splitlines()]
    assert listed == [f"videos/{c.name}" for c in clips]
    assert "4 of an earlier plan moved" in summary.text()


def test_a_source_another_run_is_cutting_is_left_to_it(tiny, tmp_path, short, one_shot):
    from adatp_core.caption import ClipClaim

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.mp4").write_bytes(short)
    (tmp_path / "src" / "b.mp4").write_bytes(one_shot)
    job = ClipsJob(sources=(tmp_path / "src",), out=tmp_path / "set", rules=RULES, layouts=("txt", "jsonl"),
                   pipeline=CFG, workers=0)
    key = clips_job.source_key(tmp_path / "src" / "a.mp4")
    other = ClipClaim(clips_job.record_path(job, key))  # another run holds a.mp4
    other.path.parent.mkdir(parents=True)
    assert other.acquire()
    try:
        summary = run_clips(tiny, job)
    finally:
        other.release()
    assert summary.elsewhere == ["src/a.mp4"] and summary.sources == 2 and summary.clips_planned == 1
    assert "1 source(s) left to another run" in summary.text() and summary.exit_code() == 0
    assert [c.name.startswith(key) for c in clips_of(job)] == [False]
    assert not list((job.state_dir / "sources").glob(".adatp-claim-*"))  # this run's claims are gone
    again = run_clips(tiny, job)  # the other run stopped: this one takes a.mp4 now
    assert again.clips_planned == 3 and len(clips_of(job)) == 3 and not again.elsewhere


class Cancel(Exception):
    """ComfyUI's interrupt is an Exception, as a failing source's error is."""


@pytest.mark.parametrize("stage", ["shots", "cut", "caption"])
def test_cancel_in_any_stage_stops_the_job_and_fails_no_source(tiny, tmp_path, short, stage):
    (tmp_path / "short.mp4").write_bytes(short)
    job = ClipsJob(sources=(tmp_path / "short.mp4",), out=tmp_path / "set", rules=RULES, pipeline=CFG, workers=0)

    def on_event(now, done, total, name):
        if now == stage and done > 0:
            raise Cancel("cancelled")

    with pytest.raises(Cancel):
        run_clips(tiny, job, on_event=on_event)
    summary = run_clips(tiny, job)  # the next run finishes what was left
    assert summary.exit_code() == 0 and not summary.failed_sources and summary.clips_planned == 2
    assert len(list(job.clips_dir.glob("*.txt"))) == 2


def test_job_settings_are_checked(tmp_path):
    for kwargs, option in [({"rules": dict(min_seconds=3, max_seconds=2)}, "min_seconds"),
                           ({"rules": dict(frames="3k")}, "clip_frames"),
                           ({"rules": dict(max_side=7)}, "max_side"),
                           ({"rules": dict(trim_frames=1.5)}, "trim_frames"),
                           ({"rules": dict(fps=0.0)}, "fps"),
                           ({"rules": dict(max_seconds=float("inf"))}, "max_seconds"),
                           ({"rules": dict(fps=1e9)}, "fps"), ({"rules": dict(max_seconds=601)}, "max_seconds"),
                           ({"rules": dict(fps=240.0, max_seconds=120)}, "max_seconds"),  # 28801 frames a clip
                           ({"rules": dict(trim_frames=10**9)}, "trim_frames"),
                           ({"rules": dict(max_side=10**6)}, "max_side"),
                           ({"cut": "fast"}, "cut"), ({"crf": 52}, "crf"), ({"layouts": ("txt", "csv")}, "layout"),
                           ({"threshold": -1}, "threshold"), ({"threshold": 1.5}, "threshold"),
                           ({"sources": ()}, "sources")]:
        with pytest.raises(AdaTPInputError) as info:  # the rules check themselves, where they are made
            if "rules" in kwargs:
                kwargs = {**kwargs, "rules": ClipRules(**kwargs["rules"])}
            ClipsJob(**{"sources": (tmp_path,), "out": tmp_path / "o", **kwargs})
        assert info.value.option == option, kwargs
    from adatp_core.clips.cut import cut_clips

    for kwargs, option in [({"mode": "fast"}, "cut"), ({"crf": -1}, "crf")]:  # the cutter's own check is the same
        with pytest.raises(AdaTPInputError) as info:
            cut_clips(tmp_path / "x.mp4", [], tmp_path, **kwargs)
        assert info.value.option == option


def test_outputs_write_only_what_changed(tmp_path):
    from adatp_core.clips import outputs

    path = tmp_path / "x.txt"
    assert outputs.write_if_changed(path, "a\n") and not outputs.write_if_changed(path, "a\n")
    assert outputs.write_if_changed(path, "a\nb\n") and path.read_text() == "a\nb\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adatp-")]  # no temporary left
    assert outputs.timestamp(3725.5, ",") == "01:02:05,500" and outputs.timestamp(0.0004, ".") == "00:00:00.000"


# --- the node ------------------------------------------------------------------------------------

@pytest.fixture
def comfy(tmp_path, monkeypatch):
    """ComfyUI's input and output folders (the headless bridge's)."""
    bridge = pack_module("nodes.comfy_bridge")
    monkeypatch.setattr(bridge.HEADLESS, "input_dir", tmp_path / "input")
    monkeypatch.setattr(bridge.HEADLESS, "output_dir", tmp_path / "output")
    (tmp_path / "input").mkdir()
    (tmp_path / "output").mkdir()
    return bridge, tmp_path / "input", tmp_path / "output"


def clip_node():
    return pack_module("nodes.clip_dataset").AdaTP_ClipDataset


def test_the_node_makes_the_set_with_progress_and_a_rerun_does_nothing(tiny, comfy, short, monkeypatch):
    bridge, inp, out = comfy
    (inp / "films").mkdir()
    (inp / "films" / "a.mp4").write_bytes(short)
    (inp / "b.mp4").write_bytes(short)
    updates = []

    class Bar:  # comfy.utils.ProgressBar's interface
        def __init__(self, total):
            updates.append(("new", total))

        def update_absolute(self, value, total=None, preview=None):
            updates.append((value, total))

    monkeypatch.setattr(bridge, "_ComfyProgressBar", Bar)
    node = clip_node()
    assert node.VALIDATE_INPUTS(sources="films\nb.mp4", output="set") is True
    args = (tiny, "films\nb.mp4", "set", "Describe.", "trig, ", MIN_S, MAX_S, FPS, "4k+1")
    result = node().make(*args, layouts="all", caption_frames=2, max_new_tokens=3, batch_size=1)
    (summary,) = result["result"]
    clips = sorted((out / "set" / "videos").glob("*.mp4"))
    assert len(clips) == 4 and all(c.with_suffix(".txt").read_text().startswith("trig, ") for c in clips)
    assert (out / "set" / "prompts.txt").is_file() and (out / "set" / "clips.jsonl").is_file()
    assert "Clips: 4 planned, 4 cut now" in summary and result["ui"]["text"] == [summary]
    values = [v for v, _ in updates[1:]]
    assert {t for _, t in updates[1:]} == {None}
    assert updates[0] == ("new", 300) and values == sorted(values) and values[-1] == 300
    assert any(0 < v < 100 for v in values) and any(100 < v < 200 for v in values)  # shots, then cuts
    again = node().make(*args, layouts="all", caption_frames=2, max_new_tokens=3, batch_size=1)["result"][0]
    assert "0 cut now" in again and "all up to date" in again and "Captioned 0 clip(s)" in again


def test_the_node_refuses_bad_sources_and_outputs_with_a_clear_message(comfy):
    bridge, inp, out = comfy
    node = clip_node()
    assert "no sources" in node.VALIDATE_INPUTS(sources=" \n ")
    assert "not in ComfyUI's input directory" in node.VALIDATE_INPUTS(sources="nope.mp4")
    assert "output directory itself" in node.VALIDATE_INPUTS(output=".")
    assert "empty" in node.VALIDATE_INPUTS(output="")
    assert "separated by commas" in node.VALIDATE_INPUTS(layouts="txt,csv")
    assert node.VALIDATE_INPUTS(layouts="all") is True and node.VALIDATE_INPUTS(layouts="jsonl, srt") is True
    assert node.VALIDATE_INPUTS(sources="adatp_clip_samples") is True  # the sample folder is made
    assert (inp / "adatp_clip_samples" / "adatp_sample_video.mp4").is_file()
    required = node.INPUT_TYPES()["required"] | node.INPUT_TYPES().get("optional", {})
    assert required["threshold"][1]["max"] == 1.0  # the detector takes at most 1
    assert required["fps"][1]["step"] <= 0.001 and required["max_seconds"][1]["step"] <= 0.01  # 23.976; 5.34


@pytest.mark.distributed
def test_accelerate_shares_the_sources_and_the_main_process_writes_the_layouts(tiny_dir, tmp_path, short, one_shot):
    """accelerate launch, 2 CPU processes (gloo), as test_caption's two-process test starts them."""
    import sys

    from test_caption import _free_port, _run

    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("accelerate's launcher is not installed")
    (tmp_path / "src").mkdir()
    for name, data in (("a.mp4", short), ("b.mp4", one_shot), ("c.mp4", one_shot)):
        (tmp_path / "src" / name).write_bytes(data)
    env = {**os.environ, "ADATP_CACHE_DIR": str(tiny_dir.parent), "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true"}
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "adatp_core", "clips", str(tmp_path / "src"), "--out", str(tmp_path / "set"), "--layout", "all",
           *SETTINGS]
    code, out, err = _run(cmd, 240, env=env)
    assert code == 0, err[-3000:]
    assert "[1/2]" in err and "[2/2]" in err
    assert out.count("Sources: 3 (0 failed)") == 1 and "Clips: 4 planned, 4 cut now" in out
    clips = sorted((tmp_path / "set" / "videos").glob("*.mp4"))
    assert len(clips) == 4 and all(c.with_suffix(".txt").read_text() for c in clips)
    assert len((tmp_path / "set" / "clips.jsonl").read_text().splitlines()) == 4
    assert len(list((tmp_path / "set" / "subtitles").glob("*.srt"))) == 3


def cut_only(job):
    """Plan and cut ``job`` (no captions, no model): the summary of the cut."""
    summary = clips_job.ClipsSummary()
    plan = clips_job.plan_sources(job)
    try:
        clips_job.cut_sources(job, plan, summary)
    finally:
        plan.release()
    return summary


def test_clips_made_under_other_rules_or_cut_settings_are_cut_again_under_the_same_names(tmp_path, short):
    """Names hold the key, the shot and the time range only: a clip planned otherwise under the same
    name (a smaller max_side, another fps over the same span, another crf) is set aside and cut again."""
    (tmp_path / "short.mp4").write_bytes(short)
    rules = ClipRules(min_seconds=MIN_S, max_seconds=2.0, fps=FPS, frames="any")  # 2 s shots: a clip each
    job = ClipsJob(sources=(tmp_path / "short.mp4",), out=tmp_path / "set", rules=rules)
    assert cut_only(job).clips_cut == 2
    names = [c.name for c in clips_of(job)]
    assert {(p.width, p.height, p.fps, p.frame_count) for p in map(probe_video, clips_of(job))} == {(64, 48, 8.0, 16)}

    def again(**changes):
        new = dataclasses.replace(job, **changes)
        summary = cut_only(new)
        assert [c.name for c in clips_of(job)] == names  # the same names ...
        assert (summary.clips_cut, summary.clips_existing) == (2, 0)  # ... cut again, none kept
        return {(p.width, p.height, p.fps, p.frame_count) for p in map(probe_video, clips_of(job))}

    assert again(rules=dataclasses.replace(rules, max_side=32)) == {(32, 24, 8.0, 16)}
    assert again(rules=dataclasses.replace(rules, max_side=32, fps=2 * FPS)) == {(32, 24, 16.0, 32)}
    assert again(rules=dataclasses.replace(rules, max_side=32, fps=2 * FPS), crf=30) == {(32, 24, 16.0, 32)}
    record = json.loads(next((job.state_dir / "sources").glob("*.json")).read_text())
    assert record["cut"] == {"mode": "reencode", "crf": 30, "keep_audio": False}
    assert {k: {f: m[f] for f in ("frames", "fps", "width", "height")} for k, m in record["made"].items()} == \
        {n[:-4]: {"frames": 32, "fps": 16.0, "width": 32, "height": 24} for n in names}  # what the files hold
    assert cut_only(dataclasses.replace(job, rules=dataclasses.replace(rules, max_side=32, fps=2 * FPS),
                                        crf=30)).clips_existing == 2  # unchanged: nothing cut


def test_set_aside_keeps_every_replaced_clip_and_goes_before_the_record(tmp_path, short, monkeypatch):
    (tmp_path / "short.mp4").write_bytes(short)
    rules = ClipRules(min_seconds=MIN_S, max_seconds=2.0, fps=FPS, frames="any")  # 2 s shots: a clip each
    job = ClipsJob(sources=(tmp_path / "short.mp4",), out=tmp_path / "set", rules=rules)
    cut_only(job)
    first = {p.name: p.read_bytes() for p in clips_of(job)}
    (job.clips_dir / f"{next(iter(first))[:-4]}.txt").write_text("a caption")
    smaller = dataclasses.replace(job, rules=dataclasses.replace(rules, max_side=32))
    cut_only(smaller)
    cut_only(dataclasses.replace(job, crf=30))  # the same names set aside a second time (none restored: another crf)
    aside = job.state_dir / "replaced"
    assert sorted(p.name for p in aside.iterdir()) == sorted(
        [*first, *(n[:-4] + ".2.mp4" for n in first), next(iter(first))[:-4] + ".txt"])
    assert {n: (aside / n).read_bytes() for n in first} == first  # nothing overwritten

    # killed between the two steps: had the new record been written first, the old clips would stay
    # for good (the record says they are the new ones); they go first, and the next run moves them
    def killed(*_a):
        raise KeyboardInterrupt

    monkeypatch.setattr(clips_job, "set_aside", killed)
    with pytest.raises(KeyboardInterrupt):
        cut_only(smaller)
    monkeypatch.undo()
    summary = cut_only(smaller)
    assert summary.clips_cut + summary.clips_existing == 2  # the smaller ones set aside before: restored
    assert {(p.width, p.height) for p in map(probe_video, clips_of(job))} == {(32, 24)}


def test_copy_mode_lists_what_its_clips_hold_not_the_plan(tmp_path):
    """A stream copy starts at a keyframe, at the source's rate and size: the JSONL says so, as PyAV reads the file."""
    import av

    from adatp_core.clips.synthetic import write_synthetic

    src = write_synthetic(tmp_path / "gop.mp4", [(3.0, "start", 0.0), (3.0, "cut", 0.0)], width=64, height=48,
                          gop=12).path  # 24 fps, a keyframe every 0.5 s
    rules = ClipRules(min_seconds=0.5, max_seconds=0.8, fps=16.0, frames="4k+1", max_side=32)  # 13 at 16 fps, 32x24
    job = ClipsJob(sources=(src,), out=tmp_path / "set", rules=rules, cut="copy", layouts=("txt", "jsonl"))
    summary = cut_only(job)
    assert summary.clips_cut >= 2 and not summary.clips_failed
    for clip in clips_of(job):
        clip.with_suffix(".txt").write_text("a caption")
    write_layouts(job, summary)
    record = json.loads(next((job.state_dir / "sources").glob("*.json")).read_text())
    planned = {c["name"]: c for c in record["clips"]}
    rows = [json.loads(line) for line in (job.out / "clips.jsonl").read_text().splitlines()]
    assert len(rows) == summary.clips_cut
    for row in rows:
        with av.open(row["video_path"]) as f:
            stream = f.streams.video[0]
            frames = sum(1 for _ in f.decode(stream))
            real = (frames, float(stream.average_rate), stream.codec_context.width, stream.codec_context.height)
        assert (row["frames"], row["fps"], row["width"], row["height"]) == real == (frames, 24.0, 64, 48)
        plan = planned[Path(row["path"]).stem]
        assert (plan["fps"], plan["width"], plan["height"]) == (16.0, 32, 24)  # what was planned, not written
        assert row["start"] >= plan["start"] - 1e-6 and row["start"] * 2 == pytest.approx(round(row["start"] * 2))
        assert row["end"] == pytest.approx(row["start"] + frames / 24)


def test_a_file_has_one_key_whether_given_alone_or_in_its_folder(tmp_path, one_shot):
    (tmp_path / "src" / "x").mkdir(parents=True)
    (tmp_path / "src" / "x" / "take.mp4").write_bytes(one_shot)
    (tmp_path / "src" / "take.mp4").write_bytes(one_shot)  # the same stem elsewhere: another key
    out = tmp_path / "set"
    folder = ClipsJob(sources=(tmp_path / "src",), out=out, rules=RULES, recursive=True)
    given = tmp_path / "src" / ".." / "src" / "x" / "take.mp4"  # another spelling of the same file
    alone = ClipsJob(sources=(given,), out=out, rules=RULES)
    by_folder = {p.source.name: p.key for p in clips_job.plan_sources(folder, dry_run=True).sources}
    by_file = {p.source.name: p.key for p in clips_job.plan_sources(alone, dry_run=True).sources}
    assert len(set(by_folder.values())) == 2
    assert by_file[str(given)] == by_folder["src/x/take.mp4"]
    cut_only(folder)
    again = cut_only(alone)  # the folder's run made it: not planned, detected or cut twice
    assert (again.clips_existing, again.clips_cut, again.clips_replaced) == (1, 0, 0)
    assert len(list((out / ".adatp" / "sources").glob("*.json"))) == 2


def test_clips_whose_caption_failed_are_named_in_the_summary(tmp_path, short, monkeypatch):
    (tmp_path / "short.mp4").write_bytes(short)
    job = ClipsJob(sources=(tmp_path / "short.mp4",), out=tmp_path / "set", rules=RULES, layouts=("txt", "jsonl"))
    cut_only(job)
    first, second = clips_of(job)
    first.with_suffix(".txt").write_text("a caption")
    # the caption run fails for the other clip (no caption written)
    monkeypatch.setattr(clips_job, "caption_folder", lambda _m, _j, plan, **_k: plan.summary)
    summary = run_clips(lambda: None, job)
    assert summary.uncaptioned == [f"videos/{second.name}"]
    text = summary.text()
    assert f"1 clip(s) have no caption yet: videos/{second.name}" in text
    assert "train them with an empty caption" in text and "Run the same command again" in text
    listed = [json.loads(line)["path"] for line in (job.out / "clips.jsonl").read_text().splitlines()]
    assert listed == [f"videos/{first.name}"]  # the manifest leaves it out
    merged = clips_job.ClipsSummary.merge([summary.to_dict()])
    assert merged.uncaptioned == summary.uncaptioned
    elsewhere = dataclasses.replace(job, layouts=("jsonl",))  # captions kept in .adatp: only the lists matter
    (job.state_dir / "captions").mkdir(parents=True)
    assert "empty caption" not in run_clips(lambda: None, elsewhere).text()


def test_an_hdr_source_is_reported_as_converted_without_tone_mapping(tmp_path, short, monkeypatch):
    import av
    import numpy as np

    path = tmp_path / "pq.mp4"
    with av.open(str(path), "w") as f:  # a PQ (SMPTE ST 2084) stream, BT.2020, as HDR10 says
        stream = f.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.color_trc, stream.codec_context.color_primaries = 16, 9
        for i in range(16):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 + i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                f.mux(packet)
        for packet in stream.encode():
            f.mux(packet)
    (tmp_path / "sdr.mp4").write_bytes(short)
    job = ClipsJob(sources=(path, tmp_path / "sdr.mp4"), out=tmp_path / "set", rules=RULES)
    note = "HDR (PQ) source: converted to 8-bit SDR without tone mapping; colours will look flat"
    plan = clips_job.plan_sources(job, dry_run=True)
    assert [p.notes for p in plan.sources] == [[note], []] and f"  {note}" in plan.text()
    assert [s["notes"] for s in plan.to_dict()["sources"]] == [[note], []]  # --dry-run --json
    monkeypatch.setattr(clips_job, "caption_folder", lambda _m, _j, plan, **_k: plan.summary)  # no captions here
    summary = run_clips(lambda: None, job)
    assert summary.notes == [(str(path), note)] and f"{path}: {note}" in summary.text()
    copied = dataclasses.replace(job, cut="copy")  # a stream copy keeps the HDR stream as it is
    assert not [p.notes for p in clips_job.plan_sources(copied, dry_run=True).sources if p.notes]


def test_the_layouts_load_without_torch():
    """outputs.py takes write_atomic from caption.files: the caption package would load the model side."""
    import subprocess
    import sys

    code = "import sys, adatp_core.clips.outputs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "False"


def test_a_killed_runs_temp_file_goes_when_nothing_is_left_to_cut(tmp_path, one_shot):
    """Hostile review 6: the plan changed, so the killed run's clip is no longer planned nor cut."""
    (tmp_path / "one.mp4").write_bytes(one_shot)
    job = ClipsJob(sources=(tmp_path / "one.mp4",), out=tmp_path / "set", rules=RULES)
    cut_only(job)
    stale = job.clips_dir / ".one-0123abcd_s0000_0.000-1.000.part-999999999.mp4"
    stale.write_bytes(b"half")
    assert cut_only(job).clips_existing == 1 and not stale.exists()


def test_the_summary_counts_the_clips_set_aside_not_those_planned_to_be(tmp_path, one_shot, monkeypatch):
    """Hostile review 7: a clip of the earlier plan that is no longer on disk is not 'moved'."""
    (tmp_path / "one.mp4").write_bytes(one_shot)
    job = ClipsJob(sources=(tmp_path / "one.mp4",), out=tmp_path / "set", rules=RULES, layouts=("jsonl",))
    cut_only(job)
    clips_of(job)[0].unlink()  # the user removed it
    smaller = dataclasses.replace(job, rules=dataclasses.replace(RULES, max_side=32))
    assert "set aside" not in clips_job.plan_sources(smaller, dry_run=True).text()
    monkeypatch.setattr(clips_job, "caption_folder", lambda _m, _j, plan, **_k: plan.summary)
    summary = run_clips(lambda: None, smaller)
    assert summary.clips_replaced == 0 and "moved to" not in summary.text()
    assert not (job.state_dir / "replaced").exists()


def test_a_dataset_inside_a_source_folder_is_not_taken_as_sources(tmp_path, one_shot):
    """Hostile review 8: a dataset made under src/ was read as sources by a run with another --out,
    and --out equal to the source folder said it 'holds no video files'."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.mp4").write_bytes(one_shot)
    first = ClipsJob(sources=(tmp_path / "src",), out=tmp_path / "src" / "ds", rules=RULES, recursive=True)
    assert cut_only(first).clips_cut == 1
    other = dataclasses.replace(first, out=tmp_path / "elsewhere")
    plan = clips_job.plan_sources(other, dry_run=True)
    assert [p.source.name for p in plan.sources] == ["src/a.mp4"] and not plan.problems
    assert plan.notes == [("src/ds/videos", "the clips of a dataset this command made (its .adatp/ holds the "
                                            "records): not taken as sources; skipped")]
    assert "src/ds/videos: the clips of a dataset" in plan.text()
    inside = dataclasses.replace(first, out=tmp_path / "src")  # the dataset in the source folder itself
    made = cut_only(inside)
    assert (made.clips_cut, made.failed_sources) == (1, [])
    again = clips_job.plan_sources(inside, dry_run=True)  # its own clips (src/videos) are not sources
    assert [p.source.name for p in again.sources] == ["src/a.mp4"] and not again.problems
    assert [name for name, _ in again.notes] == ["src/ds/videos"]
    beside = clips_job.plan_sources(other, dry_run=True)  # src is a dataset now: its footage is still a source
    assert [p.source.name for p in beside.sources] == ["src/a.mp4"]
    assert [name for name, _ in beside.notes] == ["src/ds/videos", "src/videos"]


def test_control_characters_in_a_name_are_printed_escaped(cli, tmp_path, one_shot):
    """Hostile review 9: a newline (or an escape sequence) in a file name was printed raw."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a\nb\x1b[2J.mp4").write_bytes(one_shot)
    code, out, err = cli(tmp_path / "src", "--out", tmp_path / "set", *SETTINGS, "--dry-run")
    assert code == 0 and "src/a\\nb\\x1b[2J.mp4" in err and "src/a\\nb\\x1b[2J.mp4: " in out
    assert "a\nb" not in out + err and "\x1b" not in out + err


def test_subtitles_only_for_sources_with_captioned_clips(tmp_path):
    """Hostile review 10: a source with no clip got a .srt and a header-only .vtt."""
    from adatp_core.clips import outputs
    from adatp_core.clips.plan import ClipPlan, Shot

    shot = Shot(index=0, start=0.0, end=2.0, transition="start")
    plan = ClipPlan(tmp_path / "a.mp4", 0, 0, 0.0, 9, 8.0, 64, 48, "a_s0000")
    (tmp_path / "videos").mkdir()
    clip = outputs.DatasetClip(plan, tmp_path / "videos" / "a_s0000.mp4", "a cat")
    with_clip = outputs.DatasetSource("a.mp4", str(tmp_path / "a.mp4"), "a-1", [shot], [clip])
    without = outputs.DatasetSource("b.mp4", str(tmp_path / "b.mp4"), "b-2", [shot], [])
    outputs.write_outputs(tmp_path, [with_clip, without], ("srt", "vtt"))
    assert sorted(p.name for p in (tmp_path / "subtitles").iterdir()) == ["a-1.srt", "a-1.vtt"]
    uncaptioned = dataclasses.replace(with_clip, clips=[dataclasses.replace(clip, caption=None)])
    outputs.write_outputs(tmp_path, [uncaptioned, without], ("srt", "vtt"))  # its caption went: so does its file
    assert not list((tmp_path / "subtitles").iterdir())


def test_obstacles_in_the_output_folder_are_named_with_what_to_do(cli, tmp_path, one_shot):
    """Hostile review 11: OUT/videos a file gave a raw '[Errno 17] File exists', OUT/clips.jsonl a
    folder a message naming write_atomic's temp file."""
    (tmp_path / "one.mp4").write_bytes(one_shot)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "videos").write_text("x")
    code, _, err = cli(tmp_path / "one.mp4", "--out", tmp_path / "a", *SETTINGS)
    assert code == 2 and f"--out: {tmp_path / 'a' / 'videos'} is a file" in err and "move or remove it" in err
    (tmp_path / "b" / "clips.jsonl").mkdir(parents=True)
    code, _, err = cli(tmp_path / "one.mp4", "--out", tmp_path / "b", *SETTINGS)
    assert code == 2 and f"{tmp_path / 'b' / 'clips.jsonl'} is a folder" in err and "move or remove it" in err
    for inner in ("sources", "replaced", "captions"):  # the state folder's own folders, refused up front too
        (tmp_path / inner / ".adatp").mkdir(parents=True)
        (tmp_path / inner / ".adatp" / inner).write_text("x")
        code, _, err = cli(tmp_path / "one.mp4", "--out", tmp_path / inner, *SETTINGS, "--layout", "jsonl")
        assert code == 2 and f"{tmp_path / inner / '.adatp' / inner} is a file" in err, err
    for journal in ("made", "aside"):  # a source's journal a folder: met mid-run, a raw IsADirectoryError (exit 2)
        notes = tmp_path / journal / ".adatp" / "sources" / f"one-0123abcd.{journal}.jsonl"
        notes.mkdir(parents=True)
        code, _, err = cli(tmp_path / "one.mp4", "--out", tmp_path / journal, *SETTINGS)
        assert code == 2 and f"--out: {notes} is not a file" in err and "move or remove it" in err, err
        assert "IsADirectoryError" not in err and not (tmp_path / journal / "videos").exists()
    job = ClipsJob(sources=(tmp_path / "one.mp4",), out=tmp_path / "c", rules=RULES, layouts=("jsonl",))
    (job.out / "clips.jsonl").mkdir(parents=True)  # made after the job's check: the layouts name it
    summary = clips_job.ClipsSummary()
    write_layouts(job, summary)
    assert summary.output_error.startswith(f"{job.out / 'clips.jsonl'} (") and ".tmp" not in summary.output_error
    assert not cli.loads


def test_a_pipe_or_a_device_as_source_is_not_a_regular_file(tmp_path):
    """Hostile review 12: a FIFO or /dev/zero given as SOURCE was reported as 'does not exist'."""
    os.mkfifo(tmp_path / "pipe.mp4")
    job = ClipsJob(sources=(tmp_path / "pipe.mp4", Path("/dev/zero"), tmp_path / "gone.mp4"), out=tmp_path / "o")
    plan = clips_job.plan_sources(job, dry_run=True)
    assert not plan.sources and [why for _, why in plan.problems] == [
        "is not a regular file (a pipe or a device); give a video file"] * 2 + ["does not exist; check the path"]


def test_a_source_replaced_by_other_footage_is_cut_again_and_its_old_captions_go(tmp_path, short):
    """Hostile review 14: other footage with the same shot times under the same name kept the old
    clips and captions; the record's size and mtime tell the file changed."""
    src = tmp_path / "take.mp4"
    src.write_bytes(short)
    job = ClipsJob(sources=(src,), out=tmp_path / "set", rules=RULES)
    cut_only(job)
    old = {c.name: c.read_bytes() for c in clips_of(job)}
    for c in clips_of(job):
        c.with_suffix(".txt").write_text("the old footage")
    write_video(src, 255 - scene_frames(32, 64, 48, scenes=2), fps=FPS)  # the same shots, other pictures
    os.utime(src, ns=(os.stat(src).st_atime_ns, os.stat(src).st_mtime_ns + 10**9))
    again = cut_only(job)
    assert (again.clips_cut, again.clips_existing) == (2, 0)
    assert sorted(c.name for c in clips_of(job)) == sorted(old) and all(c.read_bytes() != old[c.name]
                                                                        for c in clips_of(job))
    assert not list(job.clips_dir.glob("*.txt"))  # the old captions went with their clips
    assert len(list((job.state_dir / "replaced").glob("*.txt"))) == 2


def test_what_each_clip_holds_survives_a_kill_before_the_record_is_rewritten(tmp_path, short, monkeypatch):
    """Hostile review: copy mode killed before the record's rewrite (every 10 s, and at the source's end)
    kept the planned values for the clips cut meanwhile, so the JSONL listed frames they do not hold.
    Each clip is journaled as it is made (KEY.made.jsonl, one fsynced line) and folded in when read."""
    (tmp_path / "short.mp4").write_bytes(short)
    job = ClipsJob(sources=(tmp_path / "short.mp4",), out=tmp_path / "set", rules=RULES, cut="copy")
    plan = clips_job.plan_sources(job)
    key = plan.sources[0].key
    real = clips_job.write_record
    monkeypatch.setattr(clips_job, "write_record", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        with pytest.raises(KeyboardInterrupt):  # killed at the source's end, before the record is rewritten
            clips_job.cut_sources(job, plan, clips_job.ClipsSummary())
    finally:
        plan.release()
    monkeypatch.setattr(clips_job, "write_record", real)
    record = json.loads(clips_job.record_path(job, key).read_text())
    assert record["made"] == {} and len(clips_of(job)) == 2  # the record holds the plan only
    with open(clips_records.journal_path(job, key), "a") as f:
        f.write('{"clip": "cut short by a kil')  # a line the kill cut short is skipped
    made = {c.plan.name: (c.value("frames"), round(c.value("fps"), 3), c.value("width"), c.value("height"))
            for s in clips_job.dataset(job) for c in s.clips}
    held = {p.stem: (probe_video(p).frame_count, round(probe_video(p).fps, 3), probe_video(p).width,
                     probe_video(p).height) for p in clips_of(job)}
    planned = {c["name"]: (c["frames"], round(c["fps"], 3), c["width"], c["height"]) for c in record["clips"]}
    assert made == held and held != planned  # what the files hold, not the plan
    assert cut_only(job).clips_existing == 2  # the next run folds the journal into the record
    assert sorted(json.loads(clips_job.record_path(job, key).read_text())["made"]) == sorted(held)
    assert not clips_records.journal_path(job, key).exists()


def test_a_file_name_that_is_not_utf8_is_cut_captioned_and_listed(cli, tmp_path, one_shot):
    """Hostile review 1: a name's undecodable byte (held as a surrogate escape) stopped the whole job
    when the record was written as UTF-8; it is kept as an escape that reads back exactly."""
    (tmp_path / "src").mkdir()
    bad = Path(os.fsdecode(bytes(tmp_path / "src") + b"/bad\xff.mp4"))
    bad.write_bytes(one_shot)
    (tmp_path / "src" / "ok.mp4").write_bytes(one_shot)
    out = tmp_path / "set"
    code, stdout, err = cli(tmp_path / "src", "--out", out, *SETTINGS, "--layout", "all")
    assert code == 0, err
    clips = sorted((out / "videos").glob("*.mp4"))
    assert [c.name.split("-")[0] for c in clips] == ["bad", "ok"] and all(c.name.isascii() for c in clips)
    assert all(c.with_suffix(".txt").read_text() for c in clips)
    rows = [json.loads(line) for line in (out / "clips.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows[0]["source"].endswith("bad\\xff.mp4") and "source_b64" not in rows[1]
    assert base64.b64decode(rows[0]["source_b64"]) == os.fsencode(bad)
    assert sorted(p.name for p in (out / "subtitles").iterdir())[0].startswith("bad-")
    code, stdout, err = cli(tmp_path / "src", "--out", out, *SETTINGS)
    assert code == 0 and "0 cut now, 2 already there" in stdout and "2 from an earlier run" in stdout
    code, stdout, err = cli(tmp_path / "src", "--out", out, *SETTINGS, "--dry-run", "--json")
    assert code == 0 and json.loads(stdout)["sources"][0]["source"] == "src/bad\\xff.mp4"


def test_a_run_leaves_alone_a_source_another_run_is_still_captioning(tiny, tmp_path, one_shot):
    """Hostile review 3: the source's claim went right after cutting, so a second run with other rules
    set aside the clips the first was captioning; the claim now lasts until they are captioned."""
    (tmp_path / "one.mp4").write_bytes(one_shot)
    job = ClipsJob(sources=(tmp_path / "one.mp4",), out=tmp_path / "set", rules=RULES, pipeline=CFG, workers=0)
    other = dataclasses.replace(job, rules=dataclasses.replace(RULES, max_side=32))  # the same names, smaller
    seen = []

    def on_event(stage, done, total, name):
        if stage == "caption" and done == 0:  # the first run captions now: a second run starts
            seen.append(run_clips(tiny, other))

    first = run_clips(tiny, job, on_event=on_event)
    second = seen[0]
    assert second.elsewhere == [str(tmp_path / "one.mp4")] and second.clips_replaced == 0
    assert "left to another run" in second.text() and "from an earlier run" not in second.text()  # review 7
    clips = clips_of(job)
    assert first.exit_code() == 0 and len(clips) == 1 and clips[0].with_suffix(".txt").read_text()
    assert not (job.state_dir / "replaced").exists()
    again = run_clips(tiny, other)  # once the first run is done, the new rules replace its clips
    assert again.clips_replaced == 1 and not again.elsewhere


def test_a_recut_clip_does_not_adopt_the_old_footages_caption_from_the_other_layout(tmp_path, short):
    """A clip cut again under its name has its captions set aside from both places (beside the clip and in
    the state folder a run with other layouts used): the one left behind was copied onto the new clip."""
    (tmp_path / "short.mp4").write_bytes(short)
    job = ClipsJob(sources=(tmp_path / "short.mp4",), out=tmp_path / "set", rules=RULES, layouts=("txt", "jsonl"))
    cut_only(job)
    clip = next(iter(clips_of(job)))
    name = clip.name[:-4]
    (job.clips_dir / f"{name}.txt").write_text("beside the clip")
    (job.state_dir / "captions").mkdir(parents=True, exist_ok=True)
    (job.state_dir / "captions" / f"{name}.txt").write_text("from a jsonl run")
    plan = clips_job.record_plan(clips_job.read_record(job, name.split("_s")[0]))[2]
    assert clips_job.set_aside(job, [c for c in plan if c.name == name]) == 1
    assert clips_job.adopt_captions(job, [name]) == 0 and not (job.clips_dir / f"{name}.txt").exists()
    aside = job.state_dir / "replaced"
    assert (aside / f"{name}.txt").read_text() == "beside the clip"
    assert (aside / "captions" / f"{name}.txt").read_text() == "from a jsonl run"


@pytest.mark.parametrize("damage", ["cut short", "edited"])
def test_a_damaged_record_fails_its_source_by_name_and_touches_nothing(tmp_path, short, damage, caplog):
    """A record cut short or edited by hand was taken for none: its source was detected and cut again
    beside its old clips (or, with other rules, its old clips stayed with a record calling them new)."""
    (tmp_path / "short.mp4").write_bytes(short)
    job = ClipsJob(sources=(tmp_path / "short.mp4",), out=tmp_path / "set", rules=RULES, layouts=("txt", "jsonl"))
    cut_only(job)
    before = {p.name: p.stat().st_mtime_ns for p in clips_of(job)}
    record = next((job.state_dir / "sources").glob("*.json"))
    text = record.read_text()
    record.write_text(text[:300] if damage == "cut short" else text.replace('"shots": [', '"shots": "x", "was": [', 1))
    other = dataclasses.replace(job, rules=dataclasses.replace(RULES, max_side=32))
    plan = clips_job.plan_sources(other)
    try:
        errors = [p.error for p in plan.sources if p.error]
    finally:
        plan.release()
    assert len(errors) == 1 and "is damaged" in errors[0] and "move that file away" in errors[0]
    assert cut_only(other).clips_cut == 0
    assert {p.name: p.stat().st_mtime_ns for p in clips_of(job)} == before  # nothing cut, nothing set aside
    assert not (job.state_dir / "replaced").exists()
    with caplog.at_level("WARNING"):
        assert clips_job.dataset(job) == []
    assert any("is damaged" in r.getMessage() for r in caplog.records)


def test_a_run_that_finds_every_source_held_says_by_whom_and_exits_3(cli, tmp_path, one_shot, comfy, tiny):
    """Hostile review: a run whose every source another run held exited 0 saying little, and the node
    reported success; now exit 3 (EXIT_BUSY), the holding process and claim file named, what to do."""
    from adatp_core.caption import ClipClaim

    (tmp_path / "one.mp4").write_bytes(one_shot)
    job = ClipsJob(sources=(tmp_path / "one.mp4",), out=tmp_path / "set", rules=RULES)
    other = ClipClaim(clips_job.record_path(job, clips_job.source_key(tmp_path / "one.mp4")))
    other.path.parent.mkdir(parents=True)
    assert other.acquire()
    _, inp, out = comfy
    (inp / "one.mp4").write_bytes(one_shot)
    node_job = ClipsJob(sources=(inp / "one.mp4",), out=out / "set", rules=RULES)
    node_claim = ClipClaim(clips_job.record_path(node_job, clips_job.source_key(inp / "one.mp4")))
    node_claim.path.parent.mkdir(parents=True)
    assert node_claim.acquire()
    try:
        code, stdout, err = cli(tmp_path / "one.mp4", "--out", tmp_path / "set", *SETTINGS)
        with pytest.raises(RuntimeError, match="every source .1. is left to another run"):
            clip_node()().make(tiny, "one.mp4", "set", "Describe.", "", MIN_S, MAX_S, FPS, "4k+1",
                               caption_frames=2, max_new_tokens=3, batch_size=1)
    finally:
        other.release()
        node_claim.release()
    assert code == clips_summary.EXIT_BUSY == 3, (code, stdout, err)
    assert "Nothing done: every source (1) is left to another run" in stdout
    assert f"held by process {os.getpid()} on " in stdout and other.path.name in stdout
    assert "Wait for that run to finish" in stdout and "remove its claim file" in stdout
    assert not job.clips_dir.exists() or not clips_of(job)
    assert "3 when every source is held" in clips_cli.build_parser().epilog
    code, stdout, err = cli(tmp_path / "one.mp4", "--out", tmp_path / "set", *SETTINGS)  # the claim is free
    assert code == 0 and "1 cut now" in stdout


def padded(data: bytes, size: int) -> bytes:
    """An MP4 made ``size`` bytes long by a trailing 'free' box (which players skip)."""
    n = size - len(data)
    assert n >= 8
    return data + n.to_bytes(4, "big") + b"free" + bytes(n - 8)


def test_a_touched_source_keeps_its_clips_and_a_same_size_same_time_copy_is_cut_again(tmp_path, short):
    """Hostile review: touch (the time changed, not the footage) recut and recaptioned a source, and a
    source replaced by other footage of the same size with its time kept (cp -p) was not noticed; a
    fingerprint of the content (size, 1 MiB at the start, middle and end) decides now."""
    other = write_video(tmp_path / "other.mp4", 255 - scene_frames(32, 64, 48, scenes=2), fps=FPS).read_bytes()
    size = max(len(short), len(other)) + 16
    src = tmp_path / "take.mp4"
    src.write_bytes(padded(short, size))
    job = ClipsJob(sources=(src,), out=tmp_path / "set", rules=RULES)
    assert cut_only(job).clips_cut == 2
    before = {c.name: c.stat().st_mtime_ns for c in clips_of(job)}
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))  # touch
    again = cut_only(job)
    assert (again.clips_cut, again.clips_existing) == (0, 2) and not (job.state_dir / "replaced").exists()
    assert {c.name: c.stat().st_mtime_ns for c in clips_of(job)} == before
    record = json.loads(next((job.state_dir / "sources").glob("*.json")).read_text())
    assert record["mtime_ns"] == st.st_mtime_ns + 5 * 10**9 and len(record["fingerprint"]) == 32
    touched = os.stat(src)
    src.write_bytes(padded(other, size))  # cp -p: other footage, the same size, the time kept
    os.utime(src, ns=(touched.st_atime_ns, touched.st_mtime_ns))
    assert os.stat(src).st_size == touched.st_size
    replaced = cut_only(job)
    assert (replaced.clips_cut, replaced.clips_existing) == (2, 0)
    assert len(list((job.state_dir / "replaced").glob("*.mp4"))) == 2


def test_the_fingerprint_reads_three_mebibytes_of_a_large_file(tmp_path, monkeypatch):
    from adatp_core.clips import plan as clips_plan

    monkeypatch.setattr(clips_plan, "FINGERPRINT_PART", 4)
    big = tmp_path / "big.bin"
    big.write_bytes(b"a" * 4 + b"b" * 20 + b"c" * 4)
    first = clips_plan.fingerprint(big)
    big.write_bytes(b"a" * 4 + b"b" * 4 + b"X" + b"b" * 15 + b"c" * 4)  # outside the three parts read
    assert clips_plan.fingerprint(big) == first
    big.write_bytes(b"a" * 4 + b"b" * 9 + b"X" + b"b" * 10 + b"c" * 4)  # inside the middle part (12-15)
    assert clips_plan.fingerprint(big) != first
    big.write_bytes(b"a" * 4 + b"b" * 20 + b"c" * 5)  # one byte longer
    assert clips_plan.fingerprint(big) != first


def test_a_renamed_source_folder_keeps_its_clips_and_a_gone_source_is_reported(tiny, tmp_path, short, one_shot):
    """Hostile review: a renamed source folder doubled the set (the renamed files cut again under new
    names beside the old clips, nothing said); the same footage (by fingerprint) adopts the record of a
    source that is gone, and a record whose source is gone and not adopted is named with what to do."""
    (tmp_path / "films").mkdir()
    (tmp_path / "films" / "a.mp4").write_bytes(short)
    (tmp_path / "films" / "b.mp4").write_bytes(one_shot)
    job = ClipsJob(sources=(tmp_path / "films",), out=tmp_path / "set", rules=RULES, pipeline=CFG, workers=0,
                   layouts=("txt", "jsonl", "srt"))
    first = run_clips(tiny, job)
    assert first.exit_code() == 0 and first.clips_cut == 3
    before = {p.name: p.stat().st_mtime_ns for p in job.clips_dir.iterdir()}
    old_key = clips_job.source_key(tmp_path / "films" / "a.mp4")
    clips_records.aside_path(job, old_key).write_text('{"file": "x.mp4"}\n')  # its notes of clips set aside
    (tmp_path / "films").rename(tmp_path / "footage")
    (tmp_path / "footage" / "b.mp4").unlink()  # b is gone for good
    moved = dataclasses.replace(job, sources=(tmp_path / "footage",))
    summary = run_clips(lambda: pytest.fail("nothing to caption"), moved)
    assert (summary.clips_cut, summary.clips_existing, summary.detected, summary.clips_replaced) == (0, 2, 0, 0)
    new_key = clips_job.source_key(tmp_path / "footage" / "a.mp4")
    assert {p.name: p.stat().st_mtime_ns for p in job.clips_dir.iterdir()} == \
        {n.replace(old_key, new_key): t for n, t in before.items()}  # renamed for the new key; nothing cut or captioned
    text = summary.text()
    assert summary.adopted == [("footage/a.mp4", str(tmp_path / "films" / "a.mp4"))]
    assert "1 source(s) moved or renamed" in text and "films/a.mp4 -> footage/a.mp4" in text
    assert [(s, n) for s, _, n in summary.gone] == [(str(tmp_path / "films" / "b.mp4"), 1)]
    assert "no longer where they were" in text and "Their clips stay in the set" in text and "remove its record" in text
    records = sorted((job.state_dir / "sources").glob("*.json"))
    assert len(records) == 2  # a's moved to its new key, b's left
    assert clips_records.aside_path(job, new_key).read_text() == '{"file": "x.mp4"}\n'  # moved with the record
    assert not clips_records.aside_path(job, old_key).exists()
    assert json.loads(clips_job.record_path(job, new_key).read_text())["source"] == str(tmp_path / "footage" / "a.mp4")
    rows = [json.loads(line) for line in (job.out / "clips.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and sum(r["source"] == str(tmp_path / "footage" / "a.mp4") for r in rows) == 2
    assert sorted(p.stem for p in (job.out / "subtitles").glob("*.srt")) == sorted(r.stem for r in records)
    again = run_clips(lambda: pytest.fail("nothing to caption"), moved)
    assert not again.adopted and again.clips_existing == 2 and len(again.gone) == 1


@pytest.mark.parametrize("clips", ["as planned", "one otherwise", "with its cut settings"])
def test_a_record_of_the_older_format_is_upgraded_when_its_clips_match_its_plan(tmp_path, short, clips):
    """Hostile review: a record written before records held the cut settings and the resolved path made
    the next run set aside, recut and recaption every clip once; its clips are checked against its plan
    (frames, rate, size, from the containers) and the record upgraded in place instead."""
    (tmp_path / "short.mp4").write_bytes(short)
    job = ClipsJob(sources=(tmp_path / "short.mp4",), out=tmp_path / "set", rules=RULES)
    assert cut_only(job).clips_cut == 2
    path = next((job.state_dir / "sources").glob("*.json"))
    record = json.loads(path.read_text())
    old = {k: v for k, v in record.items() if k not in ("cut", "resolved", "made", "fingerprint")}
    if clips == "with its cut settings":  # written between the two changes: the cut kept, not the path
        old["cut"] = {**record["cut"], "crf": 30}
    path.write_text(json.dumps(old))
    if clips == "one otherwise":  # a clip of 5 frames under a name planned with 13
        write_video(clips_of(job)[0], scene_frames(5, 64, 48, scenes=1), fps=FPS)
    before = {c.name: c.stat().st_mtime_ns for c in clips_of(job)}
    again = cut_only(job)
    if clips != "as planned":  # as before: the record cannot say how its clips were made, or says otherwise
        assert (again.clips_cut, again.clips_existing) == (2, 0)
        assert len(list((job.state_dir / "replaced").glob("*.mp4"))) == 2
        return
    assert (again.clips_cut, again.clips_existing) == (0, 2) and not (job.state_dir / "replaced").exists()
    assert {c.name: c.stat().st_mtime_ns for c in clips_of(job)} == before
    now = json.loads(path.read_text())
    assert now["resolved"] == record["resolved"] and now["fingerprint"]
    # how the clips were cut (crf) cannot be read from them: kept under any cut settings, claimed as none
    assert now["cut"] == "unknown" and cut_only(dataclasses.replace(job, crf=30)).clips_existing == 2
    assert json.loads(path.read_text())["cut"] == "unknown"
    smaller = dataclasses.replace(job, rules=dataclasses.replace(RULES, max_side=32))
    assert cut_only(smaller).clips_cut == 2  # every clip cut anew: now the record knows how
    assert json.loads(path.read_text())["cut"] == clips_settings.cut_settings(job)
    assert cut_only(job).clips_cut == 2  # the unknown ones set aside are not restored as crf 18's


def test_settings_switched_back_restore_the_clips_set_aside_with_their_captions(tmp_path, short):
    """Hostile review: switching settings back and forth recut (and recaptioned) every clip each time,
    though the earlier clips sat in .adatp/replaced; those made with the plan and settings asked for now
    are moved back, with their captions."""
    (tmp_path / "short.mp4").write_bytes(short)
    job = ClipsJob(sources=(tmp_path / "short.mp4",), out=tmp_path / "set", rules=RULES, layouts=("txt", "jsonl"))
    assert cut_only(job).clips_cut == 2
    for clip in clips_of(job):
        clip.with_suffix(".txt").write_text(f"the caption of {clip.stem}")
    first = {p.name: p.read_bytes() for p in job.clips_dir.iterdir()}  # clips and captions
    smaller = dataclasses.replace(job, rules=dataclasses.replace(RULES, max_side=32))
    assert cut_only(smaller).clips_cut == 2
    back = run_clips(lambda: pytest.fail("nothing to caption"), job)
    assert (back.clips_cut, back.clips_replaced, back.clips_restored) == (0, 2, 2)
    assert {p.name: p.read_bytes() for p in job.clips_dir.iterdir()} == first
    assert "2 moved back from .adatp/replaced" in back.text()
    assert len(list((job.state_dir / "replaced").glob("*.mp4"))) == 2  # the smaller ones, set aside in turn
    assert cut_only(dataclasses.replace(job, crf=30)).clips_cut == 2  # not as they were made: cut again
    again = cut_only(smaller)
    assert (again.clips_cut, again.clips_existing) == (0, 2)  # moved back, not cut
    assert {(p.width, p.height) for p in map(probe_video, clips_of(job))} == {(32, 24)}


def test_a_record_under_the_key_an_earlier_version_gave_is_taken_not_doubled(tmp_path, short):
    """Folder sources were keyed by the path below the folder before; their records (older format,
    clips named with that key) stayed beside the new key's, and the source was cut again under new
    names: the set held every clip twice. The record of the same file under another key is taken."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "short.mp4").write_bytes(short)
    job = ClipsJob(sources=(tmp_path / "src",), out=tmp_path / "set", rules=RULES)
    assert cut_only(job).clips_cut == 2
    key = clips_job.source_key(tmp_path / "src" / "short.mp4")
    old_key = "short-0123abcd"
    record = json.loads(clips_job.record_path(job, key).read_text())
    for c in record["clips"]:  # as the earlier version named them
        new_name = c["name"].replace(key, old_key)
        (job.clips_dir / f"{c['name']}.mp4").rename(job.clips_dir / f"{new_name}.mp4")
        c["name"] = new_name
    old = {k: v for k, v in record.items() if k not in ("cut", "resolved", "made", "fingerprint")}
    old["source"] = str(tmp_path / "src" / "short.mp4")
    clips_job.record_path(job, old_key).write_text(json.dumps(old))
    clips_job.record_path(job, key).unlink()
    before = {p.name: p.stat().st_mtime_ns for p in clips_of(job)}
    again = cut_only(job)
    assert (again.clips_cut, again.clips_existing) == (0, 2)
    assert {p.name: p.stat().st_mtime_ns for p in clips_of(job)} == \
        {n.replace(old_key, key): t for n, t in before.items()}  # renamed for this version's key, not cut
    assert [p.stem for p in (job.state_dir / "sources").glob("*.json")] == [key]
    assert sum(len(s.clips) for s in clips_job.dataset(job)) == 2


def inverse(path: Path) -> Path:
    """Other footage with the cuts of ``short`` (4 s, two 2 s shots): its negative."""
    return write_video(path, 255 - scene_frames(32, 64, 48, scenes=2), fps=FPS)


def test_a_moved_sources_clips_take_its_new_key_and_new_footage_at_the_old_path_gets_its_own(tmp_path, short):
    """Hostile review: an adopted record kept its clips under the old key's names, so the next file at the
    old path (same key, same names) found them 'already there': 0 cut, and the set listed them twice.
    A copy adopted while the original was away did the same once the original came back."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.mp4").write_bytes(short)
    job = ClipsJob(sources=(tmp_path / "src",), out=tmp_path / "set", rules=RULES, layouts=("txt", "jsonl"))
    assert cut_only(job).clips_cut == 2
    for clip in clips_of(job):
        clip.with_suffix(".txt").write_text(f"the caption of {clip.stem}")
    first = {p.stem: p.read_bytes() for p in clips_of(job)}
    (tmp_path / "src" / "a.mp4").rename(tmp_path / "src" / "b.mp4")
    moved = cut_only(job)
    assert (moved.clips_cut, moved.clips_existing) == (0, 2)
    b_key = clips_job.source_key(tmp_path / "src" / "b.mp4")
    assert all(p.stem.startswith(f"{b_key}_s") for p in clips_of(job))  # renamed, with their captions
    assert sorted(p.read_bytes() for p in clips_of(job)) == sorted(first.values())
    a_key = clips_job.source_key(tmp_path / "src" / "a.mp4")
    assert [p.with_suffix(".txt").read_text() for p in clips_of(job)] == \
        [f"the caption of {p.stem.replace(b_key, a_key)}" for p in clips_of(job)]
    inverse(tmp_path / "src" / "a.mp4")  # other footage at the old path
    again = cut_only(job)
    assert (again.clips_cut, again.clips_existing) == (2, 2)
    sets = clips_job.dataset(job)
    listed = [c.path.name for s in sets for c in s.clips]
    assert len(listed) == len(set(listed)) == 4 and not (job.state_dir / "replaced").exists()


def test_a_copy_taken_while_the_original_was_away_keeps_the_clips_apart(tmp_path, short):
    import shutil

    usb, home = tmp_path / "usb", tmp_path / "home"
    usb.mkdir(), home.mkdir()
    (usb / "a.mp4").write_bytes(short)
    job = ClipsJob(sources=(usb,), out=tmp_path / "set", rules=RULES, layouts=("txt", "jsonl"))
    assert cut_only(job).clips_cut == 2
    shutil.copy2(usb / "a.mp4", home / "a.mp4")
    usb.rename(tmp_path / "unplugged")
    assert cut_only(dataclasses.replace(job, sources=(home,))).clips_existing == 2  # the copy takes the clips
    (tmp_path / "unplugged").rename(usb)
    both = dataclasses.replace(job, sources=(usb, home))
    summary = cut_only(both)
    assert (summary.clips_cut, summary.clips_existing) == (2, 2)
    for clip in clips_of(job):
        clip.with_suffix(".txt").write_text("a caption")
    write_layouts(both, summary)
    rows = [json.loads(line)["path"] for line in (job.out / "clips.jsonl").read_text().splitlines()]
    assert len(rows) == len(set(rows)) == 4


def test_a_kill_while_a_record_is_taken_leaves_what_the_next_run_finishes(tmp_path, short, monkeypatch):
    """Adoption renames the clips, moves the record, then rewrites it with the new names: killed before
    the rewrite, the record under the new key names the old key's clips, and the next run finishes it."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.mp4").write_bytes(short)
    job = ClipsJob(sources=(tmp_path / "src",), out=tmp_path / "set", rules=RULES)
    assert cut_only(job).clips_cut == 2
    a_key = clips_job.source_key(tmp_path / "src" / "a.mp4")
    name = clips_of(job)[0].stem
    made = {"start": 0.0, "frames": 13, "fps": FPS, "width": 64, "height": 48, "marked": 1}
    clips_records.journal(job, a_key, name, made)  # made since the record was written: it moves too
    (tmp_path / "src" / "a.mp4").rename(tmp_path / "src" / "b.mp4")
    b_key = clips_job.source_key(tmp_path / "src" / "b.mp4")
    real = clips_records.write_record_dict

    def killed(job, key, record):
        if key == b_key:
            raise KeyboardInterrupt
        real(job, key, record)

    monkeypatch.setattr(clips_records, "write_record_dict", killed)
    with pytest.raises(KeyboardInterrupt):
        cut_only(job)
    monkeypatch.undo()
    assert [p.stem for p in (job.state_dir / "sources").glob("*.json")] == [b_key]
    assert len(clips_job.dataset(job)[0].clips) == 2  # listed under the new names meanwhile
    again = cut_only(job)
    assert (again.clips_cut, again.clips_existing) == (0, 2)
    record = json.loads(clips_job.record_path(job, b_key).read_text())
    assert [c["name"].startswith(f"{b_key}_s") for c in record["clips"]] == [True, True]
    assert record["made"][name.replace(a_key, b_key)] == made


def test_a_folder_moved_with_a_link_left_at_the_old_place_keeps_its_clips(tmp_path, short):
    """Hostile review: the record's stored path still existed through the link, so it was neither gone nor
    the same file (the lookup used the new resolved path): the whole set was cut a second time."""
    src = tmp_path / "data" / "footage"
    src.mkdir(parents=True)
    (src / "a.mp4").write_bytes(short)
    job = ClipsJob(sources=(src,), out=tmp_path / "set", rules=RULES)
    assert cut_only(job).clips_cut == 2
    (tmp_path / "big").mkdir()
    src.rename(tmp_path / "big" / "footage")
    src.symlink_to(tmp_path / "big" / "footage")
    again = cut_only(job)
    assert (again.clips_cut, again.clips_existing) == (0, 2)
    gone = []
    sets = clips_job.dataset(job, gone)
    assert [len(s.clips) for s in sets] == [2] and not gone
    assert sets[0].key == clips_job.source_key(tmp_path / "big" / "footage" / "a.mp4")


@pytest.mark.parametrize("real_too", [False, True])
def test_a_link_re_pointed_at_other_footage_sets_the_old_footages_clips_aside(tmp_path, short, real_too):
    """Hostile review: the old footage's record stayed (its file still exists), so the set held two
    sources named src/link.mp4, the old footage's clips among the new ones. The old file given as a
    source too keeps its record and clips."""
    (tmp_path / "store").mkdir(), (tmp_path / "src").mkdir()
    (tmp_path / "store" / "real.mp4").write_bytes(short)
    link = tmp_path / "src" / "link.mp4"
    link.symlink_to(tmp_path / "store" / "real.mp4")
    job = ClipsJob(sources=(tmp_path / "src",), out=tmp_path / "set", rules=RULES)
    assert cut_only(job).clips_cut == 2
    inverse(tmp_path / "store" / "other.mp4")
    link.unlink()
    link.symlink_to(tmp_path / "store" / "other.mp4")
    if real_too:
        job = dataclasses.replace(job, sources=(tmp_path / "src", tmp_path / "store" / "real.mp4"))
    again = cut_only(job)
    assert (again.clips_cut, again.clips_existing) == (2, 2 if real_too else 0)
    assert len(list((job.state_dir / "replaced").glob("*.mp4"))) == (0 if real_too else 2)
    assert sorted((s.name, len(s.clips)) for s in clips_job.dataset(job)) == \
        sorted([("src/link.mp4", 2)] + ([(str(tmp_path / "store" / "real.mp4"), 2)] if real_too else []))


def test_a_kill_after_a_restore_leaves_the_clips_labelled_as_they_are(tmp_path, short, monkeypatch):
    """Hostile review: the clips were moved back before the record was written; killed between the two,
    the record still named the other settings, and the next run set the restored clips aside noted as
    those settings' (a later switch 'restored' 64 px clips as 32 px ones). The record goes first now,
    and a restore checks what the file holds."""
    (tmp_path / "a.mp4").write_bytes(short)
    big = ClipsJob(sources=(tmp_path / "a.mp4",), out=tmp_path / "set", rules=RULES)
    small = dataclasses.replace(big, rules=dataclasses.replace(RULES, max_side=32))
    assert cut_only(big).clips_cut == 2 and cut_only(small).clips_cut == 2
    real = clips_job.write_record

    def killed(job, plan):
        if plan.restored:
            raise KeyboardInterrupt
        real(job, plan)

    monkeypatch.setattr(clips_job, "write_record", killed)
    with pytest.raises(KeyboardInterrupt):
        cut_only(big)
    monkeypatch.undo()
    widths = lambda: {probe_video(p).width for p in clips_of(big)}  # noqa: E731
    assert widths() == {64} and cut_only(big).clips_existing == 2 and widths() == {64}
    again = cut_only(small)
    assert (again.clips_cut, again.clips_existing) == (0, 2) and widths() == {32}
    key = clips_job.source_key(tmp_path / "a.mp4")
    for file, note in clips_records.read_lines(clips_records.aside_path(big, key), "file").items():
        path = big.state_dir / "replaced" / file
        if path.exists():
            assert probe_video(path).width == note["plan"][3]  # each note says what its file holds


def test_a_set_aside_clip_that_does_not_hold_what_its_note_says_is_cut_again(tmp_path, short):
    (tmp_path / "a.mp4").write_bytes(short)
    big = ClipsJob(sources=(tmp_path / "a.mp4",), out=tmp_path / "set", rules=RULES)
    small = dataclasses.replace(big, rules=dataclasses.replace(RULES, max_side=32))
    cut_only(big), cut_only(small)
    aside = sorted((big.state_dir / "replaced").glob("*.mp4"))
    write_video(aside[0], scene_frames(5, 64, 48, scenes=1), fps=FPS)  # 5 frames where 13 are noted
    back = cut_only(big)
    assert (back.clips_cut, back.clips_existing) == (1, 1)
    assert {probe_video(p).frame_count for p in clips_of(big)} == {13}


@pytest.mark.parametrize("made", [{"fps": 0}, {"start": "x"}, {"frames": None, "fps": "8"}, [1]])
def test_what_a_clip_holds_that_could_not_be_a_clips_is_left_out_or_fails_its_record(tmp_path, short, made, caplog):
    """Hostile review: a bad value from the journal was folded into the record and broke the layouts
    (ZeroDivisionError, TypeError) on every later run, the whole job with them."""
    (tmp_path / "a.mp4").write_bytes(short)
    job = ClipsJob(sources=(tmp_path / "a.mp4",), out=tmp_path / "set", rules=RULES, layouts=("txt", "jsonl"))
    cut_only(job)
    for clip in clips_of(job):
        clip.with_suffix(".txt").write_text("a caption")
    key = clips_job.source_key(tmp_path / "a.mp4")
    name = clips_of(job)[0].stem
    clips_records.append_line(clips_records.journal_path(job, key), {"clip": name, "made": made})
    summary = clips_job.ClipsSummary()
    with caplog.at_level("WARNING"):
        write_layouts(job, summary)
    assert summary.output_error is None and any("could not be a clip's" in r.getMessage() for r in caplog.records)
    rows = [json.loads(line) for line in (job.out / "clips.jsonl").read_text().splitlines()]
    assert [(r["fps"], r["frames"]) for r in rows] == [(FPS, 13), (FPS, 13)]  # the plan's values
    cut_only(job)  # folded into the record: left out there too
    record = json.loads(clips_job.record_path(job, key).read_text())
    assert all(clips_records.good_made(m) for m in record["made"].values())
    record["made"][name] = made  # in the record itself: that source fails as damaged, not the job
    clips_job.record_path(job, key).write_text(json.dumps(record))
    plan = clips_job.plan_sources(job)
    plan.release()
    assert "is damaged" in plan.sources[0].error
    write_layouts(job, summary)
    assert summary.output_error is None


@pytest.mark.parametrize("file", ["../../../outside/keep.me", "../../../outside/keep.mp4", "ABS", "link.mp4"])
def test_a_note_of_a_clip_set_aside_moves_back_only_a_file_in_the_replaced_folder(tmp_path, short, file):
    """Hostile review (security): restore trusted the note's file, so ../../outside/x or an absolute path
    moved a file from anywhere into videos/."""
    (tmp_path / "a.mp4").write_bytes(short)
    job = ClipsJob(sources=(tmp_path / "a.mp4",), out=tmp_path / "set", rules=RULES)
    cut_only(job)
    (tmp_path / "outside").mkdir()
    keep = tmp_path / "outside" / Path(file).name.replace("link", "keep")
    keep.write_bytes(clips_of(job)[0].read_bytes())  # a clip, even: it must stay where it is
    (job.state_dir / "replaced").mkdir()
    if file == "ABS":
        file = str(keep)
    if file == "link.mp4":
        (job.state_dir / "replaced" / file).symlink_to(keep)
    plan = clips_job.plan_sources(job, dry_run=True).sources[0]
    clip = plan.clips[0]
    os.unlink(clips_job.clip_path(job, clip))
    clips_records.append_line(clips_records.aside_path(job, plan.key), {
        "file": file, "clip": clip.name, "plan": clips_records.plan_fields(clip),
        "cut": clips_settings.cut_settings(job), "fingerprint": plan.fingerprint, "made": None})
    again = cut_only(job)
    assert (again.clips_cut, again.clips_existing) == (1, 1)
    assert keep.is_file() and not clips_job.clip_path(job, clip).is_symlink()


@pytest.mark.parametrize("folder", [".adatp/replaced", ".adatp/replaced/captions", ".adatp/sources", ".adatp/captions",
                                    "subtitles"])
def test_the_node_refuses_any_folder_of_the_set_that_leads_out_of_its_output_root(tmp_path, one_shot, folder):
    """Hostile review (security): only the set, videos/, .adatp/ and the captions folder were checked:
    .adatp/replaced, .adatp/sources or subtitles/ as links out of output/ were written through."""
    (tmp_path / "input").mkdir(), (tmp_path / "output" / "set").mkdir(parents=True), (tmp_path / "elsewhere").mkdir()
    (tmp_path / "input" / "a.mp4").write_bytes(one_shot)
    link = tmp_path / "output" / "set" / folder
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(clips_settings.OptionError, match="leads outside"):
        ClipsJob(sources=(tmp_path / "input" / "a.mp4",), out=tmp_path / "output" / "set", rules=RULES,
                 root=tmp_path / "input", out_root=tmp_path / "output", layouts=("jsonl", "srt"))
    assert not any((tmp_path / "elsewhere").iterdir())


def test_a_journal_line_cut_short_does_not_swallow_the_next(tmp_path, monkeypatch):
    """Hostile review: append_line added no newline after a line cut short (the next whole line was read
    as part of it and lost), and took a short os.write for all of it."""
    path = tmp_path / "a.made.jsonl"
    clips_records.append_line(path, {"clip": "a", "made": {"frames": 7}})
    path.write_bytes(path.read_bytes()[:-10])  # cut short (power loss, a full disk, an editor)
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, bytes(data)[:5]))  # five bytes a call
    clips_records.append_line(path, {"clip": "b", "made": {"frames": 9}})
    monkeypatch.undo()
    assert clips_records.read_lines(path, "clip") == {"b": {"clip": "b", "made": {"frames": 9}}}


@pytest.mark.parametrize("record", ["with the video's facts", "from before them"])
def test_footage_alike_where_the_fingerprint_reads_is_not_taken_for_a_moved_source(tmp_path, short, monkeypatch,
                                                                                   record):
    """Hostile review: adoption checked the fingerprint alone (3 MiB of a large file); the container's
    duration, size and rate (or, for an older record, its shots' end) are checked too."""
    from adatp_core.clips import plan as clips_plan

    monkeypatch.setattr(clips_plan, "FINGERPRINT_PART", 16)  # stands for 1 MiB: the same blind spot, small
    other = write_video(tmp_path / "other.mp4", 255 - scene_frames(24, 64, 48, scenes=2), fps=FPS).read_bytes()
    size = 4 * max(len(short), len(other))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.mp4").write_bytes(padded(short, size))
    job = ClipsJob(sources=(tmp_path / "src",), out=tmp_path / "set", rules=RULES)
    assert cut_only(job).clips_cut == 2
    key = clips_job.source_key(tmp_path / "src" / "a.mp4")
    kept = json.loads(clips_job.record_path(job, key).read_text())
    assert kept["video"] == {"duration": 4.0, "width": 64, "height": 48, "fps": FPS}
    if record == "from before them":
        clips_job.record_path(job, key).write_text(json.dumps({k: v for k, v in kept.items() if k != "video"}))
    (tmp_path / "src" / "a.mp4").unlink()
    (tmp_path / "src" / "b.mp4").write_bytes(padded(other, size))  # 3 s, not 4
    assert clips_plan.fingerprint(tmp_path / "src" / "b.mp4") == kept["fingerprint"]
    plan = clips_job.plan_sources(job, dry_run=True)
    assert plan.sources[0].adopted is None and plan.sources[0].duration == 3.0
    (tmp_path / "src" / "b.mp4").rename(tmp_path / "src" / "c.mp4")
    (tmp_path / "src" / "c.mp4").write_bytes(padded(short, size))  # the same footage: taken
    assert clips_job.plan_sources(job, dry_run=True).sources[0].adopted == str(tmp_path / "src" / "a.mp4")


def test_a_source_whose_own_files_cannot_be_written_fails_alone(tmp_path, short, one_shot, monkeypatch):
    """Hostile review: an obstacle met while a source's clips are set aside or its record written (a
    folder not writable) was a raw OSError that stopped the whole job; that source fails, named, with
    what to do, and the others are cut."""
    (tmp_path / "a.mp4").write_bytes(short)
    (tmp_path / "b.mp4").write_bytes(one_shot)
    job = ClipsJob(sources=(tmp_path / "a.mp4",), out=tmp_path / "set", rules=RULES)
    assert cut_only(job).clips_cut == 2
    real = os.replace

    def refused(src, dst, *a, **k):
        if "replaced" in str(dst):
            raise PermissionError(13, "Permission denied", str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", refused)
    both = dataclasses.replace(job, sources=(tmp_path / "a.mp4", tmp_path / "b.mp4"),
                               rules=dataclasses.replace(RULES, max_side=32))
    plan = clips_job.plan_sources(both)
    summary = clips_job.ClipsSummary()
    try:
        clips_job.cut_sources(both, plan, summary)
    finally:
        plan.release()
    failed = {p.source.name: p.error for p in plan.sources if p.error}
    assert list(failed) == [str(tmp_path / "a.mp4")] and "cannot write" in failed[str(tmp_path / "a.mp4")]
    assert "run again" in failed[str(tmp_path / "a.mp4")] and summary.clips_cut == 1  # b's


def test_a_note_of_a_clip_set_aside_with_values_no_clip_holds_restores_it_by_its_plan(tmp_path, short, caplog):
    (tmp_path / "a.mp4").write_bytes(short)
    big = ClipsJob(sources=(tmp_path / "a.mp4",), out=tmp_path / "set", rules=RULES, layouts=("txt", "jsonl"))
    cut_only(big), cut_only(dataclasses.replace(big, rules=dataclasses.replace(RULES, max_side=32)))
    key = clips_job.source_key(tmp_path / "a.mp4")
    notes = clips_records.aside_path(big, key)
    notes.write_text("".join(json.dumps({**n, "made": {"fps": 0, "start": "x"}}) + "\n"
                             for n in clips_records.read_lines(notes, "file").values()))
    with caplog.at_level("WARNING"):
        back = cut_only(big)
    assert (back.clips_cut, back.clips_existing) == (0, 2)
    assert any("could not be a clip's" in r.getMessage() for r in caplog.records)
    record = json.loads(clips_job.record_path(big, key).read_text())
    assert all(clips_records.good_made(m) for m in record["made"].values())


def test_an_older_record_of_a_relative_path_is_not_taken_by_that_path_from_another_folder(tmp_path, short,
                                                                                         monkeypatch):
    """The path given is compared made absolute when the record was written: an older record's relative
    path, read from another folder, names another file, whose source must not take it."""
    for where in ("one", "two"):
        (tmp_path / where / "src").mkdir(parents=True)
    (tmp_path / "one" / "src" / "a.mp4").write_bytes(short)
    inverse(tmp_path / "two" / "src" / "a.mp4")
    monkeypatch.chdir(tmp_path / "one")
    job = ClipsJob(sources=(Path("src/a.mp4"),), out=tmp_path / "set", rules=RULES)
    assert cut_only(job).clips_cut == 2
    path = next((job.state_dir / "sources").glob("*.json"))
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "given"}))
    monkeypatch.chdir(tmp_path / "two")
    assert cut_only(job).clips_cut == 2 and not (job.state_dir / "replaced").exists()
    assert [len(s.clips) for s in clips_job.dataset(job)] == [2, 2]
