"""FLOPs accounting: the published FastVID-convention figures for LLaVA-OV-7B, and the
hybrid (Gated DeltaNet) and MoE layers of Qwen3.5/3.6 and Qwen3-VL-MoE."""

from __future__ import annotations

import pytest
import torch

from adatp_core.flops import (
    LINEAR_ATTENTION,
    QWEN2_7B,
    TERA,
    LLMShape,
    cache_bytes,
    fastvid_flops,
    fastvid_layer_flops,
    llm_layer_flops,
    prefill_flops,
)

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


# -- hybrid and MoE layers (issue 21) -------------------------------------------------------------
# A small Qwen3.5 text config: D = 64, linear layers with 2 key heads of 16 and 4 value heads of 8
# (key_dim 32, value_dim 32, conv_dim 96), kernel 4; full layers with 4 heads of 16 and 2 KV heads.
SMALL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100,
             linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
             linear_conv_kernel_dim=4)
CUSTOM = ["full_attention", "linear_attention", "linear_attention", "full_attention", "linear_attention"]


def small_qwen3_5(**kw):
    import transformers

    return transformers.Qwen3_5TextConfig(**{**SMALL, "intermediate_size": 96, "num_hidden_layers": 5,
                                             "layer_types": CUSTOM, **kw})


def small_moe(kind):
    import transformers

    moe = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24)
    if kind == "qwen3_5_moe":
        return transformers.Qwen3_5MoeTextConfig(**SMALL, **moe, shared_expert_intermediate_size=40,
                                                 num_hidden_layers=4)
    common = {k: v for k, v in SMALL.items() if not k.startswith("linear_")}
    return transformers.Qwen3VLMoeTextConfig(**common, **moe, intermediate_size=96, num_hidden_layers=6,
                                             mlp_only_layers=[1], decoder_sparse_step=1)


def test_linear_layer_flops_against_a_hand_count():
    shape = LLMShape.from_config(small_qwen3_5())
    n = 128
    # per token: in_proj_qkv 64*96, in_proj_z 64*32, in_proj_b and _a 2*64*4, out_proj 32*64, conv 96*4;
    # delta rule per value head: C(2dk+dv) = 64*40, the two solves C(dk+dv)/2 = 64*24/2, 3 dk dv = 3*16*8;
    # gated RMSNorm 6 FLOPs per element of value_dim 32; SwiGLU MLP 3*64*96
    weights = 64 * 96 + 64 * 32 + 2 * 64 * 4 + 32 * 64 + 96 * 4 + 3 * 64 * 96
    rule = 4 * (64 * 40 + 64 * 24 // 2 + 3 * 16 * 8)
    assert shape.kind(1) == LINEAR_ATTENTION
    assert fastvid_layer_flops(shape, n, 1) == n * (weights + rule)
    assert llm_layer_flops(shape, n, 1) == 2 * n * (weights + rule) + n * 6 * 32
    # a linear layer is linear in n: no n^2 term
    assert llm_layer_flops(shape, 3 * n, 1) == 3 * llm_layer_flops(shape, n, 1)


def test_gated_full_attention_layer_against_a_hand_count():
    shape = LLMShape.from_config(small_qwen3_5())
    n = 10
    # q_proj 64 -> 2*4*16 (q and its gate), k/v 64 -> 2*16 each, o_proj 64 -> 64, MLP 3*64*96
    weights = 64 * 128 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96
    assert fastvid_layer_flops(shape, n, 0) == n * weights + 2 * n * n * 64
    assert llm_layer_flops(shape, n, 0) == 2 * n * weights + 4 * 64 * (n * (n + 1) // 2) + 2 * n * 64


def test_linear_layer_matches_transformers_flop_counter():
    """Run transformers' own Gated DeltaNet (torch fallback) under PyTorch's FLOP counter: its
    matrix products are the formula's, except the triangular solves (which the counter does not
    count) and the conv's K-1 padded outputs (which transformers computes and drops).

    The weights are frozen (requires_grad off), as in inference. Since 5.25 the conv runs as a
    hub-kernel module (``use_kernel_func_from_hub_with_fallback``) that takes
    ``conv1d.weight.squeeze(1)`` as an argument; the counter's module tracker hooks the autograd
    graph of every argument that requires grad, and a view made under no_grad has none
    ("Expected gradient function to be set"). Frozen weights give it nothing to hook and
    change no FLOP."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    cfg = small_qwen3_5()
    shape = LLMShape.from_config(cfg)
    lin = shape.linear
    torch.manual_seed(0)
    layer = Qwen3_5GatedDeltaNet(cfg, 1).requires_grad_(False)
    n = 2 * lin.chunk
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(torch.randn(1, n, cfg.hidden_size))
    solves = n * lin.value_heads * lin.chunk * (lin.key_head_dim + lin.value_head_dim) / 2
    conv_edge = lin.conv_dim * lin.conv_kernel * (lin.conv_kernel - 1)
    mixer = fastvid_layer_flops(shape, n, 1) - n * shape.mlp_params(1)
    assert counter.get_total_flops() == 2 * (mixer - solves + conv_edge)


@pytest.mark.parametrize("kind", ["qwen3_5_moe", "qwen3_vl_moe"])
def test_moe_active_parameters_match_the_meta_module(kind):
    """Active parameters per token = router + the top-k experts' slices + the shared expert and its
    gate, read from transformers' own modules built on the meta device."""
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeTextModel
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextModel

    cfg = small_moe(kind)
    model_class = Qwen3_5MoeTextModel if kind == "qwen3_5_moe" else Qwen3VLMoeTextModel
    with torch.device("meta"):
        model = model_class(cfg)
    shape = LLMShape.from_config(cfg)
    for i, layer in enumerate(model.layers):
        mixer = layer.linear_attn if hasattr(layer, "linear_attn") else layer.self_attn
        weights = sum(p.numel() for name, p in mixer.named_parameters() if p.dim() >= 2 and "norm" not in name)
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            k = mlp.gate.top_k
            active = mlp.gate.weight.numel() + mlp.experts.gate_up_proj[:k].numel() + mlp.experts.down_proj[:k].numel()
            if hasattr(mlp, "shared_expert"):
                active += sum(p.numel() for p in mlp.shared_expert.parameters()) + mlp.shared_expert_gate.weight.numel()
        else:
            active = sum(p.numel() for p in mlp.parameters())
        assert (i, shape.mixer_params(i), shape.mlp_params(i)) == (i, weights, active)
    if kind == "qwen3_vl_moe":  # mlp_only_layers keeps layer 1 dense
        assert shape.moe_layers == (0, 2, 3, 4, 5)


def test_moe_block_flops_match_transformers_flop_counter():
    """Every token goes through the router, its top-k experts and the shared expert: 2 FLOPs per
    active parameter, as PyTorch's counter measures on transformers' own block."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock

    cfg = small_moe("qwen3_5_moe")
    torch.manual_seed(0)
    block = Qwen3_5MoeSparseMoeBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    n = 37
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        block(torch.randn(1, n, cfg.hidden_size))
    assert counter.get_total_flops() == 2 * n * LLMShape.from_config(cfg).mlp_params(0)


def test_layer_types_are_read_from_the_config():
    """A custom pattern (layers 0 and 3 full): only those have an n^2 term; without layer_types,
    transformers' every-4th pattern. (Which K runs: the adapters' resolve_layer, test_hybrid.py.)"""
    shape = LLMShape.from_config(small_qwen3_5())
    assert shape.full_attention_layers() == [0, 3]
    n = 256
    # f(2n) - 2 f(n) keeps only the n^2 terms: 2 * q_width * (2n)^2 - 2 * 2 * q_width * n^2 per full layer
    quadratic = fastvid_flops(shape, 2 * n, 2 * n, 0) - 2 * fastvid_flops(shape, n, n, 0)
    assert quadratic == 2 * (2 * 64 * (2 * n) ** 2 - 2 * 2 * 64 * n ** 2)
    default = LLMShape.from_config(small_qwen3_5(layer_types=None, num_hidden_layers=8))
    assert default.full_attention_layers() == [3, 7]


def test_existing_families_keep_their_shape():
    """Dense configs (Qwen2's layer_types say full/sliding attention) count as before."""
    import transformers

    qwen2 = transformers.Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)
    assert LLMShape.from_config(qwen2) == QWEN2_7B
    assert LLMShape.from_config(transformers.LlavaOnevisionConfig(text_config=qwen2.to_dict())) == QWEN2_7B


def test_cache_bytes_hold_kv_for_full_layers_and_fixed_states_for_linear_ones():
    shape = LLMShape.from_config(small_qwen3_5())
    # full layers 0 and 3: K = 2 leaves layer 0 with 1000 tokens, layer 3 with 300; 2 KV heads of 16, bf16
    mem = cache_bytes(shape, 1000, 300, 2)
    assert mem["kv"] == 2 * 2 * 16 * 2 * (1000 + 300)
    # three linear layers: conv state 96 x 4 in bf16, recurrent state 4 x 16 x 8 in float32
    assert mem["state"] == 3 * (96 * 4 * 2 + 4 * 16 * 8 * 4)
    assert cache_bytes(shape, 1000, 1000, 0)["state"] == mem["state"]  # pruning never shrinks the states
