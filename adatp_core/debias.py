"""Steps 3 and 4: global debiasing (segment budget shares) and local debiasing
(the pick order inside a segment)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import AdaTPInputError
from .segment import frame_cuts, segments_from_cuts
from .state import AdaTPState
from .timing import timed


def text_relevance(visual: torch.Tensor, question_embeds: torch.Tensor) -> torch.Tensor:
    """cos(x_i, e) of every visual token with the mean question embedding.

    visual: [N, D] projected visual tokens; question_embeds: [Q, D] input
    embeddings of the question's own tokens. Both live in the LLM input space.
    Returns [N] float32.
    """
    e = question_embeds.float().mean(dim=0, keepdim=True)
    return F.cosine_similarity(visual.float(), e, dim=-1)


def segment_shares(frame_relevance: torch.Tensor, segments, beta: float = 1.0) -> torch.Tensor:
    """Budget share of each segment: pi_j = w_j / sum(w), w_j = |S_j| (1 + beta z_j).

    frame_relevance: [T] float, r_t. segments: ((first, last), ...) inclusive.
    z_j is the segment's mean relevance min-max normalised to [0, 1] (all 0
    when every segment has the same relevance). Returns [m] float64 summing to 1.
    """
    beta = float(beta)
    if math.isnan(beta) or beta < 0:
        raise AdaTPInputError(f"relevance boost beta={beta} must be >= 0 (1.0 is the default; 0 ignores relevance)")
    r = frame_relevance.double().cpu()
    sizes = torch.tensor([last - first + 1 for first, last in segments], dtype=torch.float64)
    means = torch.stack([r[first:last + 1].mean() for first, last in segments])
    spread = means.max() - means.min()
    z = (means - means.min()) / spread if spread > 0 else torch.zeros_like(means)
    w = sizes * (1 + beta * z)
    return w / w.sum()


def _grouped_rank(groups: torch.Tensor) -> torch.Tensor:
    """For a sequence of group ids, how many earlier items share each item's group.

    groups: [N] long. Returns [N] long on the same device, with no host sync:
    a stable sort by group, then each item's distance to its group's first item.
    """
    perm = torch.sort(groups, stable=True).indices
    ordered = groups.index_select(0, perm)
    idx = torch.arange(len(groups), device=groups.device)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    group_start = torch.where(first, idx, 0).cummax(dim=0).values
    return torch.empty_like(groups).index_copy_(0, perm, idx - group_start)


def segment_ids(grid, segments, device=None) -> torch.Tensor:
    """[N] long on ``device``: the segment of every visual token (tokens are frame-major)."""
    t, h, w = grid
    starts = torch.tensor([first for first, _ in segments[1:]], dtype=torch.long)
    starts = starts.to(device, non_blocking=True)  # host -> device without waiting for the stream
    frame_seg = torch.bucketize(torch.arange(t, device=device), starts, right=True)
    return frame_seg.repeat_interleave(h * w)


def pick_order(scores: torch.Tensor, grid, segments, max_per_position: int | None = None) -> torch.Tensor:
    """Visual token indices in pick order, segment after segment.

    scores: [N] float, a_i. Without ``max_per_position`` a segment's tokens go by
    score (FastV inside the segment). With M = max_per_position, the key is
    (floor(rho_i / M) ascending, a_i descending), rho_i being the token's rank by
    score among the segment's tokens at the same cell (h, w): every cell gives its
    best M tokens before any cell gives more. Ties go to the lower token index.
    Runs on the scores' device with no host sync: stable sorts, and gathers with
    index_select (advanced indexing is parallelised on CPUs and stalls on busy cores).
    Returns [N] long on the scores' device.
    """
    t, h, w = grid
    n = t * h * w
    if scores.shape != (n,):
        raise AdaTPInputError(f"scores must be [{n}] for grid {grid}, got {tuple(scores.shape)}")
    dev = scores.device
    seg = segment_ids(grid, segments, dev)
    by_score = torch.sort(scores.float(), descending=True, stable=True).indices
    keys = []  # sort keys over the score-ordered tokens
    if max_per_position is not None:
        cell = by_score % (h * w)
        rho = _grouped_rank(seg.index_select(0, by_score) * (h * w) + cell)
        keys.append(rho // max_per_position)
    keys.append(seg.index_select(0, by_score))
    perm = torch.arange(n, device=dev)
    for key in keys:  # least significant first; stable sorts keep the score order
        perm = perm.index_select(0, torch.sort(key.index_select(0, perm), stable=True).indices)
    return by_score.index_select(0, perm)


def check_max_per_position(m) -> int:
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise AdaTPInputError(f"max_per_position must be an integer >= 1, got {m!r} (1 is the default)")
    return m


def global_debias(state: AdaTPState, segment_threshold: float = 0.95,
                  relevance_boost: float = 1.0) -> AdaTPState:
    """Segment the video and give each segment a budget share from text relevance.

    If LocalDebias already ran, its order is recomputed for the new segments.
    """
    times: dict[str, float] = {}
    with timed(times, "time_global_debias", state.scores.device):
        cuts = frame_cuts(state.frame_features, segment_threshold)
        t = state.grid[0]
        host = torch.cat([cuts.double(), state.frame_relevance.double().to(cuts.device)]).cpu()  # the one transfer
        segments = segments_from_cuts(host[:t - 1])
        shares = segment_shares(host[t - 1:], segments, relevance_boost)
        order = None
        if state.max_per_position is not None:
            order = pick_order(state.scores, state.grid, segments, state.max_per_position)
    return state.evolve(
        segments=segments, shares=shares, order=order, keep=None, budgets=None,
        stats={"segments": len(segments), "segment_threshold": float(segment_threshold),
               "relevance_boost": float(relevance_boost), **times},
    )


def local_debias(state: AdaTPState, max_per_position: int = 1) -> AdaTPState:
    """Order each segment's tokens so that picks spread over spatial positions."""
    m = check_max_per_position(max_per_position)
    times: dict[str, float] = {}
    with timed(times, "time_local_debias", state.scores.device):
        order = pick_order(state.scores, state.grid, state.segments, m)
    return state.evolve(order=order, max_per_position=m, keep=None, budgets=None,
                        stats={"max_per_position": m, **times})
