"""Shot detection (adatp_core/clips/shots.py) on synthetic videos with known cuts, dissolves and fades."""

from __future__ import annotations

import pytest

from adatp_core.clips import DEFAULT_THRESHOLD, Shot, detect_shots
from adatp_core.clips.synthetic import damage, shot_plan, write_synthetic
from adatp_core.errors import AdaTPInputError


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """Seven shots of about 2.5 s joined by cuts, dissolves and fades (1 s), 24 fps."""
    plan = shot_plan(7, 2.5, transition_seconds=1.0, seed=3)
    return write_synthetic(tmp_path_factory.mktemp("shots") / "known.mp4", plan, width=128, height=72, seed=3)


def test_cuts_dissolves_and_fades_are_found_where_they_are(known):
    shots = detect_shots(known.path)
    assert len(shots) == len(known.boundaries) + 1
    for shot, truth in zip(shots[1:], known.boundaries):
        if truth.kind == "cut":
            assert shot.transition == "cut"
            assert abs(shot.start - truth.time) <= 2 / known.fps, (shot, truth)
        else:  # dissolves and fades through black
            assert shot.transition == "dissolve"
            assert abs(shot.start - truth.time) <= 0.5, (shot, truth)


def test_shots_tile_the_video(known):
    shots = detect_shots(known.path)
    assert shots[0].start == 0.0 and shots[0].transition == "start"
    assert [s.index for s in shots] == list(range(len(shots)))
    assert all(a.end == b.start for a, b in zip(shots, shots[1:]))
    assert shots[-1].end == pytest.approx(known.duration, abs=1e-3)


def test_progress_reaches_the_duration(known):
    seen = []
    detect_shots(known.path, on_progress=lambda done, total: seen.append((done, total)))
    assert len(seen) >= 2 and seen[-1][0] == seen[-1][1] == pytest.approx(known.duration, abs=1e-3)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_a_higher_threshold_finds_fewer_changes(known):
    assert len(detect_shots(known.path, threshold=0.95)) < len(detect_shots(known.path, threshold=DEFAULT_THRESHOLD))


def test_a_video_without_a_cut_is_one_shot(tmp_path):
    truth = write_synthetic(tmp_path / "one.mp4", [(6.0, "start", 0.0)], width=96, height=64)
    assert detect_shots(truth.path) == [Shot(0, 0.0, pytest.approx(truth.duration, abs=1e-3), "start")]


@pytest.mark.parametrize("threshold", [0, -0.1, 1.5, float("nan"), "0.3", True])
def test_a_bad_threshold_is_refused(known, threshold):
    with pytest.raises(AdaTPInputError, match="threshold"):
        detect_shots(known.path, threshold=threshold)


def test_a_file_that_is_not_a_video_is_refused_clearly(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n")
    with pytest.raises(AdaTPInputError, match="notes.mp4"):
        detect_shots(text)
    junk = tmp_path / "junk.mkv"
    junk.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(AdaTPInputError, match="junk.mkv"):
        detect_shots(junk)
    with pytest.raises(AdaTPInputError):
        detect_shots(tmp_path / "missing.mp4")


def test_a_corrupt_region_is_skipped_and_cuts_after_it_are_found(tmp_path):
    plan = shot_plan(4, 2.0, transitions=("cut",), seed=1)
    truth = write_synthetic(tmp_path / "damaged.mp4", plan, width=96, height=64, gop=12, seed=1)
    later = truth.boundaries[-1]
    damage(truth.path, truth.boundaries[0].time + 0.6, 0.4)  # inside the second shot
    shots = detect_shots(truth.path)
    assert any(abs(s.start - later.time) <= 2 / truth.fps for s in shots), shots
    assert shots[-1].end == pytest.approx(truth.duration, abs=1e-3)


def test_a_flash_is_not_a_cut(tmp_path):
    plan = shot_plan(2, 3.0, transitions=("cut",), seed=4)
    truth = write_synthetic(tmp_path / "flash.mp4", plan, width=96, height=64, seed=4, flashes=(1.0, 4.5))
    shots = detect_shots(truth.path)
    assert len(shots) == 2 and abs(shots[1].start - truth.boundaries[0].time) <= 2 / truth.fps, shots


def test_the_bench_scores_cuts_within_two_frames_and_dissolves_within_half_a_second():
    import importlib.util

    from pack import ROOT

    from adatp_core.clips.synthetic import Boundary

    spec = importlib.util.spec_from_file_location("bench_shots", ROOT / "bench" / "shots.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    truth = [{"path": "v", "fps": 25.0, "boundaries": [Boundary(2.0, "cut"), Boundary(5.0, "dissolve", 1.0),
                                                       Boundary(9.0, "fade", 1.0)]}]
    got = bench.score(truth, {"v": [2.08, 5.45, 7.0]})  # cut 2 frames late: found; fade: missed; 7.0: extra
    assert got == {"recall_cut": 1.0, "recall_dissolve": 1.0, "recall_fade": 0.0, "precision": 2 / 3,
                   "detections": 3, "truths": 3}
    assert bench.score(truth, {"v": [2.09, 5.6]})["recall_cut"] == 0.0  # 2.25 frames: not found


def test_fast_motion_and_changing_light_are_not_shot_changes(tmp_path):
    truth = write_synthetic(tmp_path / "busy.mp4", [(12.0, "start", 0.0)], width=96, height=64, seed=6,
                            motion=12, light=0.4)
    assert len(detect_shots(truth.path)) == 1


@pytest.mark.parametrize("frame", [121, 123])
def test_a_cut_between_two_analysed_frames_is_placed_on_its_own_frame(tmp_path, frame):
    """A 60 fps source is analysed at 30 frames a second: a cut on an odd frame was found on the next
    analysed one, one frame late, so the shot before it ended with a frame of the next shot."""
    truth = write_synthetic(tmp_path / "fast.mp4", [(frame / 60, "start", 0.0), (2.0, "cut", 0.0)], fps=60,
                            width=160, height=90)
    shots = detect_shots(truth.path)
    assert [round(s.start * 60, 3) for s in shots] == [0.0, frame]
    assert abs(shots[0].end - truth.boundaries[0].time) < 1e-6
