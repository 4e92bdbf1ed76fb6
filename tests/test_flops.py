"""FLOPs accounting: the published FastVID-convention figures for LLaVA-OV-7B."""

from __future__ import annotations

import pytest

from adatp_core.flops import QWEN2_7B, TERA, fastvid_flops, llm_layer_flops, prefill_flops

N = 32 * 196
KEPT = round(0.25 * N)


def test_vanilla_is_48_82_tflops():
    assert fastvid_flops(QWEN2_7B, N, N, 0) / TERA == pytest.approx(48.82, abs=0.005)


def test_quarter_before_llm_is_10_73_tflops():
    assert fastvid_flops(QWEN2_7B, N, KEPT, 0) / TERA == pytest.approx(10.73, abs=0.005)


def test_quarter_at_k2_is_13_45_tflops():
    assert fastvid_flops(QWEN2_7B, N, KEPT, 2) / TERA == pytest.approx(13.45, abs=0.005)


def test_k2_quarter_ratio_is_27_5_percent():
    ratio = fastvid_flops(QWEN2_7B, N, KEPT, 2) / fastvid_flops(QWEN2_7B, N, N, 0)
    assert ratio == pytest.approx(0.275, abs=0.001)


def test_honest_prefill_counts_every_layer_and_the_head():
    full = prefill_flops(QWEN2_7B, 6336, 6336, 0)
    assert full == pytest.approx(28 * llm_layer_flops(QWEN2_7B, 6336) + 2 * 3584 * 152064)
    # pruning at K=2 leaves two full layers, plus the scoring of 30 query rows
    pruned = prefill_flops(QWEN2_7B, 6336, 64 + KEPT, 2, n_query=30)
    assert pruned > 2 * llm_layer_flops(QWEN2_7B, 6336) + 26 * llm_layer_flops(QWEN2_7B, 64 + KEPT)


def test_state_stats_report_both_conventions(tiny, frames):
    from conftest import QUESTION

    from adatp_core.attention import extract_attention
    from adatp_core.prune import prune_tokens

    s = prune_tokens(extract_attention(tiny, frames, QUESTION, layer=2), 0.25)
    st = s.stats
    assert 0 < st["flops_ratio"] < 1
    assert st["flops_video_llm_T"] == pytest.approx(st["flops_ratio"] * st["flops_video_llm_vanilla_T"])
    # the vision encoder is not pruned, so the honest total falls by less
    assert st["flops_total_ratio"] > st["flops_ratio"]
    assert st["flops_vision_T"] < st["flops_total_T"]
