"""Captioning real folders (issue 19): each awkward entry fails alone, names of any
bytes, output checked before the model loads, no orphan workers, two runs at once,
and a folder with all of it together. The numbers refer to the issue's reproductions."""

from __future__ import annotations

import base64
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pack import ROOT
from test_caption import CFG, SETTINGS, txt_files

from adatp_core import caption as cap
from adatp_core import caption_cli
from adatp_core.cli import main as cli_main
from adatp_core.samples import scene_frames, write_video

BAD_NAME = os.fsdecode(b"x\xff.mp4")  # not UTF-8: held with a lone surrogate


@pytest.fixture(scope="session")
def clip_bytes(tmp_path_factory) -> bytes:
    """A 6-frame clip of two scenes."""
    path = tmp_path_factory.mktemp("clip") / "c.mp4"
    return write_video(path, scene_frames(6, 64, 48, scenes=2), fps=4.0).read_bytes()


def make(root: Path, clip: bytes, *names: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(clip)
    return root


def job(root, **kw) -> cap.CaptionJob:
    return cap.CaptionJob(folder=root, pipeline=CFG, workers=kw.pop("workers", 0), **kw)


def records(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def no_model(monkeypatch):
    """The CLI must stop before loading the model: loading fails the test."""
    def refuse(*_a, **_k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(caption_cli, "load_model", refuse)


@pytest.fixture
def cli(tiny_dir, monkeypatch, capsys):
    monkeypatch.setenv("ADATP_CACHE_DIR", str(tiny_dir.parent))

    def run(*argv):
        code = cli_main(["caption", *map(str, argv)])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def read_only(monkeypatch, folder: Path) -> None:
    """Make ``folder`` unwritable. chmod does not bind root, so creating anything under
    it also fails with EACCES through os.open and os.mkdir (what every write uses)."""
    folder.chmod(0o555)
    inside = str(folder.resolve()) + os.sep
    real_open, real_mkdir = os.open, os.mkdir

    def deny(path):
        p = os.path.realpath(os.path.join(os.getcwd(), os.fsdecode(path)))
        if (p + os.sep).startswith(inside) and p != inside.rstrip(os.sep):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))

    def guarded_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            deny(path)
        return real_open(path, flags, *a, **k)

    def guarded_mkdir(path, *a, **k):
        deny(path)
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


# 1. an existing caption that is not UTF-8, or a folder named like a caption

@pytest.mark.parametrize("overwrite", [False, True])
def test_an_unreadable_caption_or_a_caption_folder_fails_that_entry_alone(tiny, tmp_path, clip_bytes, overwrite):
    root = make(tmp_path / "d", clip_bytes, "a.mp4", "b.mp4", "c.mp4", "d.mp4")
    (root / "b.txt").write_bytes(b"caf\xe9")
    (root / "c.txt").mkdir()
    manifest = tmp_path / "m.jsonl"
    summary = cap.caption_folder(tiny, job(root, overwrite=overwrite), manifest=manifest)
    failed = dict(summary.failed)
    assert list(failed) == ["c.mp4"] and "is a folder" in failed["c.mp4"] and (root / "c.txt").is_dir()
    by_path = {r["path"]: r for r in records(manifest)}
    assert "is a folder" in by_path["c.mp4"]["error"]
    if overwrite:
        assert summary.done == ["a.mp4", "b.mp4", "d.mp4"]
        assert (root / "b.txt").read_text(encoding="utf-8") == (root / "a.txt").read_text()
    else:
        assert summary.done == ["a.mp4", "d.mp4"] and summary.skipped == ["b.mp4"]
        assert (root / "b.txt").read_bytes() == b"caf\xe9"  # kept, never rewritten
        assert "not valid UTF-8" in by_path["b.mp4"]["skipped"] and "not read" in summary.text()
    assert summary.exit_code() == 0


# 2. a clip name near the 255-byte limit

def test_long_clip_names_get_temporary_names_that_fit(tiny, tmp_path, clip_bytes, monkeypatch):
    long = "x" * 251 + ".mp4"  # 255 bytes: the longest name there is
    root = make(tmp_path / "d", clip_bytes, "a.mp4", long, "z.mp4")
    summary = cap.caption_folder(tiny, job(root))
    assert summary.done == ["a.mp4", long, "z.mp4"] and (root / ("x" * 251 + ".txt")).is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary left behind
    # A file system with shorter names (an --out elsewhere): that clip fails, with the reason.
    monkeypatch.setattr(cap, "name_limit", lambda folder: 100)
    out = tmp_path / "out"
    summary = cap.caption_folder(tiny, job(root, out=out))
    assert summary.done == ["a.mp4", "z.mp4"]
    assert "255 bytes, longer than the 100" in dict(summary.failed)[long]


# 3. output that cannot be written: checked before the model loads

def test_unwritable_output_is_refused_before_the_model_loads(cli, no_model, tmp_path, clip_bytes, monkeypatch):
    root = make(tmp_path / "d", clip_bytes, "a.mp4")
    (tmp_path / "file").write_text("")
    code, _, err = cli(root, "--out", tmp_path / "file" / "caps", *SETTINGS)
    assert code == 2 and "--out" in err and "is a file" in err
    (tmp_path / "mfolder").mkdir()
    code, _, err = cli(root, "--manifest", tmp_path / "mfolder", *SETTINGS)
    assert code == 2 and "--manifest" in err and "is a folder" in err
    (tmp_path / "ro").mkdir()
    read_only(monkeypatch, tmp_path / "ro")
    code, _, err = cli(root, "--manifest", tmp_path / "ro" / "m.jsonl", *SETTINGS)
    assert code == 2 and "--manifest" in err and "cannot be written" in err
    code, _, err = cli(root, "--out", tmp_path / "ro" / "caps", *SETTINGS)
    assert code == 2 and "cannot write captions in" in err and str(tmp_path / "ro") in err
    read_only(monkeypatch, root)
    code, _, err = cli(root, *SETTINGS)
    assert code == 2 and f"cannot write captions in {root}" in err and "writable" in err


def test_a_folder_unwritable_mid_run_fails_its_clips_not_the_run(tiny, tmp_path, clip_bytes, monkeypatch):
    root = make(tmp_path / "d", clip_bytes, "a.mp4", "sub/b.mp4", "sub/c.mp4", "z.mp4")
    plan = cap.plan_folder(job(root, recursive=True))
    read_only(monkeypatch, root / "sub")  # after the check, before the model gets there
    summary = cap.caption_folder(tiny, job(root, recursive=True), plan=plan)
    assert summary.done == ["a.mp4", "z.mp4"] and [f[0] for f in summary.failed] == ["sub/b.mp4", "sub/c.mp4"]
    assert all("Permission denied" in why for _, why in summary.failed) and summary.exit_code() == 0
    # A read-only subfolder found up front fails its clips without any model work.
    plan = cap.plan_folder(job(root, recursive=True, overwrite=True))
    assert [c.name for c in plan.todo] == ["a.mp4", "z.mp4"]
    assert [f[0] for f in plan.summary.failed] == ["sub/b.mp4", "sub/c.mp4"]
    with pytest.raises(cap.OptionError, match="cannot write captions in .*sub"):  # nothing left to write
        cap.plan_folder(job(root, recursive=True))


# 4. bytes that are not UTF-8

def test_names_of_any_bytes_reach_the_manifest_losslessly(tiny, tmp_path, clip_bytes):
    root = make(tmp_path / "d", clip_bytes, BAD_NAME, "z.mp4")
    (root / os.fsdecode(b"y\xfe.mp4")).write_bytes(b"not a video")
    manifest = tmp_path / "m.jsonl"
    summary = cap.caption_folder(tiny, job(root), manifest=manifest)
    assert summary.done == [BAD_NAME, "z.mp4"] and (root / os.fsdecode(b"x\xff.txt")).is_file()
    lines = manifest.read_bytes().decode("utf-8").splitlines()  # valid UTF-8, one JSON object a line
    by_path = {r["path"]: r for r in map(json.loads, lines)}
    assert sorted(by_path) == ["x\\xff.mp4", "y\\xfe.mp4", "z.mp4"]
    assert base64.b64decode(by_path["x\\xff.mp4"]["path_b64"]) == b"x\xff.mp4"
    assert base64.b64decode(by_path["y\\xfe.mp4"]["path_b64"]) == b"y\xfe.mp4" and "error" in by_path["y\\xfe.mp4"]
    assert "path_b64" not in by_path["z.mp4"]
    summary.text().encode("utf-8")  # printable under any UTF-8 stdout
    assert "y\\xfe.mp4" in summary.text()


def test_prefix_and_suffix_that_are_not_utf8_are_refused_up_front(cli, no_model, tmp_path, clip_bytes):
    root = make(tmp_path / "d", clip_bytes, "a.mp4")
    for option in ("--prefix", "--suffix"):
        code, _, err = cli(root, option, os.fsdecode(b"caf\xe9"), *SETTINGS)
        assert code == 2 and f"error: {option}: " in err and "not valid UTF-8" in err
    assert not list(root.glob("*.txt"))


# 5. killing the main process leaves no decode worker behind

def _descendants(pid: int) -> set[int]:
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killing_the_main_process_leaves_no_worker_behind(tiny_dir, tmp_path, clip_bytes, sig):
    root = make(tmp_path / "d", clip_bytes, *[f"c{k}.mp4" for k in range(30)])
    env = {**os.environ, "ADATP_CACHE_DIR": str(tiny_dir.parent)}
    cmd = [sys.executable, "-m", "adatp_core", "caption", str(root), "--frames", "2", "--max-new-tokens", "3",
           "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        workers = set()
        while proc.poll() is None and time.monotonic() < deadline:
            workers = _descendants(proc.pid)
            if len(workers) >= 3 and list(root.glob("*.txt")):  # 2 decode workers + the resource tracker
                break
            time.sleep(0.05)
        assert proc.poll() is None and len(workers) >= 3, "the decode workers never started"
        proc.send_signal(sig)  # the main process only, as a wrapper's terminate() or the OOM killer does
        proc.communicate(timeout=30)  # returns only once nobody holds its stdout and stderr
        deadline = time.monotonic() + 15
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in workers if _alive(p)], "decode workers outlived the main process"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# 6. two runs at once on one folder

def test_a_clip_another_run_holds_or_captioned_meanwhile_is_left_alone(tiny, tmp_path, clip_bytes):
    root = make(tmp_path / "d", clip_bytes, "a.mp4", "b.mp4", "c.mp4")
    plan = cap.plan_folder(job(root))
    held = cap.ClipClaim(root / "a.txt")
    assert held.acquire()  # another run is captioning a.mp4 now
    (root / "b.txt").write_text("by the other run")  # and has just written b.txt
    summary = cap.caption_folder(tiny, job(root), plan=plan, manifest=tmp_path / "m.jsonl")
    held.release()
    assert summary.done == ["c.mp4"] and summary.others == ["a.mp4", "b.mp4"] and summary.exit_code() == 0
    assert not (root / "a.txt").exists() and (root / "b.txt").read_text() == "by the other run"
    assert [r["path"] for r in records(tmp_path / "m.jsonl")] == ["c.mp4"]
    assert not list(root.glob(".adatp-claim-*"))  # claims go with their run


def test_with_overwrite_a_caption_another_run_wrote_meanwhile_is_kept(tiny, tmp_path, clip_bytes):
    """Two --overwrite runs at once: the one that comes second to a clip finds a caption newer than
    its own start, written by the other run of the same job, and leaves it (a clip captioned once)."""
    root = make(tmp_path / "d", clip_bytes, "a.mp4", "b.mp4")
    (root / "a.txt").write_text("from last week")
    os.utime(root / "a.txt", (1e9, 1e9))

    def other_run(_n):  # after this run began, before it reaches b.mp4
        (root / "b.txt").write_text("by the other run")

    summary = cap.caption_folder(tiny, job(root, overwrite=True), on_plan=other_run)
    assert summary.done == ["a.mp4"] and summary.others == ["b.mp4"]
    assert (root / "a.txt").read_text() != "from last week"  # overwritten: older than the run
    assert (root / "b.txt").read_text() == "by the other run"


def test_a_manifest_named_like_a_video_or_that_cannot_be_written(tiny, tmp_path, clip_bytes):
    root = make(tmp_path / "d", clip_bytes, "a.mp4")
    with pytest.raises(ValueError, match="named like a video"):
        cap.check_manifest(root / "a.mp4")
    assert (root / "a.mp4").read_bytes() == clip_bytes
    summary = cap.caption_folder(tiny, job(root), manifest=Path("/dev/full"))
    assert summary.write_error and "manifest" in summary.write_error and summary.exit_code() == 2
    assert "Writing failed, run stopped" in summary.text()


def test_two_runs_at_once_caption_each_clip_once(tiny_dir, tmp_path, clip_bytes):
    names = [f"c{k:02d}.mp4" for k in range(10)]
    root = make(tmp_path / "d", clip_bytes, *names)
    manifest = tmp_path / "m.jsonl"
    env = {**os.environ, "ADATP_CACHE_DIR": str(tiny_dir.parent), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "adatp_core", "caption", str(root), "--manifest", str(manifest), *SETTINGS]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    lines = records(manifest)
    assert sorted(r["path"] for r in lines) == names  # one line per clip: nobody captioned one twice
    done = [int(o.split("Captioned ", 1)[1].split(" ", 1)[0]) for o in outs]
    assert sum(done) == len(names), outs
    assert sorted(txt_files(root)) == [n.replace(".mp4", ".txt") for n in names]


# 7. a manifest whose last line has no newline

def test_the_manifest_gets_a_newline_before_the_first_new_record(tiny, tmp_path, clip_bytes):
    root = make(tmp_path / "d", clip_bytes, "a.mp4", "b.mp4")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "old.mp4", "caption": "cut off"}')
    cap.caption_folder(tiny, job(root), manifest=manifest)
    assert [r["path"] for r in records(manifest)] == ["old.mp4", "a.mp4", "b.mp4"]
    with pytest.raises(cap.OptionError, match="is a folder"):
        cap.caption_folder(tiny, job(root), manifest=tmp_path)


# 8. --out that contains the input folder

def test_out_containing_the_input_is_refused(cli, no_model, tmp_path, clip_bytes):
    root = make(tmp_path / "d", clip_bytes, "a.mp4")
    for out in (root, tmp_path, root / "."):
        code, _, err = cli(root, "--out", out, *SETTINGS)
        assert code == 2 and "contains the clip folder" in err, out


# 9. bad options: exit 2, named, before the model loads

@pytest.mark.parametrize("option,value", [("--workers", "-1"), ("--workers", "99"), ("--max-pixels", "-5"),
                                          ("--frames", "100000"), ("--frames", "0"), ("--layer", "-1"),
                                          ("--retention", "1.5"), ("--prompt", " ")])
def test_every_option_is_checked_before_the_model_loads(cli, no_model, tmp_path, clip_bytes, option, value):
    root = make(tmp_path / "d", clip_bytes, "a.mp4")
    code, out, err = cli(root, *SETTINGS, option, value)
    assert code == 2 and f"error: {option}: " in err and "model failed" not in out + err
    assert not list(root.glob("*.txt"))


def test_a_layer_beyond_the_model_is_named(cli, tmp_path, clip_bytes):
    root = make(tmp_path / "d", clip_bytes, "a.mp4")
    code, _, err = cli(root, *SETTINGS, "--layer", "99")
    assert code == 2 and "error: --layer: " in err


# 10. smaller things

def test_symlinked_subfolders_are_followed_once_and_loops_reported(tiny, tmp_path, clip_bytes):
    outside = make(tmp_path / "elsewhere", clip_bytes, "e.mp4")
    root = make(tmp_path / "d", clip_bytes, "a.mp4", "sub/b.mp4")
    (root / "linked").symlink_to(outside)
    (root / "sub" / "loop").symlink_to(root)  # back to the top: a loop
    (root / "broken.mp4").symlink_to(tmp_path / "gone.mp4")
    listing = cap.scan_folder(root, recursive=True)
    assert [p.relative_to(root).as_posix() for p in listing.clips] == ["a.mp4", "linked/e.mp4", "sub/b.mp4"]
    assert [f[0] for f in listing.folders] == ["sub/loop"] and "loop" in listing.folders[0][1]
    assert [p[0] for p in listing.problems] == ["broken.mp4"] and "broken symbolic link" in listing.problems[0][1]
    summary = cap.caption_folder(tiny, job(root, recursive=True))
    assert summary.done == ["a.mp4", "linked/e.mp4", "sub/b.mp4"] and (outside / "e.txt").is_file()
    text = summary.text()
    assert "broken symbolic link" in text and "folder skipped (1)" in text and "sub/loop" in text


def test_the_summary_groups_failures_by_reason():
    summary = cap.CaptionSummary(found=2003, manifest="/m.jsonl")
    summary.failed = [(f"c{k}.mp4", f"video c{k}.mp4 is empty (0 bytes); copy the file again.") for k in range(2000)]
    summary.failed += [(f"d{k}.mp4", f"PyAV cannot open d{k}.mp4: Invalid data (code {k})") for k in range(3)]
    text = summary.text()
    assert len(text.splitlines()) < 10
    assert "failed (2000): video <clip> is empty (0 bytes)" in text
    assert "c0.mp4, c1.mp4, c2.mp4 and 1997 more" in text
    assert "failed (3): PyAV cannot open <clip>" in text
    assert "every failed clip is listed in the manifest /m.jsonl" in text


def test_a_name_collision_is_in_the_manifest(tiny, tmp_path, clip_bytes):
    root = make(tmp_path / "d", clip_bytes, "a.mkv", "a.mp4")
    manifest = tmp_path / "m.jsonl"
    summary = cap.caption_folder(tiny, job(root), manifest=manifest)
    assert summary.done == ["a.mkv"] and [r["path"] for r in records(manifest)] == ["a.mp4", "a.mkv"]
    assert "already writes a.txt" in records(manifest)[0]["error"]


def test_ctrl_c_while_the_model_loads_is_reported_plainly(cli, tmp_path, clip_bytes, monkeypatch):
    root = make(tmp_path / "d", clip_bytes, "a.mp4")

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(caption_cli, "load_model", interrupted)
    code, _, err = cli(root, *SETTINGS)
    assert code == 130 and "interrupted while loading the model" in err and "Traceback" not in err


# all of it at once

@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_a_folder_with_everything_at_once(tiny_dir, tmp_path, clip_bytes):
    long = "l" * 251 + ".mp4"
    good = ["a.mp4", BAD_NAME, long, "linked/e.mp4", "sub/b.mp4", "sub/z.mkv"]
    outside = make(tmp_path / "elsewhere", clip_bytes, "e.mp4")
    root = make(tmp_path / "d", clip_bytes, *[g for g in good if not g.startswith("linked/")], "c.mp4", "k.mp4",
                "k.mkv", "u.mp4")
    (root / "c.txt").mkdir()  # a folder where c's caption would go
    (root / "u.txt").write_bytes(b"caf\xe9")  # an existing caption that is not UTF-8
    (root / "bad.mp4").write_bytes(b"not a video")
    (root / os.fsdecode(b"y\xfe.mp4")).write_bytes(clip_bytes[:500])
    (root / "linked").symlink_to(outside)
    (root / "sub" / "loop").symlink_to(root)
    (root / "broken.mp4").symlink_to(tmp_path / "gone.mp4")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "earlier.mp4", "caption": "an earlier run"}')
    env = {**os.environ, "ADATP_CACHE_DIR": str(tiny_dir.parent), "PYTHONIOENCODING": "utf-8",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "adatp_core", "caption", str(root), "--recursive", "--manifest", str(manifest),
           *SETTINGS]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True) for _ in range(2)]  # a double click
    outs, left = [None, None], set()

    def talk(k):
        outs[k] = procs[k].communicate(timeout=300)

    threads = [threading.Thread(target=talk, args=(k,)) for k in range(2)]
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):  # every process the runs start, while they run
            left |= set().union(*(_descendants(p.pid) for p in procs))
            time.sleep(0.1)
        deadline = time.monotonic() + 15
        while any(map(_alive, left)) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert not [p for p in left if _alive(p)], "a process was left behind"
    lines = records(manifest)  # every line valid JSON, the old last line repaired
    assert lines[0]["path"] == "earlier.mp4"
    captioned = [os.fsdecode(base64.b64decode(r["path_b64"])) if "path_b64" in r else r["path"]
                 for r in lines[1:] if "caption" in r]
    assert sorted(captioned) == sorted(good + ["k.mkv"])  # each good clip exactly once
    for rel in good:
        assert (root / rel).with_suffix(".txt").is_file(), rel
    assert (root / "u.txt").read_bytes() == b"caf\xe9" and (root / "c.txt").is_dir()
    errors = {r["path"] for r in lines[1:] if "error" in r}
    assert errors == {"bad.mp4", "broken.mp4", "c.mp4", "k.mp4", "y\\xfe.mp4"}
    text = outs[0][0].decode("utf-8") + outs[1][0].decode("utf-8")
    assert "folder skipped (1)" in text and "sub/loop" in text
    assert not [p for p in root.rglob("*") if p.name.startswith(".")]  # no temporary file or claim left


def test_a_model_that_fails_to_load_is_reported_not_a_traceback(cli, tmp_path, clip_bytes, monkeypatch):
    root = make(tmp_path / "d", clip_bytes, "a.mp4")

    def broken(*_a, **_k):
        raise RuntimeError("unable to mmap 1024 bytes: Cannot allocate memory (12)")

    monkeypatch.setattr(caption_cli, "load_model", broken)
    code, _, err = cli(root, *SETTINGS)
    assert code == 2 and "the model could not be loaded: RuntimeError: unable to mmap" in err


def test_writes_and_reads_never_go_through_a_planted_link(tiny, tmp_path, clip_bytes, monkeypatch):
    """Issue 22, item 4: predictable temporary names and links at the caption's place."""
    root = make(tmp_path / "d", clip_bytes, "a.mp4", "b.mp4", "c.mp4")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    secret = tmp_path / "secret.txt"
    secret.write_text("a secret")
    monkeypatch.setattr(os, "getpid", lambda: 4242)
    for name in ("a", "b", "c"):  # the old temporary names, and the claim's
        (root / f".{name}.txt.4242.tmp").symlink_to(victim)
        cap.ClipClaim(root / f"{name}.txt").path.symlink_to(victim)
    (root / "b.txt").symlink_to(secret)  # an existing caption that points out of the folder
    summary = cap.caption_folder(tiny, job(root))
    assert victim.read_text() == "precious" and secret.read_text() == "a secret"
    assert summary.skipped == ["b.mp4"] and "a secret" not in summary.captions.values()
    assert "a symbolic link out of the folder" in dict(summary.unread)["b.mp4"]
    assert [f[0] for f in summary.failed] == ["a.mp4", "c.mp4"]  # a planted claim fails its clip only
    for name in ("a", "b", "c"):
        cap.ClipClaim(root / f"{name}.txt").path.unlink()
    summary = cap.caption_folder(tiny, job(root, overwrite=True))
    assert summary.done == ["a.mp4", "b.mp4", "c.mp4"] and victim.read_text() == "precious"
    assert not (root / "b.txt").is_symlink() and secret.read_text() == "a secret"  # the link was replaced
