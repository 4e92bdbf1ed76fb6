"""Random-weight models of real shapes, built from configs on the target device.

Weights are random, so nothing here measures accuracy; speed and memory do not
depend on the weights' values. The tokenizer, chat template and preprocessing
come from the built-in tiny model's folder (its token ids fit every vocabulary).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adatp_core.models.attention_hook import register_attention, wrapped_attention_name  # noqa: E402
from adatp_core.models.llava_onevision import LlavaOnevisionAdapter  # noqa: E402
from adatp_core.models.loader import VideoLLM, load_video_llm  # noqa: E402
from adatp_core.models.tiny import ensure_tiny_model  # noqa: E402

SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                     image_size=384, patch_size=14, vision_use_head=False)


@dataclass(frozen=True)
class Shape:
    name: str
    text: dict
    vision: dict


SHAPES = {
    "0.5b": Shape("LLaVA-OV-0.5B", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                        tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768),
                  SIGLIP_SO400M),
    "7b": Shape("LLaVA-OV-7B", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                    num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                    tie_word_embeddings=False, rope_theta=1e6, max_position_embeddings=32768),
                SIGLIP_SO400M),
}


def build(shape: str, device: str, dtype: torch.dtype, attention: str = "sdpa") -> VideoLLM:
    """The tiny model (loaded from its folder), or a random model of a real shape."""
    folder = ensure_tiny_model()
    if shape == "tiny":
        return load_video_llm(folder, device=device, dtype=dtype, attention=attention)
    from transformers import (AutoTokenizer, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              Qwen2Config, SiglipVisionConfig)

    spec = SHAPES[shape]
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**spec.vision), text_config=Qwen2Config(**spec.text),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full")
    register_attention(attention)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration._from_config(
            config, dtype=dtype,
            attn_implementation={"text_config": wrapped_attention_name(attention), "vision_config": attention,
                                 "": attention}).eval()
    model.generation_config.eos_token_id = None  # random weights: always generate the full length
    model.generation_config.pad_token_id = 0
    adapter = LlavaOnevisionAdapter(model, tokenizer, folder)
    return VideoLLM(model=model, tokenizer=tokenizer, adapter=adapter, name=spec.name, path=str(folder),
                    compute_device=torch.device(device), dtype=dtype, attention=attention)
