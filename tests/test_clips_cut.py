"""Cutting clips (adatp_core/clips/cut.py): exact frames by timestamp, one decode for all clips,
atomic writes, stream copy, audio, damaged sources, awkward formats."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from adatp_core.clips import ClipPlan, ClipRules, Shot, cut_clips, plan_clips
from adatp_core.clips.synthetic import damage, shot_plan, write_synthetic
from adatp_core.errors import AdaTPInputError
from adatp_core.samples import write_video


def reopen(path):
    """(frames as uint8 arrays, fps, width, height, stream types, pixel format) of a written clip."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [f for f in c.decode(s)]
        return ([f.to_ndarray(format="rgb24") for f in frames], float(s.average_rate), s.width, s.height,
                sorted(x.type for x in c.streams), frames[0].format.name)


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """A 24 fps video whose frame i is a flat grey of level 2 * i: which source frame a clip
    frame is can be read off its level."""
    frames = np.repeat((np.arange(100, dtype=np.uint8) * 2)[:, None, None, None], 3, axis=3)
    frames = np.broadcast_to(frames, (100, 48, 64, 3))
    return write_video(tmp_path_factory.mktemp("cut") / "numbered.mp4", np.ascontiguousarray(frames), fps=24.0)


def plan(source, start, frames, fps=16.0, name=None, w=64, h=48, shot=0):
    return ClipPlan(Path(source), shot, 0, start, frames, fps, w, h, name or f"c{start:.3f}")


def levels(frames):
    return [int(round(f[..., 1].mean() / 2)) for f in frames]


def test_reencode_takes_the_frame_on_screen_at_each_target_time(numbered, tmp_path):
    plans = [plan(numbered, 0.5, 17), plan(numbered, 2.0, 9, fps=12.0)]
    results = cut_clips(numbered, plans, tmp_path)
    assert [r.error for r in results] == [None, None] and not any(r.skipped for r in results)
    for p, r in zip(plans, results):
        assert r.path == tmp_path / f"{p.name}.mp4"
        frames, fps, w, h, types, fmt = reopen(r.path)
        assert (len(frames), fps, w, h, types, fmt) == (p.frames, p.fps, 64, 48, ["video"], "yuv420p")
        want = [int(np.floor((p.start + k / p.fps) * 24 + 1e-6)) for k in range(p.frames)]
        assert np.abs(np.array(levels(frames)) - want).max() <= 1


def test_clips_overlapping_and_in_any_order_come_back_in_plan_order(numbered, tmp_path):
    plans = [plan(numbered, 2.0, 13, name="late"), plan(numbered, 0.0, 21, name="early"),
             plan(numbered, 0.5, 21, name="overlap")]
    done = []
    results = cut_clips(numbered, plans, tmp_path, on_clip=lambda r: done.append(r.plan.name))
    assert [r.plan.name for r in results] == ["late", "early", "overlap"]
    assert sorted(done) == ["early", "late", "overlap"]
    assert [len(reopen(r.path)[0]) for r in results] == [13, 21, 21]


def test_a_rerun_skips_finished_clips(numbered, tmp_path):
    p = plan(numbered, 1.0, 5)
    first, = cut_clips(numbered, [p], tmp_path)
    before = first.path.stat().st_mtime_ns
    again, = cut_clips(numbered, [p], tmp_path)
    assert again.skipped and again.path == first.path and first.path.stat().st_mtime_ns == before


def test_an_interrupted_cut_leaves_no_half_written_clip(numbered, tmp_path):
    plans = [plan(numbered, 0.0, 9, name="a"), plan(numbered, 0.2, 41, name="b")]

    def stop(result):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cut_clips(numbered, plans, tmp_path, on_clip=stop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]  # b was open: removed, no temp left
    assert len(reopen(tmp_path / "a.mp4")[0]) == 9


def test_a_clip_past_the_end_fails_alone_and_leaves_nothing(numbered, tmp_path):
    ok, late = plan(numbered, 0.0, 5, name="ok"), plan(numbered, 3.9, 17, name="late")
    results = cut_clips(numbered, [ok, late], tmp_path)
    assert results[0].error is None and results[1].path is None and "ends" in results[1].error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.mp4"]


def test_stale_temp_files_of_a_killed_run_are_removed(numbered, tmp_path):
    p = plan(numbered, 0.0, 5, name="x")
    stale = tmp_path / ".x.part-999999999.mp4"
    stale.write_bytes(b"half")
    cut_clips(numbered, [p], tmp_path)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["x.mp4"]


def test_bad_mode_crf_and_source_are_refused(numbered, tmp_path):
    p = plan(numbered, 0.0, 5)
    with pytest.raises(AdaTPInputError, match="mode"):
        cut_clips(numbered, [p], tmp_path, mode="fast")
    with pytest.raises(AdaTPInputError, match="crf"):
        cut_clips(numbered, [p], tmp_path, crf=80)
    text = tmp_path / "t.mp4"
    text.write_text("hello\n")
    with pytest.raises(AdaTPInputError, match="t.mp4"):
        cut_clips(text, [plan(text, 0.0, 5)], tmp_path / "out")


def test_long_shots_cut_end_to_end(tmp_path):
    src = write_synthetic(tmp_path / "long.mp4", shot_plan(3, 2.0, transitions=("cut", "dissolve")),
                          width=96, height=64)
    from adatp_core.clips import detect_shots

    plans = plan_clips(src.path, detect_shots(src.path), ClipRules(min_seconds=0.5, max_seconds=1.0, frames="4k+1"))
    results = cut_clips(src.path, plans, tmp_path / "out")
    assert len(plans) >= 4 and all(r.error is None for r in results)
    for r in results:
        frames, fps, *_ = reopen(r.path)
        assert len(frames) == r.plan.frames and (len(frames) - 1) % 4 == 0 and fps == 16.0


def test_variable_frame_rate_is_cut_by_timestamps(tmp_path):
    src = write_synthetic(tmp_path / "vfr.mp4", [(3.0, "start", 0.0)], width=64, height=48, pts_jitter=True).path
    r, = cut_clips(src, [plan(src, 0.5, 33)], tmp_path / "out")
    frames, fps, *_ = reopen(r.path)
    assert len(frames) == 33 and fps == 16.0


def test_rotation_metadata_is_applied(tmp_path):
    src = write_synthetic(tmp_path / "rot.mp4", [(1.0, "start", 0.0)], width=64, height=48, rotation=90).path
    p = plan_clips(src, [Shot(0, 0.0, 1.0, "start")], ClipRules(min_seconds=0.0, max_seconds=0.1, fps=10.0))[0]
    assert (p.width, p.height) == (48, 64)
    r, = cut_clips(src, [p], tmp_path / "out")
    frames, _, w, h, *_ = reopen(r.path)
    import av

    with av.open(str(src)) as c:
        first = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert (w, h) == (48, 64)
    assert np.abs(frames[0].astype(int) - np.rot90(first).astype(int)).mean() < 12  # turned as a player shows it


def test_ten_bit_and_odd_sized_sources_become_even_8_bit_yuv420p(tmp_path):
    ten = write_synthetic(tmp_path / "ten.mp4", [(1.0, "start", 0.0)], width=64, height=48,
                          pix_fmt="yuv420p10le").path
    odd = write_synthetic(tmp_path / "odd.mkv", [(1.0, "start", 0.0)], width=65, height=47, pix_fmt="yuv444p").path
    for src in (ten, odd):
        p = plan_clips(src, [Shot(0, 0.0, 1.0, "start")], ClipRules(min_seconds=0.5, max_seconds=0.5, frames="any"))[0]
        r, = cut_clips(src, [p], tmp_path / "out")
        _, _, w, h, _, fmt = reopen(r.path)
        assert fmt == "yuv420p" and w % 2 == 0 and h % 2 == 0 and (w, h) == (p.width, p.height)


def test_audio_is_dropped_by_default_and_kept_on_request(tmp_path):
    src = write_synthetic(tmp_path / "a.mp4", [(2.0, "start", 0.0)], width=64, height=48, audio=True).path
    dropped, = cut_clips(src, [plan(src, 0.5, 9, name="d")], tmp_path / "out")
    kept, = cut_clips(src, [plan(src, 0.5, 9, name="k")], tmp_path / "out", keep_audio=True)
    assert reopen(dropped.path)[4] == ["video"] and reopen(kept.path)[4] == ["audio", "video"]


def test_stream_copy_cuts_at_keyframes(tmp_path):
    src = write_synthetic(tmp_path / "gop.mp4", [(3.0, "start", 0.0)], width=64, height=48, gop=12).path
    results = cut_clips(src, [plan(src, 0.4, 17, name="a"), plan(src, 1.1, 2, fps=16.0, name="b")],
                        tmp_path / "out", mode="copy")
    a, b = results
    frames, fps, *_ = reopen(a.path)
    assert fps == 24.0 and 0 < len(frames) <= 17 / 16 * 24  # from the keyframe at 0.5 s to before 1.4625 s
    assert b.path is None and "keyframe" in b.error  # [1.1, 1.225) holds no keyframe (every 0.5 s)
    assert (tmp_path / "out" / "a.mp4").is_file() and not (tmp_path / "out" / "b.mp4").exists()


def test_a_corrupt_region_fails_only_the_clips_it_touches(tmp_path):
    src = write_synthetic(tmp_path / "bad.mp4", [(4.0, "start", 0.0)], width=64, height=48, gop=12).path
    damage(src, 2.0, 0.4)
    plans = [plan(src, 0.5, 9, name="before"), plan(src, 1.8, 9, name="across"), plan(src, 3.0, 9, name="after")]
    results = cut_clips(src, plans, tmp_path / "out")
    assert [r.error is None for r in results] == [True, False, True]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["after.mp4", "before.mp4"]


def test_the_source_is_decoded_once_for_all_its_clips(numbered, tmp_path, monkeypatch):
    import adatp_core.clips.cut as cut

    passes = []
    real = cut.source_events
    monkeypatch.setattr(cut, "source_events", lambda *a, **k: passes.append(a[-1]) or real(*a, **k))
    plans = [plan(numbered, s, 9, name=f"p{s}") for s in (0.0, 0.7, 1.4, 2.1, 2.8)]
    assert all(r.error is None for r in cut_clips(numbered, plans, tmp_path))
    assert passes == [0.0]


def test_a_long_stretch_without_clips_is_skipped_by_a_seek(numbered, tmp_path, monkeypatch):
    import adatp_core.clips.cut as cut

    passes = []
    real = cut.source_events
    monkeypatch.setattr(cut, "source_events", lambda *a, **k: passes.append(a[-1]) or real(*a, **k))
    monkeypatch.setattr(cut, "SEEK_GAP", 1.0)
    plans = [plan(numbered, 0.2, 5, name="a"), plan(numbered, 3.0, 9, name="b")]
    results = cut_clips(numbered, plans, tmp_path)
    assert passes == [0.0, 3.0]
    for p, r in zip(plans, results):
        want = [int(np.floor((p.start + k / p.fps) * 24 + 1e-6)) for k in range(p.frames)]
        assert np.abs(np.array(levels(reopen(r.path)[0])) - want).max() <= 1


def test_audio_that_mp4_cannot_hold_is_a_clear_error(tmp_path):
    import av

    src = tmp_path / "pcm.mkv"
    frames = np.zeros((24, 48, 64, 3), np.uint8)
    with av.open(str(src), "w") as c:
        v = c.add_stream("libx264", rate=24)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = c.add_stream("pcm_s16le", rate=8000)
        for i, img in enumerate(frames):
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
            chunk = av.AudioFrame.from_ndarray(np.zeros((1, 333), np.int16), format="s16", layout="mono")
            chunk.sample_rate, chunk.pts = 8000, i * 333
            for p in a.encode(chunk):
                c.mux(p)
        for s in (v, a):
            for p in s.encode():
                c.mux(p)
    with pytest.raises(AdaTPInputError, match="pcm_s16le"):
        cut_clips(src, [plan(src, 0.0, 5)], tmp_path / "out", keep_audio=True)
    r, = cut_clips(src, [plan(src, 0.0, 5)], tmp_path / "out")  # without the audio: cut
    assert r.error is None and reopen(r.path)[4] == ["video"]


def test_a_clip_that_cannot_be_written_fails_alone(numbered, tmp_path, monkeypatch):
    import adatp_core.clips.cut as cut

    real = cut.ClipWriter.add_frame

    def full(self, frame):
        if self.plan.name == "b" and self.k == 3:
            raise OSError(28, "No space left on device")
        return real(self, frame)

    monkeypatch.setattr(cut.ClipWriter, "add_frame", full)
    results = cut_clips(numbered, [plan(numbered, 0.0, 9, name="a"), plan(numbered, 0.1, 9, name="b"),
                                   plan(numbered, 1.0, 9, name="c")], tmp_path)
    assert [r.error is None for r in results] == [True, False, True] and "No space" in results[1].error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "c.mp4"]


def test_a_clip_that_starts_on_the_last_frame_is_cut(numbered, tmp_path):
    """Hostile review 4: --keep-short on a one-frame shot at the very end failed ("the source ends at
    4.12 s, before this clip at 4.12 s"): a clip starting at the last frame's time was never opened."""
    last = 99 / 24
    one, two, past = plan(numbered, last, 1, 24.0, "one"), plan(numbered, last, 2, 48.0, "two"), \
        plan(numbered, last + 1 / 24, 1, 24.0, "past")
    tail = plan(numbered, 96 / 24, 4, 24.0, "tail")  # frames 96-99, as cut before
    results = cut_clips(numbered, [one, two, past, tail], tmp_path)
    assert [r.error for r in results] == [None, None, results[2].error, None] and "ends" in results[2].error
    end = levels(reopen(tmp_path / "tail.mp4")[0])[-1]  # the last frame's level, as the encoder leaves it
    assert levels(reopen(tmp_path / "one.mp4")[0]) == [end] and levels(reopen(tmp_path / "two.mp4")[0]) == [end] * 2


def test_stale_temps_go_whichever_clip_they_were_for(numbered, tmp_path):
    """Hostile review 6: only the temp files of clips still planned were removed; a killed run's
    .part file stayed for good once the plan changed."""
    from adatp_core.clips.cut import remove_stale_temps

    from adatp_core.clips.cut import hold_temp

    dead, live = tmp_path / ".gone_s0001.part-999999999.mp4", tmp_path / f".busy.part-{os.getpid()}.mp4"
    other = tmp_path / ".notes.mp4"  # not our temp name
    lock = hold_temp(live)  # a live writer's (None on Windows: its PID runs)
    for path in (dead, live, other):
        path.write_bytes(b"half")
    try:
        remove_stale_temps(tmp_path)
    finally:
        if lock is not None:
            os.close(lock)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


@pytest.mark.skipif(os.name != "posix", reason="temp files are locked on POSIX only (Windows: the PID is asked)")
def test_a_dead_writers_temp_file_goes_though_its_pid_was_reused_and_a_live_ones_stays(numbered, tmp_path):
    """Hostile review: a temp file was judged by the PID in its name alone, so one whose dead writer's
    PID was reused (here: this process's PID) stayed for good; the writer's lock decides now."""
    import subprocess
    import sys

    from adatp_core.clips.cut import ClipWriter, encoder_name, remove_stale_temps

    reused = tmp_path / f".gone.part-{os.getpid()}.mp4"  # a dead run's, under a PID that runs again
    reused.write_bytes(b"half")
    writer = ClipWriter(plan(numbered, 0.0, 5, name="busy"), tmp_path, encoder=encoder_name())
    try:
        import av
        import numpy as np

        for _ in range(2):  # FFmpeg opens the file at its first packet: the locked one, truncated
            writer.add_frame(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24"))
        assert os.path.samestat(os.fstat(writer.lock), os.stat(writer.tmp))
        # another process (a second run) sweeps the folder while this one writes
        code = "import sys; from adatp_core.clips.cut import remove_stale_temps as r; r(sys.argv[1])"
        subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=os.getcwd())
        assert sorted(p.name for p in tmp_path.iterdir()) == [writer.tmp.name]
        assert writer.tmp.name.endswith(f".part-{os.getpid()}.mp4")
    finally:
        writer.abort()
    dead = tmp_path / ".x.part-1.mp4"  # PID 1 always runs: the name alone kept it
    dead.write_bytes(b"half")
    remove_stale_temps(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="temp files are locked on POSIX only")
def test_a_temp_file_that_cannot_be_opened_is_left_alone(tmp_path, monkeypatch):
    """Another user's run's temp file (not ours to open) is skipped, not a crash of the whole job."""
    from adatp_core.clips import cut

    other = tmp_path / ".theirs.part-1.mp4"
    other.write_bytes(b"half")

    def refused(path, create=True):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cut, "hold_file", refused)
    cut.remove_stale_temps(tmp_path)
    assert other.exists()


@pytest.mark.parametrize("alive", [True, False, None])
def test_on_windows_a_temp_files_writer_is_asked_for_by_its_process_not_signal_0(tmp_path, monkeypatch, alive):
    """Hostile review: os.kill(pid, 0) is no liveness check on Windows (signal 0 is CTRL_C_EVENT there, sent
    to the process); OpenProcess decides, and a file whose writer cannot be told is left alone."""
    from adatp_core.clips import cut

    monkeypatch.setattr(cut, "LOCKS", False)
    monkeypatch.setattr(cut, "WINDOWS", True)

    def no_signals(*_a):
        raise AssertionError("os.kill on Windows")

    monkeypatch.setattr(os, "kill", no_signals)
    asked = []
    monkeypatch.setattr(cut, "windows_pid_alive", lambda pid: asked.append(pid) or alive)
    temp = tmp_path / ".x_s0000.part-4242.mp4"
    temp.write_bytes(b"half")
    cut.remove_stale_temps(tmp_path)
    assert asked == [4242] and temp.exists() == (alive is not False)
    if os.name != "nt":  # kernel32 is not at hand here: cannot be told
        monkeypatch.undo()
        assert cut.windows_pid_alive(os.getpid()) is None
