"""The benchmark and accuracy harnesses run (their figures are not checked here:
speed belongs in bench/, and random weights have no accuracy)."""

from __future__ import annotations

import json
import sys

import pytest
from pack import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def test_benchmark_harness_runs_and_writes_json(tiny_dir, monkeypatch, tmp_path, capsys):
    import benchmark

    monkeypatch.setenv("ADATP_CACHE_DIR", str(tiny_dir.parent))
    out = tmp_path / "r.json"
    assert benchmark.main(["--shape", "tiny", "--device", "cpu", "--frames", "4", "--retentions", "0.25",
                           "--repeats", "1", "--new-tokens", "3", "--caption-tokens", "3", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    methods = {r["method"] for r in data["rows"]}
    assert methods == {"stock", "adatp_k2", "adatp_k2_static", "adatp_k0", "fastv_k2"}
    for row in data["rows"]:
        assert row["ttft_s"] > 0 and row["decode_ms_per_token"] > 0 and row["tokens_total"] == 4 * 196
        assert row["tokens_kept"] == (4 * 196 if row["method"] == "stock" else 196)
    for row in data["rows"]:
        assert row["ttft_new_question_s"] > 0 and row["prompt_tokens_new_question"] > row["prompt_tokens"]
    figures = [m["figure"] for m in data["micro"]]
    assert figures[0].startswith("selection") and data["micro"][0]["frames"] == 4
    assert any(f.startswith("pooling, one matmul") for f in figures)
    assert any(f.startswith("static graph capture") for f in figures)
    assert sum(f.startswith("caption end to end") for f in figures) == 2
    printed = capsys.readouterr().out
    assert "frames | method" in printed and "TTFT new-q s" in printed and "micro | frames" in printed
    import report

    assert "| 4 | adatp_k2 | 0.25 | 196 / 784 |" in report.table(data)
    assert "| static graph capture (first answer) | 4 |" in report.table(data)


def test_accuracy_harness_plumbing(tiny_dir, tmp_path):
    import accuracy
    from adatp_core.models.loader import load_video_llm

    (tmp_path / "v.mp4").write_bytes((ROOT / "assets" / "sample_video.mp4").read_bytes())
    lines = [{"video": "v.mp4", "question": "What shape moves?", "options": ["A. a square", "B. a disc"],
              "answer": "A"}, {"video": "v.mp4", "question": "Say anything.", "answer": "impossible"}]
    data = tmp_path / "set.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines))
    items = accuracy.read_items(data)
    assert items[0]["video"] == str((tmp_path / "v.mp4").resolve())
    assert accuracy.prompt_of(items[0]).endswith(accuracy.MC_SUFFIX)
    assert accuracy.predicted_letter("The answer is B.") == "B" and accuracy.predicted_letter("none") is None
    configs = accuracy.configurations([1.0, 0.25], layer=2)
    assert set(configs) == {"vanilla", "adatp_R0.25", "fastv_R0.25"}
    results = accuracy.evaluate(load_video_llm(tiny_dir, device="cpu"), items, configs, frames=4, max_new_tokens=2)
    assert all(r["answered"] == 2 and 0.0 <= r["accuracy"] <= 1.0 for r in results.values())
    with pytest.raises(ValueError, match="missing 'answer'"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"video": "v.mp4", "question": "q"}))
        accuracy.read_items(bad)


def test_decode_modes_bench_runs_and_writes_json(tiny_dir, monkeypatch, tmp_path, capsys):
    import decode_modes

    monkeypatch.setenv("ADATP_CACHE_DIR", str(tiny_dir.parent))
    out = tmp_path / "modes.json"
    assert decode_modes.main(["--shape", "tiny", "--device", "cpu", "--cached", "64,300", "--tokens", "2",
                              "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["cached_tokens"] for r in rows] == [64, 300]
    assert all(r["default_ms_per_token"] > 0 and r["static_ms_per_token"] > 0 for r in rows)
    assert all(r["auto_picks"] == "default" for r in rows)  # no graph to gain off CUDA
    assert "| cached tokens | static capacity | default ms/token | static ms/token |" in capsys.readouterr().out
