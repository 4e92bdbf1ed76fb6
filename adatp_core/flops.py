"""FLOPs accounting, in the two conventions of the spec.

1. ``fastvid_flops``: comparable with the literature (FastVID's convention):
   LLM only, video tokens only; per layer with n video tokens
   2nD^2 + 2nD(h_kv d_head) + 2n^2 D + 3nDD'.
2. ``prefill_flops``: the honest total of the prefill in FLOPs (2 x MACs), text
   tokens, the AdaTP scoring and the vision encoder included. Pruning cannot
   reduce the vision encoder's share, and this figure shows it.
"""

from __future__ import annotations

from dataclasses import dataclass

TERA = 1e12


@dataclass(frozen=True)
class LLMShape:
    layers: int
    hidden: int  # D
    intermediate: int  # D'
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, cfg) -> "LLMShape":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size,
                   cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, cfg.vocab_size)


@dataclass(frozen=True)
class VisionShape:
    """A ViT run once per frame (or temporal patch), then a projector into the LLM.

    LLaVA-OV: SigLIP, full attention, a 2-layer MLP projector on every patch.
    Qwen2.5-VL: window attention except in ``full_layers`` layers, SwiGLU MLPs
    (mlp_matrices 3), and a merger MLP on each 2x2 group of patches.
    Qwen3-VL: full attention, and DeepStack's extra mergers (projectors > 1).
    """

    layers: int  # encoder layers actually run
    hidden: int
    intermediate: int
    patches: int  # tokens per frame inside the encoder
    patch_dim: int  # 3 * patch * patch (x temporal patch)
    projector_out: int  # the LLM's D
    mlp_matrices: int = 2  # 2: fc1/fc2, 3: gated (SwiGLU)
    window: int = 0  # tokens per attention window in windowed layers (0: every layer is full)
    full_layers: int | None = None  # layers with full attention (None: all)
    projector_tokens: int | None = None  # tokens entering the projector (None: patches)
    projector_in: int | None = None  # their width (None: hidden)
    projectors: int = 1


# Qwen2-7B, the LLM of LLaVA-OneVision-7B (the spec's reference figures).
QWEN2_7B = LLMShape(layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4,
                    head_dim=128, vocab=152064)


def fastvid_layer_flops(shape: LLMShape, n: int) -> float:
    d, kv = shape.hidden, shape.kv_heads * shape.head_dim
    return 2 * n * d * d + 2 * n * d * kv + 2 * n * n * d + 3 * n * d * shape.intermediate


def fastvid_flops(shape: LLMShape, n_video: int, n_kept: int, layer: int) -> float:
    """Literature convention: layers < K see all n_video tokens, layers >= K n_kept."""
    return (layer * fastvid_layer_flops(shape, n_video)
            + (shape.layers - layer) * fastvid_layer_flops(shape, n_kept))


def llm_layer_flops(shape: LLMShape, n: int) -> float:
    """One decoder layer on n tokens with causal attention, in FLOPs."""
    d, hd = shape.hidden, shape.head_dim
    projections = 2 * n * d * (2 * shape.heads * hd + 2 * shape.kv_heads * hd)
    attention = 2 * 2 * shape.heads * hd * (n * (n + 1) // 2)
    mlp = 2 * 3 * n * d * shape.intermediate
    return projections + attention + mlp


def vision_flops(shape: VisionShape, frames: int) -> float:
    """FLOPs of ``frames`` encoder passes (frames, or temporal patches) and the projector."""
    p, d = shape.patches, shape.hidden
    full = shape.layers if shape.full_layers is None or not shape.window else shape.full_layers
    span = min(shape.window, p) if shape.window else p
    dense = 2 * p * 4 * d * d + 2 * shape.mlp_matrices * p * d * shape.intermediate
    attention = full * 2 * 2 * p * p * d + (shape.layers - full) * 2 * 2 * p * span * d
    embed = 2 * p * shape.patch_dim * d
    n_in = shape.projector_tokens if shape.projector_tokens is not None else p
    width = shape.projector_in if shape.projector_in is not None else d
    out = shape.projector_out
    hidden = width if shape.projector_in is not None else out
    projector = shape.projectors * 2 * n_in * (width * hidden + hidden * out)
    return frames * (embed + shape.layers * dense + attention + projector)


def prefill_flops(llm: LLMShape, n_full: int, n_kept: int, layer: int, n_query: int = 0) -> float:
    """Honest LLM prefill: layers < K on the n_full prompt tokens, layers >= K on
    n_kept, the scoring of n_query rows at layer K-1, and the LM head on the last token."""
    scoring = 2 * 2 * llm.heads * llm.head_dim * n_query * n_full if layer > 0 else 0
    return (layer * llm_layer_flops(llm, n_full) + (llm.layers - layer) * llm_layer_flops(llm, n_kept)
            + scoring + 2 * llm.hidden * llm.vocab)


def flops_summary(model, prompt, keep_count: int, layer: int) -> dict:
    """Both conventions for one query; the keys go into a state's stats."""
    adapter = model.adapter
    llm = LLMShape.from_config(adapter.text_model.config)
    n_video = len(prompt.visual_positions)
    n_text = prompt.length - n_video
    n_query = prompt.length - prompt.after_video
    lit_full = fastvid_flops(llm, n_video, n_video, 0)
    lit = fastvid_flops(llm, n_video, keep_count, layer)
    vision = adapter.vision_flops(prompt)
    total_full = vision + prefill_flops(llm, prompt.length, prompt.length, 0)
    total = vision + prefill_flops(llm, prompt.length, n_text + keep_count, layer, n_query)
    return {
        "flops_ratio": lit / lit_full,
        "flops_video_llm_T": lit / TERA,
        "flops_video_llm_vanilla_T": lit_full / TERA,
        "flops_total_T": total / TERA,
        "flops_total_vanilla_T": total_full / TERA,
        "flops_total_ratio": total / total_full,
        "flops_vision_T": vision / TERA,
    }
