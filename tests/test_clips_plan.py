"""Planning clips from shots (adatp_core/clips/plan.py): lengths, frame counts, trims, sizes, names."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from adatp_core.clips import ClipPlan, ClipRules, Shot, plan_clips, source_key
from adatp_core.clips.plan import clip_size, shot_clips, snap
from adatp_core.clips.synthetic import write_synthetic


def test_snap_keeps_the_largest_allowed_count():
    assert [snap(n, "4k+1") for n in (0, 1, 4, 5, 80, 81, 84)] == [0, 1, 1, 5, 77, 81, 81]
    assert [snap(n, "8k+1") for n in (8, 9, 16, 17, 120, 121)] == [1, 9, 9, 17, 113, 121]
    assert snap(80, "any") == 80


def test_wan_81_frames_at_16_fps_and_a_long_shot_gives_several_clips():
    rules = ClipRules(min_seconds=1.0, max_seconds=81 / 16, fps=16.0, frames="4k+1")
    clips = shot_clips(Shot(0, 0.0, 12.0, "start"), 16.0, rules)
    assert [n for _, n in clips] == [81, 81, 29]  # 12 s = 192 frames: 81 + 81, then 30 left -> 29
    assert [s for s, _ in clips] == [0.0, 81 / 16, 162 / 16]


def test_every_clip_obeys_min_max_and_the_frame_rule():
    for frames, step in (("4k+1", 4), ("8k+1", 8), ("any", 1)):
        rules = ClipRules(min_seconds=1.5, max_seconds=4.0, fps=24.0, frames=frames)
        for length in (0.5, 1.4, 1.6, 3.9, 4.2, 9.0, 17.3):
            for start, n in shot_clips(Shot(0, 2.0, 2.0 + length, "cut"), 24.0, rules):
                assert (n - 1) % step == 0
                assert 1.5 - 1e-9 <= (n - 1) / 24 <= 4.0 + 1e-9  # first frame to last
                assert 2.0 <= start and start + n / 24 <= 2.0 + length + 1e-9  # the clip inside the shot


def test_hunyuan_129_frames_at_24_fps():
    rules = ClipRules(min_seconds=1.0, max_seconds=129 / 24, fps=24.0)
    assert shot_clips(Shot(0, 0.0, 6.0, "start"), 24.0, rules) == [(0.0, 129)]


def test_a_length_runs_from_the_first_frame_to_the_last_as_the_trainers_count():
    """Wan: 81 frames = 5 s at 16 fps; HunyuanVideo: 129 frames = (129 - 1) / 24 = 5.333 s at 24 fps."""
    long_shot = Shot(0, 0.0, 20.0, "start")
    assert shot_clips(long_shot, 16.0, ClipRules(max_seconds=5.0, fps=16.0))[0] == (0.0, 81)
    assert shot_clips(long_shot, 24.0, ClipRules(max_seconds=5.0, fps=24.0))[0] == (0.0, 121)
    assert shot_clips(long_shot, 24.0, ClipRules(max_seconds=5.34, fps=24.0))[0] == (0.0, 129)  # README's flag
    assert shot_clips(long_shot, 24.0, ClipRules(max_seconds=5.34, fps=24.0, frames="8k+1"))[0] == (0.0, 129)
    # min_seconds too: 1 s at 16 fps is 17 frames, so a shot of 16.5 frames gives none
    assert shot_clips(Shot(0, 0.0, 16.5 / 16, "start"), 16.0, ClipRules(min_seconds=1.0, frames="any")) == []
    assert shot_clips(Shot(0, 0.0, 17.5 / 16, "start"), 16.0, ClipRules(min_seconds=1.0, frames="any")) == [(0.0, 17)]
    # the span a clip takes from the source (its end in names and manifests) is n / fps
    src = Path("/x/a.mp4")
    plan = ClipPlan(src, 0, 0, 0.0, 81, 16.0, 64, 48, "a")
    assert plan.end == pytest.approx(81 / 16)


def test_short_shots_are_dropped_or_kept():
    short = Shot(3, 10.0, 10.6, "cut")  # 0.6 s < min 1 s
    assert shot_clips(short, 16.0, ClipRules()) == []
    assert shot_clips(short, 16.0, ClipRules(keep_short=True)) == [(10.0, 9)]  # 9.6 frames -> 9 (4k+1)


def test_trim_keeps_transition_frames_out():
    rules = ClipRules(min_seconds=0.5, max_seconds=10.0, fps=16.0, frames="any", trim_frames=4)
    (start, n), = shot_clips(Shot(1, 2.0, 5.0, "dissolve"), 16.0, rules)
    assert start == pytest.approx(2.25) and n == 48 - 8


def test_sizes_are_even_and_capped_keeping_the_aspect():
    assert clip_size(1921, 1081, 0, 0) == (1920, 1080)
    assert clip_size(1920, 1080, 0, 512) == (512, 288)
    assert clip_size(1000, 333, 0, 500) == (500, 166)
    assert clip_size(1920, 1080, 90, 0) == (1080, 1920)  # rotation metadata: displayed portrait
    assert clip_size(1920, 1080, 270, 640) == (360, 640)
    assert all(v % 2 == 0 for v in clip_size(97, 65, 0, 0) + clip_size(4001, 2999, 0, 333))


def test_plan_clips_probes_size_rate_and_rotation(tmp_path):
    src = write_synthetic(tmp_path / "portrait.mp4", [(3.0, "start", 0.0)], width=96, height=64, rotation=90).path
    rules = ClipRules(min_seconds=0.5, max_seconds=23 / 24, fps=None, frames="any")  # 24 frames: 23/24 s long
    plans = plan_clips(src, [Shot(0, 0.0, 3.0, "start")], rules)
    assert [(p.width, p.height, p.fps, p.frames) for p in plans] == [(64, 96, 24.0, 24)] * 3
    assert [p.index for p in plans] == [0, 1, 2] and all(p.source == src and p.shot == 0 for p in plans)
    assert plans[1].start == pytest.approx(1.0) and plans[1].end == pytest.approx(2.0)


def test_plans_are_plain_dataclasses_that_rebuild(tmp_path):
    src = write_synthetic(tmp_path / "a.mp4", [(2.0, "start", 0.0)], width=64, height=48).path
    plan = plan_clips(src, [Shot(0, 0.0, 2.0, "start")], ClipRules())[0]
    d = dataclasses.asdict(plan)
    assert ClipPlan(**{**d, "source": Path(d["source"])}) == plan
    assert Shot(**dataclasses.asdict(Shot(1, 1.0, 2.0, "cut"))) == Shot(1, 1.0, 2.0, "cut")


def test_names_are_deterministic_and_same_stems_do_not_collide(tmp_path):
    a, b = tmp_path / "x" / "clip.mp4", tmp_path / "y" / "clip.mp4"
    for p in (a, b):
        p.parent.mkdir()
        write_synthetic(p, [(2.0, "start", 0.0)], width=64, height=48)
    assert source_key(a) != source_key(b)
    assert source_key(a) == source_key(a) and source_key(a).startswith("clip-")
    # one file, one key, however it is given: relative, through "..", through a link
    (tmp_path / "link.mp4").symlink_to(a)
    here = Path.cwd()
    try:
        os.chdir(tmp_path / "y")
        assert {source_key(Path("../x/clip.mp4")), source_key(tmp_path / "x" / ".." / "x" / "clip.mp4"),
                source_key(tmp_path / "link.mp4")} == {source_key(a)}
    finally:
        os.chdir(here)
    shots = [Shot(0, 0.0, 2.0, "start")]
    pa, pb = plan_clips(a, shots, ClipRules()), plan_clips(b, shots, ClipRules())
    assert pa == plan_clips(a, shots, ClipRules())
    assert {p.name for p in pa}.isdisjoint(p.name for p in pb)
    assert pa[0].name.startswith(source_key(a)) and "_s0000_0.000-" in pa[0].name
    assert source_key(tmp_path / "we ird:na*me.mkv").startswith("we_ird_na_me-")


def test_a_source_rate_past_the_cap_needs_a_frame_rate(tmp_path, monkeypatch):
    """Hostile review 2: --fps source on a file that says 1e9 fps is refused for that source."""
    from adatp_core.clips import plan as clip_plan
    from adatp_core.errors import AdaTPInputError
    from adatp_core.samples import scene_frames, write_video
    from adatp_core.video import probe_video

    src = write_video(tmp_path / "a.mp4", scene_frames(8, 32, 24, scenes=1), fps=8)
    real = probe_video(src)
    monkeypatch.setattr("adatp_core.video.probe_video", lambda p: dataclasses.replace(real, fps=1e9))
    with pytest.raises(AdaTPInputError, match="above 240"):
        clip_plan.plan_clips(src, [], ClipRules(fps=None))
