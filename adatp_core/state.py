"""The state of one query, passed between stages (the ADATP_STATE socket).

Every stage returns a new ``AdaTPState`` with ``dataclasses.replace`` and never
mutates its input, so one state can feed two branches (an A/B of two
retentions, or vanilla against AdaTP). Tensors in a state are never written to.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .memory import host_buffer
from .models.base import Injection, Prompt
from .places import Places
from .runtime import VideoLLM


@dataclass(frozen=True, eq=False)
class AdaTPState:
    """One query about one video, after ExtractAttention and later stages.

    Documented attributes (stable, used by nodes and users' scripts):
      grid: (T, H, W) visual token grid.
      scores: [N] float32, text->visual attention at layer K-1 (text relevance
          when K = 0), frame-major then row-major.
      segments: tuple of (first_frame, last_frame) pairs, inclusive; one segment
          spanning the video until GlobalDebias sets them.
      keep: sorted [B] long tensor of kept visual token indices, or None before
          PruneTokens (None means every token is kept: the vanilla model). It
          lives on the scores' device (the model's), like ``order``; compare it
          there or move it with ``.cpu()``.
      stats: dict with at least tokens_total, tokens_kept and flops_ratio, plus
          the FLOPs figures and per-stage timings in seconds.

    Internals (for GenerateAnswer):
      hidden: [1, L, D] input hidden states of layer K (the input embeddings when K = 0).
      past_kv: per layer < K, (key, value) [1, Hkv, L, d] of the full prompt.
      position_ids: [1, L] (or [3, 1, L] for M-RoPE), the original positions.
      relevance: [N] float32, cos(x_i, e) of each visual token with the mean
          question embedding; frame_relevance: [T], its per-frame mean.
      frame_features: [T, d_v] L2-normalised global frame features.
      shares: [m] float budget share per segment (None: proportional to length).
      order: [N] long, visual token indices in pick order within each segment,
          segments one after another (None: by score, i.e. FastV per segment).
      max_per_position: LocalDebias' M, or None when no LocalDebias ran.
      budgets: per-segment token budgets chosen by PruneTokens.
      injections: per decoder layer, [N, D] features added to the visual tokens'
          hidden states after that layer (Qwen3-VL's DeepStack); empty for other models.
      prefill_chunk: tokens per forward call of the continuation from K (0: one call),
          as ExtractAttention ran layers < K.
      places: where the encoded rows and layer K's rows were put, and where layers >= K's keys and
          values go (places.Places; its kv None: placed when the answer starts).
    """

    model: VideoLLM
    question: str
    prompt: Prompt
    layer: int
    query_mode: str
    grid: tuple[int, int, int]
    hidden: torch.Tensor
    past_kv: tuple
    position_ids: torch.Tensor
    scores: torch.Tensor
    relevance: torch.Tensor
    frame_relevance: torch.Tensor
    frame_features: torch.Tensor
    segments: tuple[tuple[int, int], ...]
    shares: torch.Tensor | None = None
    order: torch.Tensor | None = None
    max_per_position: int | None = None
    keep: torch.Tensor | None = None
    budgets: tuple[int, ...] | None = None
    stats: dict = field(default_factory=dict)
    injections: tuple = ()
    prefill_chunk: int = 0
    places: Places | None = None

    @property
    def num_visual(self) -> int:
        t, h, w = self.grid
        return t * h * w

    def kept_positions(self) -> torch.Tensor:
        """Sorted sequence positions that go on from layer K: every text token,
        every model extra, and the kept visual tokens. [L'] long, on the keep
        set's device (built there without a host sync); the CPU without one."""
        prompt = self.prompt
        if self.keep is None:
            return torch.arange(prompt.length)
        others = torch.ones(prompt.length, dtype=torch.bool)
        others[prompt.visual_positions] = False
        dev = self.keep.device
        kept_visual = prompt.visual_positions.to(dev, non_blocking=True).index_select(0, self.keep)
        return torch.sort(torch.cat([others.nonzero().squeeze(1).to(dev, non_blocking=True), kept_visual])).values

    def kept_injection(self) -> Injection | None:
        """The injections that the continuation from layer K still applies: those of
        layers >= K, on the kept visual tokens only (rows of ``kept_positions``)."""
        if len(self.injections) <= self.layer:
            return None
        positions = self.kept_positions()  # on the keep set's device (the CPU without one)
        dev = positions.device
        keep = self.keep if self.keep is not None else torch.arange(self.num_visual, device=dev)
        # Both sides of searchsorted on one device: the keep set's, with no host sync.
        visual = self.prompt.visual_positions.to(dev, non_blocking=True).index_select(0, keep)
        rows = torch.searchsorted(positions, visual)
        device = self.injections[self.layer].device
        # Features waiting on the host (Places.encoded) are gathered there (the keep set copied back
        # in step: a copy to the host without a sync could be read unfinished), and come to the device a
        # call's rows at a time (Injection.window); their rows stay on the keep set's device.
        on_host = device.type == "cpu"
        keep = keep.to(device, non_blocking=not on_host)
        if not on_host:
            rows = rows.to(device)
        # Layers < K ran already: their features are not gathered (None; the state may hold None there
        # too: ``attention.below_k_released``), only those of layers >= K.
        return Injection(rows, tuple(_gather(f, keep) if i >= self.layer else None
                                     for i, f in enumerate(self.injections)))

    def evolve(self, stats: dict | None = None, **changes) -> "AdaTPState":
        """A new state with ``changes`` and the stats merged (input untouched)."""
        merged = {**self.stats, **(stats or {})}
        return replace(self, stats=merged, **changes)


def _gather(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows[index] on rows' device; into pinned memory where rows wait pinned on the host (for a GPU),
    so that each call's span of them goes to the device at full speed."""
    if not (rows.device.type == "cpu" and rows.is_pinned()):
        return rows.index_select(0, index)
    out = host_buffer((len(index), *rows.shape[1:]), rows.dtype, pin=True)
    return torch.index_select(rows, 0, index, out=out)
