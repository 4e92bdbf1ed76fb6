"""The main job: the CLI on the embedded default (tiny model, sample video)."""

from __future__ import annotations

import json

from adatp_core import cli


def test_default_run_prints_answer_tokens_flops_and_timings(tiny_dir, monkeypatch, capsys):
    monkeypatch.setenv("ADATP_CACHE_DIR", str(tiny_dir.parent))
    assert cli.main([]) == 0  # exactly the README's main job
    out = capsys.readouterr().out
    assert out.startswith("Answer: ")
    assert "Tokens kept: 1568 of 6272 visual tokens (25.0%)" in out
    assert "FLOPs:" in out and "TTFT" in out and "ms/token" in out


def test_json_output_and_vanilla(tiny_dir, monkeypatch, capsys):
    monkeypatch.setenv("ADATP_CACHE_DIR", str(tiny_dir.parent))
    assert cli.main(["--frames", "4", "--max-new-tokens", "3", "--vanilla", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["tokens_kept"] == stats["tokens_total"] == 4 * 196
    assert stats["flops_ratio"] == 1.0
    assert stats["new_tokens"] == 3


def test_bad_input_is_a_clear_error_not_a_traceback(tiny_dir, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("ADATP_CACHE_DIR", str(tiny_dir.parent))
    assert cli.main(["--video", str(tmp_path / "missing.mp4")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["--frames", "4", "--retention", "1.5"]) == 2
    assert "retention" in capsys.readouterr().err


def test_max_pixels_reaches_the_pipeline():
    from adatp_core.cli import build_parser, pipeline_config

    assert pipeline_config(build_parser().parse_args([])).max_pixels == 0
    assert pipeline_config(build_parser().parse_args(["--max-pixels", "50176"])).max_pixels == 50176
