"""Qwen3.5 and Qwen3.6 (transformers' Qwen3_5ForConditionalGeneration and
Qwen3_5MoeForConditionalGeneration), and the Qwen3-VL MoE models (Qwen3VLMoeForConditionalGeneration).

The video side is Qwen3-VL's (qwen3_vl.py): 16 px patches, 2 frames per temporal patch,
a 2x2 merger, ``<{t:.1f} seconds>`` before each temporal patch, interleaved M-RoPE from
transformers' own ``get_rope_index``. Qwen3.5's vision tower has no DeepStack; the
Qwen3-VL MoE models keep it.

The text model of Qwen3.5 is hybrid: ``text_config.layer_types`` marks each layer
"linear_attention" (Gated DeltaNet: a causal convolution and a recurrent state, no
softmax) or "full_attention" (gated output, partial M-RoPE). What that changes for AdaTP
is family-neutral and lives elsewhere:
- the scores come from a full-attention layer K-1; a K whose layer K-1 is linear moves up
  (``VideoLLMAdapter.resolve_layer``), so the default K = 2 becomes 4 at the usual interval of 4;
- a linear layer's past is a ``LinearState`` in hf/cache.py; from K on it has taken in the kept
  tokens only, in their original order.

MoE layers route each token on its own (router softmax, top-k, renormalised), so pruning
changes no other token's routing. 4/8-bit loading leaves the routers, the shared experts'
gates and the vision side in 16 bits. transformers 5.x holds each layer's experts as fused
3-D parameters, which bitsandbytes does not quantize: they stay in 16 bits too.

Chat templates: whether a Qwen3.5 / Qwen3.6 template thinks by default depends on the size (the
0.8B's defaults to off, the larger ones' to on); chat.py renders every template with
``enable_thinking=False``, the template's own switch, so the prompt is the same either way and
answers start after an empty thinking block.
"""

from __future__ import annotations

from .qwen3_vl import Qwen3VLAdapter

# Suffixes (transformers' skip-module rule) of the MoE routers and the shared experts' gates.
MOE_ROUTERS = ("mlp.gate", "mlp.shared_expert_gate")


class Qwen3_5Adapter(Qwen3VLAdapter):
    model_types = ("qwen3_5",)
    model_class = "Qwen3_5ForConditionalGeneration"
    linear_attention = True


class Qwen3_5MoeAdapter(Qwen3_5Adapter):
    model_types = ("qwen3_5_moe",)
    model_class = "Qwen3_5MoeForConditionalGeneration"
    unquantized_modules = (*Qwen3VLAdapter.unquantized_modules, *MOE_ROUTERS)


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    model_types = ("qwen3_vl_moe",)
    model_class = "Qwen3VLMoeForConditionalGeneration"
    unquantized_modules = (*Qwen3VLAdapter.unquantized_modules, *MOE_ROUTERS)
