"""Random-weight models of real shapes, built from configs on the target device.

Weights are random, so nothing here measures accuracy; speed and memory do not
depend on the weights' values. The tokenizer, chat template and preprocessing
come from the built-in tiny model of the same family (its token ids fit every
vocabulary). Also the stock transformers path of each family, for the baseline.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adatp_core.hf.attention_hook import register_attention, wrapped_attention_name  # noqa: E402
from adatp_core.models.loader import ADAPTERS, VideoLLM, load_video_llm  # noqa: E402
from adatp_core.models.stock import stock_video_inputs as stock_inputs  # noqa: E402,F401  (moved to the core)
from adatp_core.models.tiny import ensure_tiny_model  # noqa: E402
from adatp_core.models.tiny_qwen import (ensure_tiny_qwen2_5_vl, ensure_tiny_qwen3_5,  # noqa: E402
                                        ensure_tiny_qwen3_5_moe, ensure_tiny_qwen3_vl, ensure_tiny_qwen3_vl_moe)

SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                     image_size=384, patch_size=14, vision_use_head=False)

# Qwen3.5/3.6 (config.json of Qwen/Qwen3.5-9B and Qwen/Qwen3.6-35B-A3B): the linear-attention fields,
# the layer pattern (full_attention_interval 4), partial M-RoPE, and the vision tower (no DeepStack).
HYBRID_4 = ["linear_attention"] * 3 + ["full_attention"]
GATED_DELTANET = dict(linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_num_key_heads=16,
                      linear_num_value_heads=32, linear_value_head_dim=128)
QWEN3_5_ROPE = {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                "mrope_section": [11, 11, 10], "mrope_interleaved": True}
QWEN3_5_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                      deepstack_visual_indexes=[], hidden_act="gelu_pytorch_tanh")


@dataclass(frozen=True)
class Shape:
    name: str
    text: dict
    vision: dict
    family: str = "llava_onevision"


SHAPES = {
    "0.5b": Shape("LLaVA-OV-0.5B", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                        tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768),
                  SIGLIP_SO400M),
    "7b": Shape("LLaVA-OV-7B", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                    num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                    tie_word_embeddings=False, rope_theta=1e6, max_position_embeddings=32768),
                SIGLIP_SO400M),
    # Qwen/Qwen2.5-VL-7B-Instruct: window-attention ViT (1280 wide, 32 blocks) + Qwen2-7B-like LLM.
    "qwen2.5-vl-7b": Shape("Qwen2.5-VL-7B", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
             spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
             tokens_per_second=2, hidden_act="silu"), family="qwen2_5_vl"),
    # Qwen/Qwen3-VL-8B-Instruct: 27-block ViT with DeepStack from blocks 8, 16, 24 + Qwen3-8B-like LLM.
    "qwen3-vl-8b": Shape("Qwen3-VL-8B", dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                         "mrope_interleaved": True}),
        dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096, patch_size=16,
             spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
             deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh"), family="qwen3_vl"),
    # Qwen/Qwen3.5-9B: hybrid LLM (3 Gated DeltaNet layers, then 1 gated full-attention layer, x8) and
    # Qwen3-VL's 27-block ViT without DeepStack.
    "qwen3.5-9b": Shape("Qwen3.5-9B", dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=16,
        num_key_value_heads=4, head_dim=256, vocab_size=248320, max_position_embeddings=262144,
        layer_types=HYBRID_4 * 8, **GATED_DELTANET, rope_parameters=QWEN3_5_ROPE),
        dict(QWEN3_5_VISION, out_hidden_size=4096), family="qwen3_5"),
    # Qwen/Qwen3.6-35B-A3B (the architecture of Qwen3.5-35B-A3B): the hybrid LLM with MoE MLPs in every
    # layer (256 experts of 512, top 8, and a shared expert of 512).
    "qwen3.6-35b-a3b": Shape("Qwen3.6-35B-A3B", dict(
        hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
        vocab_size=248320, max_position_embeddings=262144, layer_types=HYBRID_4 * 10, **GATED_DELTANET,
        num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512, shared_expert_intermediate_size=512,
        rope_parameters=QWEN3_5_ROPE), dict(QWEN3_5_VISION, out_hidden_size=2048), family="qwen3_5_moe"),
    # Qwen/Qwen3-VL-30B-A3B-Instruct: Qwen3-VL with a Qwen3-30B-A3B-like MoE LLM (128 experts of 768, top 8).
    "qwen3-vl-30b-a3b": Shape("Qwen3-VL-30B-A3B", dict(
        hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1, mlp_only_layers=[],
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                         "mrope_interleaved": True}),
        dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=2048, patch_size=16,
             spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
             deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh"), family="qwen3_vl_moe"),
}
TINY = {"tiny": ensure_tiny_model, "tiny-qwen2.5-vl": ensure_tiny_qwen2_5_vl, "tiny-qwen3-vl": ensure_tiny_qwen3_vl,
        "tiny-qwen3.5": ensure_tiny_qwen3_5, "tiny-qwen3.5-moe": ensure_tiny_qwen3_5_moe,
        "tiny-qwen3-vl-moe": ensure_tiny_qwen3_vl_moe}
TINY_OF = {"llava_onevision": ensure_tiny_model, "qwen2_5_vl": ensure_tiny_qwen2_5_vl, "qwen3_vl": ensure_tiny_qwen3_vl,
           "qwen3_5": ensure_tiny_qwen3_5, "qwen3_5_moe": ensure_tiny_qwen3_5_moe,
           "qwen3_vl_moe": ensure_tiny_qwen3_vl_moe}


def _config(spec: Shape, tokenizer):
    import transformers

    if spec.family == "llava_onevision":
        return transformers.LlavaOnevisionConfig(
            vision_config=transformers.SiglipVisionConfig(**spec.vision),
            text_config=transformers.Qwen2Config(**spec.text),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
            vision_feature_layer=-1, vision_feature_select_strategy="full")
    c = tokenizer.convert_tokens_to_ids
    config_class = {"qwen2_5_vl": transformers.Qwen2_5_VLConfig, "qwen3_vl": transformers.Qwen3VLConfig,
                    "qwen3_5": transformers.Qwen3_5Config, "qwen3_5_moe": transformers.Qwen3_5MoeConfig,
                    "qwen3_vl_moe": transformers.Qwen3VLMoeConfig}[spec.family]
    return config_class(vision_config=spec.vision, text_config=spec.text, tie_word_embeddings=False,
                        image_token_id=c("<|image_pad|>"), video_token_id=c("<|video_pad|>"),
                        vision_start_token_id=c("<|vision_start|>"), vision_end_token_id=c("<|vision_end|>"))


def build(shape: str, device: str, dtype: torch.dtype, attention: str = "sdpa") -> VideoLLM:
    """A built-in tiny model (loaded from its folder), or a random model of a real shape."""
    if shape in TINY:
        return load_video_llm(TINY[shape](), device=device, dtype=dtype, attention=attention)
    import transformers
    from transformers import AutoTokenizer

    spec = SHAPES[shape]
    folder = TINY_OF[spec.family]()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    config = _config(spec, tokenizer)
    adapter_class = ADAPTERS[config.model_type]
    register_attention(attention)
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(transformers, adapter_class.model_class)._from_config(
            config, dtype=dtype,
            attn_implementation={"text_config": wrapped_attention_name(attention), "vision_config": attention,
                                 "": attention}).eval()
    model.generation_config.eos_token_id = None  # random weights: always generate the full length
    model.generation_config.pad_token_id = 0
    adapter = adapter_class(model, tokenizer, folder)
    return VideoLLM(model=model, tokenizer=tokenizer, adapter=adapter, name=spec.name, path=str(folder),
                    compute_device=torch.device(device), dtype=dtype, attention=attention)


def stock_vision(model: VideoLLM, kwargs: dict):
    """The stock get_video_features: (features [N(+1), D], DeepStack features or None)."""
    hf = model.model
    if "video_grid_thw" not in kwargs:
        feats = hf.model.get_video_features(kwargs["pixel_values_videos"], return_dict=True).pooler_output
        return feats.reshape(-1, feats.shape[-1]), None
    out = hf.model.get_video_features(kwargs["pixel_values_videos"], kwargs["video_grid_thw"], return_dict=True)
    deepstack = getattr(out, "deepstack_features", None)
    if deepstack:
        deepstack = [torch.cat(f) if isinstance(f, (list, tuple)) else f for f in deepstack]
    return torch.cat(out.pooler_output), deepstack


def stock_prefill(model: VideoLLM, prompt, ids, mask, feats, deepstack):
    """The stock language model's forward over the whole prompt; returns the last logits."""
    hf = model.model
    if feats.shape[0] == len(prompt.visual_positions) and len(prompt.extra_positions):
        feats = torch.cat([feats, hf.model.image_newline[None].to(feats)])  # transformers < 5.2x (LLaVA-OV)
    embeds = hf.model.get_input_embeddings()(ids)
    video = (ids == hf.config.video_token_id)[..., None]
    embeds = embeds.masked_scatter(video.expand_as(embeds), feats.to(embeds.dtype))
    extra = {}
    if prompt.plan is not None and hasattr(model.adapter, "grid_thw"):
        extra["position_ids"] = model.adapter.position_ids(prompt)
        if deepstack:
            extra.update(visual_pos_masks=video[..., 0], deepstack_visual_embeds=deepstack)
    hidden = hf.model.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, **extra)
    return hf.lm_head(hidden.last_hidden_state[:, -1:])
