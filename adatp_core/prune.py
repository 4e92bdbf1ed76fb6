"""Step 5: exact budgets per segment, and the keep set."""

from __future__ import annotations

import math

import torch

from .debias import pick_order
from .errors import AdaTPInputError
from .flops import flops_summary
from .state import AdaTPState
from .timing import timed


def check_retention(retention) -> float:
    try:
        r = float(retention)
    except (TypeError, ValueError) as exc:
        raise AdaTPInputError(f"retention must be a number in (0, 1], got {retention!r}") from exc
    if math.isnan(r) or not 0.0 < r <= 1.0:
        raise AdaTPInputError(
            f"retention {retention} is outside (0, 1]: it is the fraction of visual tokens kept "
            "(0.25 is the default; 1.0 keeps every token).")
    return r


def token_budget(retention: float, num_tokens: int) -> int:
    """B = round(R * N), rounding halves up, and at least 1."""
    return max(1, min(num_tokens, math.floor(check_retention(retention) * num_tokens + 0.5)))


def _largest_remainder(total: int, weights: list[float]) -> list[int]:
    """Integers proportional to ``weights`` that sum to ``total``; leftover units
    go to the largest fractional parts, ties to the lower index."""
    s = sum(weights)
    raw = [total * w / s for w in weights]
    out = [math.floor(x) for x in raw]
    leftover = total - sum(out)
    by_remainder = sorted(range(len(raw)), key=lambda j: (-(raw[j] - out[j]), j))
    for j in by_remainder[:leftover]:
        out[j] += 1
    return out


def allocate_budgets(total: int, shares, sizes) -> tuple[int, ...]:
    """Split ``total`` tokens over segments in proportion to ``shares``.

    shares: [m] positive weights (need not sum to 1). sizes: [m] token counts.
    Budgets are rounded by largest remainder; a budget above its segment's size
    is capped and the excess goes to the uncapped segments in proportion to
    their shares, until nothing is left over. Sum of budgets == total.
    """
    shares = [float(x) for x in shares]
    sizes = [int(x) for x in sizes]
    if len(shares) != len(sizes) or not shares:
        raise AdaTPInputError("shares and sizes must be non-empty and of equal length")
    if any(not math.isfinite(x) or x <= 0 for x in shares):
        raise AdaTPInputError(f"segment shares must be positive, got {shares}")
    if not 0 <= total <= sum(sizes):
        raise AdaTPInputError(f"budget {total} does not fit in {sum(sizes)} tokens")
    budgets = [0] * len(sizes)
    active = list(range(len(sizes)))
    remaining = total
    while remaining > 0:
        alloc = _largest_remainder(remaining, [shares[j] for j in active])
        remaining = 0
        for j, a in zip(active, alloc):
            budgets[j] += a
            if budgets[j] > sizes[j]:
                remaining += budgets[j] - sizes[j]
                budgets[j] = sizes[j]
        active = [j for j in active if budgets[j] < sizes[j]]
    return tuple(budgets)


def select_tokens(order: torch.Tensor, segment_sizes, budgets) -> torch.Tensor:
    """The first b_j tokens of each segment's stretch of ``order``, sorted.

    order: [N] long, as from ``pick_order``. Returns [B] long, ascending, on
    the order's device. Slices are views: no host transfer, one cat, one sort.
    """
    picks, start = [], 0
    for size, b in zip(segment_sizes, budgets):
        picks.append(order[start:start + b])
        start += size
    return torch.sort(torch.cat(picks)).values


def prune_tokens(state: AdaTPState, retention: float = 0.25) -> AdaTPState:
    """Choose the visual tokens to keep: B = round(R * N) split over segments.

    Without GlobalDebias each segment's share is its length; without LocalDebias
    a segment keeps its highest-scoring tokens (FastV inside the segment).
    The order and the keep set are computed on the scores' device, where the
    keep set stays; the budgets are host integers computed from the host shares,
    so nothing is transferred from the device.
    """
    r = check_retention(retention)
    t, h, w = state.grid
    n = state.num_visual
    total = token_budget(r, n)
    sizes = [(last - first + 1) * h * w for first, last in state.segments]
    shares = state.shares if state.shares is not None else torch.tensor(sizes, dtype=torch.float64)
    times: dict[str, float] = {}
    with timed(times, "time_prune", state.scores.device):
        budgets = allocate_budgets(total, shares.tolist(), sizes)
        order = state.order if state.order is not None else pick_order(state.scores, state.grid, state.segments)
        keep = select_tokens(order, sizes, budgets)
    return state.evolve(
        keep=keep, budgets=budgets,
        stats={"retention": r, "tokens_kept": int(keep.numel()), **times,
               **flops_summary(state.model, state.prompt, int(keep.numel()), state.layer)},
    )
