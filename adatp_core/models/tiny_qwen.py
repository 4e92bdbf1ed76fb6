"""Tiny random Qwen2.5-VL, Qwen3-VL, Qwen3.5 and the MoE models, built from configs in code (no download).

Like the tiny LLaVA-OneVision (tiny.py), they have the real token layout
(temporal patches of 2 frames, 2x2 merger, 28 or 32 px per token side, M-RoPE,
window attention in Qwen2.5-VL's tower, DeepStack in Qwen3-VL, Qwen3.5's hybrid
linear/full attention, routed experts) and a locally
trained tokenizer with Qwen's special tokens, and they load through the same
safe loader as users' models. Their weights are random.
"""

from __future__ import annotations

from pathlib import Path

from .tiny import build_tokenizer, ensure_built, finish_tiny_model, save_model_folder

TINY_QWEN2_5_VL_NAME = "adatp-tiny-qwen2.5-vl (built-in, random weights)"
TINY_QWEN3_VL_NAME = "adatp-tiny-qwen3-vl (built-in, random weights)"
TINY_QWEN_VERSION = 1
TINY_QWEN2_5_VL_FOLDER = f"tiny-qwen2.5-vl-v{TINY_QWEN_VERSION}"  # under the cache
TINY_QWEN3_VL_FOLDER = f"tiny-qwen3-vl-v{TINY_QWEN_VERSION}"
TINY_QWEN3_5_NAME = "adatp-tiny-qwen3.5 (built-in, random weights)"
TINY_QWEN3_5_MOE_NAME = "adatp-tiny-qwen3.5-moe (built-in, random weights)"
TINY_QWEN3_VL_MOE_NAME = "adatp-tiny-qwen3-vl-moe (built-in, random weights)"
TINY_QWEN3_5_FOLDER = f"tiny-qwen3.5-v{TINY_QWEN_VERSION}"
TINY_QWEN3_5_MOE_FOLDER = f"tiny-qwen3.5-moe-v{TINY_QWEN_VERSION}"
TINY_QWEN3_VL_MOE_FOLDER = f"tiny-qwen3-vl-moe-v{TINY_QWEN_VERSION}"

# The tiny Qwen3.5s' layers: linear attention (Gated DeltaNet) but at layers 3, 5 and 7. The real
# models' every-4th pattern starts the same (layer 3 is the first full-attention layer, so K = 2
# moves to 4); the denser tail gives more than one valid K above it (0, 4, 6) and a K with no
# valid K above it (7). Nothing may assume the every-4th pattern.
_L, _F = "linear_attention", "full_attention"
TINY_QWEN3_5_LAYER_TYPES = (_L, _L, _L, _F, _L, _F, _L, _F)

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>")
QWEN3_5_SPECIAL_TOKENS = (*QWEN_SPECIAL_TOKENS, "<think>", "</think>")
_NAMED = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
          "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}

# The chat template of Qwen/Qwen2.5-VL-*-Instruct (its default system turn included).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The user/assistant part of Qwen/Qwen3-VL-*-Instruct's chat template (no default system turn).
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'video' %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The user/assistant part of Qwen/Qwen3.5-9B's chat template, as its generation prompt and
# content rendering behave: the user's content is trimmed, and the model thinks unless the
# caller passes enable_thinking=false, which writes an empty, closed thinking block.
QWEN3_5_CHAT_TEMPLATE = (
    "{%- macro render(content) %}{%- if content is string %}{{- content }}{%- else %}"
    "{%- for item in content %}"
    "{%- if item.type == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item.type == 'video' %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in item %}{{- item.text }}{%- endif %}{%- endfor %}{%- endif %}{%- endmacro %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\n' + render(message.content)|trim + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}"
    "{%- else %}{{- '<think>\n' }}{%- endif %}{%- endif %}"
)

QWEN2_5_VL_VIDEO_PREPROCESSOR = {
    "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2_5_VLProcessor",
    "do_resize": True, "size": {"shortest_edge": 3136, "longest_edge": 12845056}, "resample": 3,
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
}
QWEN3_VL_VIDEO_PREPROCESSOR = {
    "video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3VLProcessor",
    "do_resize": True, "size": {"shortest_edge": 4096, "longest_edge": 25165824}, "resample": 3,
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "do_convert_rgb": True, "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
}


def _text_config(tokenizer, **extra) -> dict:
    """A 4-layer text model, 64 wide, head_dim 16 (M-RoPE sections 2+3+3 = 8 frequencies)."""
    return {**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=32768,
                   initializer_range=0.2, tie_word_embeddings=False,
                   eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                   pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None), **extra}


def _ids(tokenizer) -> dict:
    c = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=c("<|image_pad|>"), video_token_id=c("<|video_pad|>"),
                vision_start_token_id=c("<|vision_start|>"), vision_end_token_id=c("<|vision_end|>"))


def build_tiny_qwen2_5_vl(tokenizer, seed: int = 0):
    """A random 2-block Qwen2.5-VL vision tower (window attention in block 0, full in block 1,
    window 112 px = 4x4 merged tokens) + a 4-layer text model, float32."""
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[1], tokens_per_second=2, initializer_range=0.2)
    text = _text_config(tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                    "mrope_section": [2, 3, 3]})
    return _build("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", tokenizer, text, vision, seed)


def build_tiny_qwen3_vl(tokenizer, seed: int = 0):
    """A random 3-block Qwen3-VL vision tower with DeepStack features from every block
    (added after LLM layers 0, 1 and 2) + a 4-layer text model, float32."""
    return _build("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", tokenizer, _qwen3_vl_text(tokenizer),
                  _qwen3_vision(deepstack_visual_indexes=[0, 1, 2]), seed)


def _qwen3_vl_text(tokenizer, **extra) -> dict:
    """Qwen3-VL's 4-layer text model: head_dim 16, interleaved M-RoPE (sections 2+3+3)."""
    return _text_config(tokenizer, head_dim=16, rope_parameters={
        "rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True},
        **extra)


def _qwen3_vision(**extra) -> dict:
    """A random 3-block Qwen3-VL-style vision tower, 16 px patches, out to the 64-wide LLM."""
    return dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                initializer_range=0.2, **extra)


def _moe(**extra) -> dict:
    """4 routed experts, 2 per token, each 32 wide."""
    return dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, **extra)


def _qwen3_5_text(tokenizer, **extra) -> dict:
    """TINY_QWEN3_5_LAYER_TYPES: full-attention heads of 32 (partial rotary: 16 dims, M-RoPE
    sections 2+3+3), linear layers with 2 key heads and 4 value heads of 16, conv kernel 4."""
    return _text_config(tokenizer, num_hidden_layers=len(TINY_QWEN3_5_LAYER_TYPES),
                        layer_types=list(TINY_QWEN3_5_LAYER_TYPES), head_dim=32,
                        linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                        linear_num_key_heads=2, linear_num_value_heads=4,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0,
                                         "mrope_section": [2, 3, 3], "mrope_interleaved": True,
                                         "partial_rotary_factor": 0.5}, **extra)


# Weight scale of the tiny hybrid models. At 0.2 (the other tiny models') their 8 random layers
# amplify float32 rounding about 10x more than the dense ones (a reused prefix or a kept
# subsequence differed from one pass by up to 2.5e-5 in the logits, measured); at 0.05 by
# about 1e-6, with as varied tokens.
HYBRID_INIT = 0.05


def _build(config_name: str, model_name: str, tokenizer, text: dict, vision: dict, seed: int,
           init: float = 0.2):
    import torch
    import transformers

    text = {**text, "initializer_range": init}
    config = getattr(transformers, config_name)(vision_config=vision, text_config=text, tie_word_embeddings=False,
                                                **_ids(tokenizer))
    config.initializer_range = init
    torch.manual_seed(seed)
    return finish_tiny_model(getattr(transformers, model_name)(config).eval(), tokenizer)


def build_tiny_qwen3_5(tokenizer, seed: int = 0):
    """A random 3-block Qwen3.5 vision tower (no DeepStack) + an 8-layer hybrid text model, float32."""
    return _build("Qwen3_5Config", "Qwen3_5ForConditionalGeneration", tokenizer,
                  _qwen3_5_text(tokenizer), _qwen3_vision(), seed, HYBRID_INIT)


def build_tiny_qwen3_5_moe(tokenizer, seed: int = 0):
    """As ``build_tiny_qwen3_5`` with a routed-expert MLP (and a shared expert) in every layer."""
    return _build("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration", tokenizer,
                  _qwen3_5_text(tokenizer, **_moe(shared_expert_intermediate_size=32)), _qwen3_vision(), seed,
                  HYBRID_INIT)


def build_tiny_qwen3_vl_moe(tokenizer, seed: int = 0):
    """As ``build_tiny_qwen3_vl`` with a routed-expert MLP in every layer."""
    return _build("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", tokenizer,
                  _qwen3_vl_text(tokenizer, decoder_sparse_step=1, **_moe()),
                  _qwen3_vision(deepstack_visual_indexes=[0, 1, 2]), seed)


def _writer(build, template, preprocessor, layout: str = "separate", special_tokens=QWEN_SPECIAL_TOKENS):
    def write(folder: Path) -> None:
        tokenizer = build_tokenizer(special_tokens, _NAMED)
        save_model_folder(build(tokenizer), tokenizer, folder, template, preprocessor, layout=layout)

    return write


def ensure_tiny_qwen2_5_vl(cache_dir: Path | None = None) -> Path:
    return ensure_built(cache_dir, TINY_QWEN2_5_VL_FOLDER,
                        _writer(build_tiny_qwen2_5_vl, QWEN2_5_VL_CHAT_TEMPLATE, QWEN2_5_VL_VIDEO_PREPROCESSOR))


def ensure_tiny_qwen3_vl(cache_dir: Path | None = None) -> Path:
    return ensure_built(cache_dir, TINY_QWEN3_VL_FOLDER,
                        _writer(build_tiny_qwen3_vl, QWEN3_VL_CHAT_TEMPLATE, QWEN3_VL_VIDEO_PREPROCESSOR))


def ensure_tiny_qwen3_5(cache_dir: Path | None = None) -> Path:
    return ensure_built(cache_dir, TINY_QWEN3_5_FOLDER,
                        _writer(build_tiny_qwen3_5, QWEN3_5_CHAT_TEMPLATE, QWEN3_VL_VIDEO_PREPROCESSOR,
                                special_tokens=QWEN3_5_SPECIAL_TOKENS))


def ensure_tiny_qwen3_5_moe(cache_dir: Path | None = None) -> Path:
    return ensure_built(cache_dir, TINY_QWEN3_5_MOE_FOLDER,
                        _writer(build_tiny_qwen3_5_moe, QWEN3_5_CHAT_TEMPLATE, QWEN3_VL_VIDEO_PREPROCESSOR,
                                special_tokens=QWEN3_5_SPECIAL_TOKENS))


def ensure_tiny_qwen3_vl_moe(cache_dir: Path | None = None) -> Path:
    return ensure_built(cache_dir, TINY_QWEN3_VL_MOE_FOLDER,
                        _writer(build_tiny_qwen3_vl_moe, QWEN3_VL_CHAT_TEMPLATE, QWEN3_VL_VIDEO_PREPROCESSOR))
