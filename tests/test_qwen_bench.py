"""The benchmark runs the Qwen shapes (figures are not checked: speed belongs in bench/)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from pack import ROOT
from qwen_fixtures import qwen_cache  # noqa: F401

sys.path.insert(0, str(ROOT / "bench"))


def test_benchmark_runs_a_tiny_qwen_shape(monkeypatch, tmp_path, qwen_cache):  # noqa: F811
    import benchmark

    monkeypatch.setenv("ADATP_CACHE_DIR", str(qwen_cache))
    out = tmp_path / "r.json"
    assert benchmark.main(["--shape", "tiny-qwen3-vl", "--device", "cpu", "--frames", "4", "--retentions", "0.5",
                           "--methods", "stock,adatp_k2", "--repeats", "1", "--new-tokens", "3",
                           "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == {"stock", "adatp_k2"}
    total = rows[0]["tokens_total"]
    assert all(r["tokens_total"] == total for r in rows) and total % 2 == 0  # 4 frames: 2 temporal patches
    assert next(r for r in rows if r["method"] == "adatp_k2")["tokens_kept"] == total // 2


@pytest.mark.parametrize("shape, vision_tflops", [("qwen2.5-vl-7b", (20, 23)), ("qwen3-vl-8b", (10, 15))])
def test_real_shapes_build_and_account(shape, vision_tflops, monkeypatch, qwen_cache):  # noqa: F811
    """The 7B/8B shapes build (on the meta device: no memory) and their FLOPs at 32 frames
    of 448x448 are in range: Qwen2.5-VL-7B's tower is about 21 TFLOP (issue 8)."""
    from shapes import build

    from adatp_core.flops import flops_summary

    monkeypatch.setenv("ADATP_CACHE_DIR", str(qwen_cache))
    model = build(shape, "meta", torch.bfloat16)
    plan = model.adapter.plan_video(32, 448, 448)
    prompt = model.adapter.build_prompt("What happens?", plan)
    stats = flops_summary(model, prompt, keep_count=plan.num_tokens // 4, layer=2)
    lo, hi = vision_tflops
    assert lo < stats["flops_vision_T"] < hi
    assert 0.25 < stats["flops_ratio"] < 0.30  # FastVID convention at R = 0.25, K = 2
    assert stats["flops_total_ratio"] > stats["flops_ratio"]  # the vision tower is not pruned


def test_flops_table_script(capsys, monkeypatch, qwen_cache):  # noqa: F811
    import flops_table

    monkeypatch.setenv("ADATP_CACHE_DIR", str(qwen_cache))
    assert flops_table.main(["--frames", "8", "--size", "640x360"]) == 0
    out = capsys.readouterr().out
    from shapes import SHAPES

    assert out.count("\n| ") == len(SHAPES)  # one row per shape after the header
    assert "| Qwen2.5-VL-7B | 4x12x21 | 1008 |" in out and "| Qwen3-VL-8B | 4x10x18 | 720 |" in out


@pytest.mark.parametrize("shape", ["qwen3.5-9b", "qwen3.6-35b-a3b", "qwen3-vl-30b-a3b"])
def test_hybrid_and_moe_shapes_build_and_account(shape, monkeypatch, qwen_cache):  # noqa: F811
    """Qwen3.5-9B, Qwen3.6-35B-A3B and Qwen3-VL-30B-A3B build on the meta device; the FLOPs count
    every weight a token meets (all of the dense model's, about 3B of the A3B models' with their
    embeddings), hybrid K = 2 moves up to the first full-attention layer, and at 32 frames the
    vision tower (Qwen3-VL's, 27 blocks) costs about 12 TFLOP."""
    from shapes import build

    from adatp_core.flops import LLMShape, flops_summary

    monkeypatch.setenv("ADATP_CACHE_DIR", str(qwen_cache))
    model = build(shape, "meta", torch.bfloat16)
    text = model.adapter.text_model
    llm = LLMShape.from_config(text.config)
    counted = sum(llm.layer_params(i) for i in range(llm.layers))
    if llm.moe is None:
        weights = sum(p.numel() for p in text.layers.parameters() if p.dim() >= 2)
        assert counted == weights
    else:
        assert 3.0e9 < counted + 2 * llm.hidden * llm.vocab < 3.6e9  # "A3B": about 3B active parameters
    hybrid = shape.startswith("qwen3.")
    assert llm.full_attention_layers() == (list(range(3, llm.layers, 4)) if hybrid else list(range(llm.layers)))
    layer = model.adapter.default_layer()
    assert layer == (4 if hybrid else 2)
    plan = model.adapter.plan_video(32, 448, 448)
    prompt = model.adapter.build_prompt("What happens?", plan)
    stats = flops_summary(model, prompt, keep_count=plan.num_tokens // 4, layer=layer)
    assert 10 < stats["flops_vision_T"] < 14
    assert 0.2 < stats["flops_ratio"] < 0.35 < stats["flops_total_ratio"]


def test_flops_table_compares_layers_and_memory(capsys, monkeypatch, qwen_cache):  # noqa: F811
    import flops_table

    monkeypatch.setenv("ADATP_CACHE_DIR", str(qwen_cache))
    assert flops_table.main(["--frames", "8", "--size", "640x360", "--compare-layers", "2,4", "--memory"]) == 0
    out = capsys.readouterr().out
    assert "they use the next full-attention layer: Qwen3.5-9B K = 4, Qwen3.6-35B-A3B K = 4." in out
    compare, memory = out.split("FLOPs at each K")[1].split("Cache after the prefill")
    hybrid = next(line for line in compare.splitlines() if line.startswith("| Qwen3.5-9B |")).split(" | ")
    assert hybrid[1].endswith("*") and not hybrid[2].endswith("*")  # K = 2 would score at a linear layer
    dense = next(line for line in compare.splitlines() if line.startswith("| LLaVA-OV-7B |"))
    assert "*" not in dense
    cells = next(line for line in memory.splitlines() if line.startswith("| Qwen3.5-9B |")).split(" | ")
    assert cells[1] == "4" and cells[2].split(" + ")[1] == cells[3].split(" + ")[1] != "0.0 MiB"  # states stay
    assert "| LLaVA-OV-7B | 2 |" in memory
    with pytest.raises(SystemExit):
        flops_table.main(["--compare-layers", "two"])
    assert "give layers as integers" in capsys.readouterr().err
    # the built-in tiny shapes too (the "tiny and meta shapes"), K moved on the hybrid one
    assert flops_table.main(["--frames", "4", "--shapes", "tiny-qwen3.5,tiny-qwen3-vl-moe", "--compare-layers", "2,4"]) == 0
    out = capsys.readouterr().out
    assert "tiny-qwen3.5 K = 4" in out and "| tiny-qwen3-vl-moe |" in out
    with pytest.raises(SystemExit):
        flops_table.main(["--shapes", "nope"])
    assert "unknown ['nope']" in capsys.readouterr().err


def test_decode_modes_bench_runs_a_hybrid_shape(monkeypatch, tmp_path, capsys, qwen_cache):  # noqa: F811
    """Qwen3.5's linear-attention layers get a linear state, not keys and values (it raised
    KeyError: 0 in the static cache), and auto's choice counts the attention layers only."""
    import decode_modes

    monkeypatch.setenv("ADATP_CACHE_DIR", str(qwen_cache))
    out = tmp_path / "modes.json"
    assert decode_modes.main(["--shape", "tiny-qwen3.5", "--device", "cpu", "--cached", "70", "--tokens", "2",
                              "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["cached_tokens"] for r in rows] == [70]
    assert all(r["default_ms_per_token"] > 0 and r["static_ms_per_token"] > 0 for r in rows)


def test_benchmark_times_the_k_that_ran_on_a_hybrid_shape(monkeypatch, tmp_path, qwen_cache):  # noqa: F811
    """adatp_k2 on Qwen3.5 runs K = 4: the baseline for the cost of the scores (layers < K without
    the probe) must run 4 layers too, not 2 (the scores looked twice as dear as they are)."""
    import benchmark

    monkeypatch.setenv("ADATP_CACHE_DIR", str(qwen_cache))
    seen = []
    real = benchmark.plain_prefill_seconds
    monkeypatch.setattr(benchmark, "plain_prefill_seconds",
                        lambda model, state, layer: seen.append((layer, state.layer)) or real(model, state, layer))
    out = tmp_path / "r.json"
    assert benchmark.main(["--shape", "tiny-qwen3.5", "--device", "cpu", "--frames", "4", "--retentions", "0.5",
                           "--methods", "adatp_k2", "--repeats", "1", "--new-tokens", "2",
                           "--caption-tokens", "0", "--out", str(out)]) == 0
    assert seen and all(layer == ran == 4 for layer, ran in seen)
    assert {r["layer"] for r in json.loads(out.read_text())["rows"] if r["method"] == "adatp_k2"} == {4}
