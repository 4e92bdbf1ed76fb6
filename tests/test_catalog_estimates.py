"""The catalog's GPU-memory figures for the Qwen3.5 / Qwen3.6 / Qwen3-VL-MoE entries, recomputed.

Each model is built on the meta device from its config.json shapes (nothing is downloaded, no weight
is allocated) and sized the way the pack sizes a model for placement (placement.quantized_sizes, then
accelerate): bfloat16, and bitsandbytes 4-bit with the vision side and lm_head kept in bfloat16. The
catalog figure must be those weights plus the 1.5 GB of working memory that catalog.py promises.

The shapes are those of the config.json files (text_config / vision_config); where a repository's
config was not found (Qwen3.5-2B's vision tower) the catalog entry says so.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from adatp_core.models.catalog import CATALOG, find_entry
from adatp_core.models.placement import quantized_sizes

WORKING_GB = 1.5
UNQUANTIZED = ("model.visual", "lm_head")  # what the Qwen adapters keep out of bitsandbytes
ROPE = {"mrope_interleaved": True, "mrope_section": [11, 11, 10], "partial_rotary_factor": 0.25,
        "rope_theta": 10000000, "rope_type": "default"}


def _hybrid_layers(n: int) -> list[str]:
    return ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)]


def _vision(depth, hidden, inter, heads, out, deepstack=()):
    return dict(depth=depth, hidden_size=hidden, intermediate_size=inter, num_heads=heads, out_hidden_size=out,
                num_position_embeddings=2304, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                deepstack_visual_indexes=list(deepstack))


def _qwen3_5(hidden, layers, inter, heads, kv_heads, v_heads, tie, vision):
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = dict(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, num_attention_heads=heads,
                num_key_value_heads=kv_heads, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=v_heads,
                linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, vocab_size=248320,
                layer_types=_hybrid_layers(layers), rope_parameters=ROPE, tie_word_embeddings=tie)
    return Qwen3_5ForConditionalGeneration, Qwen3_5Config(text_config=text, vision_config=vision,
                                                          tie_word_embeddings=tie)


def _qwen3_5_moe():
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    text = dict(hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
                linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                linear_value_head_dim=128, linear_conv_kernel_dim=4, moe_intermediate_size=512,
                shared_expert_intermediate_size=512, num_experts=256, num_experts_per_tok=8, vocab_size=248320,
                layer_types=_hybrid_layers(40), rope_parameters=ROPE, tie_word_embeddings=False)
    return Qwen3_5MoeForConditionalGeneration, Qwen3_5MoeConfig(
        text_config=text, vision_config=_vision(27, 1152, 4304, 16, 2048), tie_word_embeddings=False)


def _qwen3_vl_moe():
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    text = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                vocab_size=151936, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
                rope_parameters={"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_theta": 5000000,
                                 "rope_type": "default"})
    return Qwen3VLMoeForConditionalGeneration, Qwen3VLMoeConfig(
        text_config=text, vision_config=_vision(27, 1152, 4304, 16, 2048, (8, 16, 24)), tie_word_embeddings=False)


MODELS = {
    "Qwen/Qwen3.5-0.8B": lambda: _qwen3_5(1024, 24, 3584, 8, 2, 16, True, _vision(12, 768, 3072, 12, 1024)),
    "Qwen/Qwen3.5-2B": lambda: _qwen3_5(2048, 24, 6144, 8, 2, 16, True, _vision(24, 1024, 4096, 16, 2048)),
    "Qwen/Qwen3.5-4B": lambda: _qwen3_5(2560, 32, 9216, 16, 4, 32, True, _vision(24, 1024, 4096, 16, 2560)),
    "Qwen/Qwen3.5-9B": lambda: _qwen3_5(4096, 32, 12288, 16, 4, 32, False, _vision(27, 1152, 4304, 16, 4096)),
    "Qwen/Qwen3.5-27B": lambda: _qwen3_5(5120, 64, 17408, 24, 4, 48, False, _vision(27, 1152, 4304, 16, 5120)),
    "Qwen/Qwen3.6-27B": lambda: _qwen3_5(5120, 64, 17408, 24, 4, 48, False, _vision(27, 1152, 4304, 16, 5120)),
    "Qwen/Qwen3.5-35B-A3B": _qwen3_5_moe,
    "Qwen/Qwen3.6-35B-A3B": _qwen3_5_moe,
    "Qwen/Qwen3-VL-30B-A3B-Instruct": _qwen3_vl_moe,
}


def _weights_gb(model, bits: int | None) -> float:
    from accelerate.utils import compute_module_sizes

    quantization = None if bits is None else SimpleNamespace(load_in_4bit=True, llm_int8_skip_modules=UNQUANTIZED)
    dtype, special = quantized_sizes(model, torch.bfloat16, quantization)
    return compute_module_sizes(model, dtype=dtype, special_dtypes=special)[""] / 1e9


@pytest.fixture(scope="module", params=sorted(MODELS))
def sized(request):
    model_cls, config = MODELS[request.param]()
    with torch.device("meta"):
        model = model_cls(config)
    return find_entry(request.param), model


def test_every_new_entry_is_sized_here_with_its_model_type():
    assert {e.repo_id for e in CATALOG if e.model_type in ("qwen3_5", "qwen3_5_moe", "qwen3_vl_moe")} == set(MODELS)


def test_memory_figures_are_the_weights_plus_working_memory(sized):
    entry, model = sized
    assert model.config.model_type == entry.model_type
    bf16, nf4 = _weights_gb(model, None), _weights_gb(model, 4)
    assert entry.vram_bf16_gb == pytest.approx(bf16 + WORKING_GB, abs=0.15), (entry.repo_id, bf16)
    assert entry.vram_4bit_gb == pytest.approx(nf4 + WORKING_GB, abs=0.15), (entry.repo_id, nf4)
    # the checkpoint holds at least the weights transformers loads (plus the MTP layer, not loaded)
    assert entry.disk_gb >= bf16 - 0.05, (entry.repo_id, bf16)


def test_moe_experts_are_fused_parameters_that_bitsandbytes_leaves_in_bf16():
    """bitsandbytes swaps nn.Linear layers only (transformers' replace_with_bnb_linear), so the fused
    3-D expert weights stay at bfloat16 and 4-bit saves little on an MoE model; if transformers
    ever turns experts into nn.Linear layers, the MoE 4-bit figures must be redone."""
    for repo_id in ("Qwen/Qwen3.5-35B-A3B", "Qwen/Qwen3-VL-30B-A3B-Instruct"):
        model_cls, config = MODELS[repo_id]()
        with torch.device("meta"):
            model = model_cls(config)
        experts = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
        assert experts and all(
            not any(isinstance(c, torch.nn.Linear) for c in m.modules()) and
            all(p.dim() == 3 for p in m.parameters()) for m in experts), repo_id
        entry = find_entry(repo_id)
        assert entry.vram_4bit_gb > 0.9 * entry.vram_bf16_gb, repo_id
