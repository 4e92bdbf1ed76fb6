"""caption/files.py: the file-system side of captioning, on its own and without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adatp_core.caption.files import (ClipClaim, Manifest, caption_path, existing_caption, name_record, shown,
                                      write_atomic)

ROOT = Path(__file__).resolve().parents[1]


def test_files_and_summary_import_without_torch(tmp_path):
    """A planner or a clip job's writer needs no torch: with torch blocked, the file-system side
    (and the summary) import and work."""
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
from pathlib import Path
from adatp_core.caption.files import ClipClaim, Manifest, write_atomic
from adatp_core.caption.summary import CaptionSummary, manifest_record
target = Path({str(tmp_path)!r}) / "clip.txt"
claim = ClipClaim(target)
assert claim.acquire()
write_atomic(target, "a caption")
claim.release()
sink = Manifest(target.with_suffix(".jsonl"))
sink.write_lines(["{{}}"])
sink.close()
print(CaptionSummary(found=1, done=["clip.mp4"]).text().splitlines()[0])
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["Captioned 1 clip(s), skipped 0 already captioned, failed 0, of 1 found.",
                                       "['torch']"]  # only the blocked entry itself
    assert (tmp_path / "clip.txt").read_text() == "a caption"


def test_names_of_any_bytes():
    name = os.fsdecode(b"clip-\xff.mp4")
    assert shown(name) == "clip-\\xff.mp4"
    record = name_record(name)
    assert record["path"] == "clip-\\xff.mp4" and "path_b64" in record
    assert "path_b64" not in name_record("clip.mp4")
    assert caption_path(Path("/d/sub/a.mp4"), Path("/d"), Path("/o")) == Path("/o/sub/a.txt")
    assert caption_path(Path("/d/sub/a.mp4"), Path("/d")) == Path("/d/sub/a.txt")


def test_write_atomic_replaces_a_link_and_leaves_no_temp_file(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    target = tmp_path / "clips" / "a.txt"
    target.parent.mkdir()
    target.symlink_to(outside)
    write_atomic(target, "new")
    assert not target.is_symlink() and target.read_text() == "new"
    assert outside.read_text() == "keep"
    assert [p.name for p in target.parent.iterdir()] == ["a.txt"]
    assert existing_caption(target, tmp_path) == ("text", "new")
    assert existing_caption(target.with_name("b.txt"), tmp_path) == ("missing", None)


def test_a_claim_is_held_once(tmp_path):
    first, second = ClipClaim(tmp_path / "a.txt"), ClipClaim(tmp_path / "a.txt")
    assert first.acquire()
    assert not second.acquire()
    first.release()
    assert second.acquire()
    second.release()
    assert not any(p.name.startswith(".adatp-claim") for p in tmp_path.iterdir())


def test_manifest_lines_never_glue(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"path": "cut')  # a line cut by a crash
    sink = Manifest(path)
    sink.write_lines([json.dumps({"path": "a.mp4"})])
    sink.close()
    assert path.read_text().splitlines()[1] == '{"path": "a.mp4"}'
    with pytest.raises(ValueError, match="is a folder"):
        Manifest(tmp_path)
