"""FLOPs accounting, in the two conventions of the spec.

1. ``fastvid_flops``: comparable with the literature (FastVID's convention):
   LLM only, video tokens only, multiply-accumulates of the matrix products; per
   dense full-attention layer with n video tokens
   2nD^2 + 2nD(h_kv d_head) + 2n^2 D + 3nDD'
   (written with the real projection widths, so q/o use h d_head, which is D in
   every dense family here).
2. ``prefill_flops``: the honest total of the prefill in FLOPs (2 x MACs), text
   tokens, the AdaTP scoring and the vision encoder included. Pruning cannot
   reduce the vision encoder's share, and this figure shows it.

Hybrid and MoE language models (Qwen3.5/3.6, Qwen3-VL-MoE) are counted layer by
layer from ``text_config.layer_types`` and the MoE fields (``LLMShape.from_config``):

- A full-attention layer with ``attn_output_gate`` (every Qwen3.5 one) projects q
  and a gate of the same width (q_proj is D -> 2 h d_head); the honest total adds
  the sigmoid gate's 2 FLOPs per element. Partial rotary is elementwise and left
  out, as RoPE is for every family.
- A Gated DeltaNet (``linear_attention``) layer has no n^2 term:
  in_proj_qkv D -> 2 k_dim + v_dim, in_proj_z D -> v_dim, in_proj_b and in_proj_a
  D -> H_v, out_proj v_dim -> D; the depthwise causal conv1d, kernel K over
  conv_dim = 2 k_dim + v_dim channels (K MACs per channel and token); the chunked
  gated delta rule (``LinearAttention.rule_macs``, per token and value head); and,
  in the honest total only, the gated RMSNorm (6 FLOPs per element of v_dim).
- An MoE block is counted by its active parameters per token
  (``MoE.active_params``): the router D -> E, top-k experts of 3 matrices each, and
  the shared expert with its D -> 1 sigmoid gate where there is one.
"""

from __future__ import annotations

from dataclasses import dataclass

TERA = 1e12
FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"
# Text configs whose attention always projects an output gate with q (transformers'
# Qwen3_5Attention doubles q_proj whatever the config says).
GATED_ATTENTION_TYPES = frozenset({"qwen3_5_text", "qwen3_5_moe_text"})


@dataclass(frozen=True)
class LinearAttention:
    """A Gated DeltaNet token mixer (transformers' ``Qwen3_5GatedDeltaNet``).

    The chunked gated delta rule (``torch_chunk_gated_delta_rule``, chunk C = 64;
    the fused kernels do the same products) works per value head, with queries and
    keys repeated to the H_v value heads, of widths d_k and d_v. Per chunk of C
    tokens and per head it forms
      - k_beta K^T and Q K^T, the intra-chunk products:   2 C^2 d_k MACs,
      - two unit-triangular solves (values and decayed keys): C^2 (d_v + d_k) / 2,
      - the read of the state S [d_k, d_v] by the decayed keys and by the queries:
        2 C d_k d_v,
      - the intra-chunk attention times the new values:  C^2 d_v,
      - the state update K^T V_new:                      C d_k d_v.
    Divided by C, the cost per token is linear in n:
      C (2 d_k + d_v) + C (d_k + d_v) / 2 + 3 d_k d_v   MACs per value head.
    (The decay of S once per chunk, d_k d_v / C, and the gates' elementwise work are
    left out; the padding of the last chunk to C tokens is not counted.)
    """

    key_heads: int
    value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int
    chunk: int = 64

    @property
    def key_dim(self) -> int:
        return self.key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    def params(self, hidden: int) -> int:
        """Weights one token meets: the four input projections, the conv and out_proj."""
        projections = hidden * (self.conv_dim + self.value_dim + 2 * self.value_heads) + self.value_dim * hidden
        return projections + self.conv_dim * self.conv_kernel

    def rule_macs(self) -> float:
        """MACs of the chunked gated delta rule per token and value head (class docstring)."""
        c, dk, dv = self.chunk, self.key_head_dim, self.value_head_dim
        return c * (2 * dk + dv) + c * (dk + dv) / 2 + 3 * dk * dv

    def state_elements(self) -> tuple[int, int]:
        """(conv state [conv_dim, kernel], recurrent state [H_v, d_k, d_v]) of one layer."""
        return self.conv_dim * self.conv_kernel, self.value_heads * self.key_head_dim * self.value_head_dim


@dataclass(frozen=True)
class MoE:
    """A sparse MoE block: a softmax top-k router over ``experts`` SwiGLU experts,
    plus a shared expert behind a sigmoid gate when ``shared_intermediate`` > 0."""

    experts: int
    top_k: int
    intermediate: int
    shared_intermediate: int = 0

    def active_params(self, hidden: int) -> int:
        """Parameters one token uses: router, top-k experts, shared expert and its gate."""
        shared = 3 * hidden * self.shared_intermediate + hidden if self.shared_intermediate else 0
        return hidden * self.experts + self.top_k * 3 * hidden * self.intermediate + shared


@dataclass(frozen=True)
class LLMShape:
    layers: int
    hidden: int  # D
    intermediate: int  # D' (dense MLP layers)
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layer_types: tuple[str, ...] = ()  # empty: every layer is full attention
    gated_attention: bool = False  # q_proj also projects an output gate (Qwen3.5)
    linear: LinearAttention | None = None  # the linear-attention layers' mixer
    moe: MoE | None = None
    moe_layers: tuple[int, ...] = ()  # layers whose MLP is ``moe``

    @classmethod
    def from_config(cls, cfg) -> "LLMShape":
        if getattr(cfg, "text_config", None) is not None:
            cfg = cfg.get_text_config()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        layers = cfg.num_hidden_layers
        types = tuple(getattr(cfg, "layer_types", None) or ())
        linear = None
        if LINEAR_ATTENTION in types:
            linear = LinearAttention(cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                     cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim)
        else:
            types = ()  # full (or sliding-window, counted as full) attention everywhere
        moe, moe_layers = None, ()
        if getattr(cfg, "num_experts", 0):
            moe = MoE(cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
                      getattr(cfg, "shared_expert_intermediate_size", 0) or 0)
            # Qwen3-VL-MoE's rule (mlp_only_layers, decoder_sparse_step); Qwen3.5-MoE has neither: all layers
            dense = set(getattr(cfg, "mlp_only_layers", None) or ())
            step = getattr(cfg, "decoder_sparse_step", None) or 1
            moe_layers = tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)
        gated = cfg.model_type in GATED_ATTENTION_TYPES or bool(getattr(cfg, "attn_output_gate", False))
        return cls(layers, cfg.hidden_size, getattr(cfg, "intermediate_size", None) or 0,
                   cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, cfg.vocab_size,
                   layer_types=types, gated_attention=gated, linear=linear, moe=moe, moe_layers=moe_layers)

    def kind(self, index: int) -> str:
        """The token mixer of layer ``index``: "full_attention" or "linear_attention"."""
        return self.layer_types[index] if self.layer_types and self.layer_types[index] == LINEAR_ATTENTION \
            else FULL_ATTENTION

    def full_attention_layers(self) -> list[int]:
        return [i for i in range(self.layers) if self.kind(i) == FULL_ATTENTION]

    def mixer_params(self, index: int) -> int:
        """Weights of layer ``index``'s token mixer that one token meets."""
        if self.kind(index) == LINEAR_ATTENTION:
            return self.linear.params(self.hidden)
        q = self.heads * self.head_dim
        return self.hidden * (q * (2 if self.gated_attention else 1) + 2 * self.kv_heads * self.head_dim) \
            + q * self.hidden

    def mlp_params(self, index: int) -> int:
        """Weights of layer ``index``'s MLP that one token meets (active ones for MoE)."""
        if self.moe is not None and index in self.moe_layers:
            return self.moe.active_params(self.hidden)
        return 3 * self.hidden * self.intermediate

    def layer_params(self, index: int) -> int:
        return self.mixer_params(index) + self.mlp_params(index)


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


def fastvid_layer_flops(shape: LLMShape, n: int, index: int = 0) -> float:
    """FastVID's convention (MACs) for layer ``index`` on n tokens: the matrix products'
    weights, plus the non-causal n^2 attention of a full-attention layer, or the
    delta rule's per-token cost of a linear one."""
    macs = n * shape.layer_params(index)
    if shape.kind(index) == LINEAR_ATTENTION:
        return macs + n * shape.linear.value_heads * shape.linear.rule_macs()
    return macs + 2 * n * n * shape.heads * shape.head_dim


def fastvid_flops(shape: LLMShape, n_video: int, n_kept: int, layer: int) -> float:
    """Literature convention: layers < K see all n_video tokens, layers >= K n_kept."""
    return sum(fastvid_layer_flops(shape, n_video if i < layer else n_kept, i) for i in range(shape.layers))


def llm_layer_flops(shape: LLMShape, n: int, index: int = 0) -> float:
    """Decoder layer ``index`` on n tokens (causal attention), in FLOPs."""
    flops = 2 * n * shape.layer_params(index)
    if shape.kind(index) == LINEAR_ATTENTION:
        lin = shape.linear
        return flops + 2 * n * lin.value_heads * lin.rule_macs() + 6 * n * lin.value_dim  # + the gated RMSNorm
    q = shape.heads * shape.head_dim
    attention = 2 * 2 * q * (n * (n + 1) // 2)
    gate = 2 * n * q if shape.gated_attention else 0  # sigmoid(gate) * output
    return flops + attention + gate



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
    layers = sum(llm_layer_flops(llm, n_full if i < layer else n_kept, i) for i in range(llm.layers))
    return layers + scoring + 2 * llm.hidden * llm.vocab


def cache_bytes(llm: LLMShape, n_full: int, n_kept: int, layer: int, kv_bytes: int = 2,
                conv_bytes: int = 2, state_bytes: int = 4) -> dict:
    """Memory the prefill leaves for decoding (batch 1): keys and values of the
    full-attention layers (n_full tokens in layers < K, n_kept in layers >= K), and
    each linear layer's fixed conv state [conv_dim, kernel] (model dtype) and
    recurrent state [H_v, d_k, d_v] (float32 by default: the torch fallback and the
    fused kernels keep it so). Pruning shrinks only the first."""
    per_token = 2 * llm.kv_heads * llm.head_dim * kv_bytes
    kv = sum(per_token * (n_full if i < layer else n_kept) for i in llm.full_attention_layers())
    state = 0
    if llm.linear is not None:
        conv, recurrent = llm.linear.state_elements()
        state = (llm.layers - len(llm.full_attention_layers())) * (conv * conv_bytes + recurrent * state_bytes)
    return {"kv": kv, "state": state, "total": kv + state}


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
