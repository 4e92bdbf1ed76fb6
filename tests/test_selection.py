"""Steps 1 and 3-5 as pure functions: segmentation, shares, pick order, budgets."""

from __future__ import annotations

import math
import random

import pytest
import torch

from adatp_core.debias import pick_order, segment_shares
from adatp_core.errors import AdaTPInputError
from adatp_core.prune import allocate_budgets, select_tokens, token_budget
from adatp_core.segment import segment_frames


# -- step 1: segmentation ------------------------------------------------------------
def _blocks(lengths, dim=16, noise=0.01, seed=0):
    """Features of consecutive blocks: orthogonal base vector per block + noise."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for b, n in enumerate(lengths):
        base = torch.zeros(dim)
        base[b] = 1.0
        rows.append(base + noise * torch.randn(n, dim, generator=gen))
    return torch.cat(rows)


def test_segments_follow_known_boundaries():
    feats = _blocks([3, 3, 2])
    assert segment_frames(feats, 0.95) == ((0, 2), (3, 5), (6, 7))


def test_segment_cut_only_below_threshold():
    # cos(g0, g1) = 0.8 exactly, cos(g1, g2) = 0.6
    g = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    assert segment_frames(g, 0.8) == ((0, 1), (2, 2))  # s_0 == tau: no cut; s_1 = 0.6 < tau: cut
    assert segment_frames(g, 0.81) == ((0, 0), (1, 1), (2, 2))
    assert segment_frames(g, -1.0) == ((0, 2),)


def test_single_frame_is_one_segment():
    assert segment_frames(torch.randn(1, 8), 0.95) == ((0, 0),)


@pytest.mark.parametrize("bad", [1.5, -1.01, float("nan")])
def test_segment_threshold_out_of_range(bad):
    with pytest.raises(AdaTPInputError, match="threshold"):
        segment_frames(torch.randn(3, 4), bad)


# -- step 3: shares -------------------------------------------------------------------
def test_shares_formula():
    r = torch.tensor([0.1, 0.1, 0.5, 0.5, 0.3, 0.3, 0.3, 0.3])
    segments = ((0, 1), (2, 3), (4, 7))
    pi = segment_shares(r, segments, beta=1.0)
    # R = (0.1, 0.5, 0.3), z = (0, 1, 0.5), w = (2*1, 2*2, 4*1.5)
    w = torch.tensor([2.0, 4.0, 6.0], dtype=torch.float64)
    assert torch.allclose(pi, w / w.sum())
    assert math.isclose(float(pi.sum()), 1.0)


def test_shares_equal_relevance_are_proportional_to_length():
    pi = segment_shares(torch.full((6,), 0.2), ((0, 0), (1, 5)), beta=3.0)
    assert torch.allclose(pi, torch.tensor([1 / 6, 5 / 6], dtype=torch.float64))


# -- step 4: local order ----------------------------------------------------------------
def test_local_order_takes_each_cell_once_before_any_cell_twice():
    grid = (3, 2, 2)  # 3 frames of 2x2 cells, one segment
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(12, generator=gen)
    order = pick_order(scores, grid, ((0, 2),), max_per_position=1)
    first_round = order[:4] % 4
    assert sorted(first_round.tolist()) == [0, 1, 2, 3]
    # within the first round, higher scores first
    assert torch.all(scores[order[:4]][:-1] >= scores[order[:4]][1:])
    # each cell's first pick is its best token
    for idx in order[:4].tolist():
        cell = idx % 4
        same_cell = torch.arange(cell, 12, 4)
        assert scores[idx] == scores[same_cell].max()


def test_local_order_with_m2_allows_two_per_cell_per_round():
    grid = (4, 1, 2)
    scores = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4])  # cell 0 always wins
    order = pick_order(scores, grid, ((0, 3),), max_per_position=2)
    assert order.tolist()[:4] == [0, 2, 7, 5]  # cell 0 twice, then cell 1 twice (by score)


def test_order_is_per_segment_and_deterministic_on_ties():
    grid = (2, 1, 3)
    scores = torch.zeros(6)  # all tied: lower index first
    order = pick_order(scores, grid, ((0, 0), (1, 1)))
    assert order.tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.equal(order, pick_order(scores, grid, ((0, 0), (1, 1))))


# -- step 5: budgets ----------------------------------------------------------------
def test_budget_rounding():
    assert token_budget(0.25, 6272) == 1568
    assert token_budget(1.0, 10) == 10
    assert token_budget(0.05, 10) == 1  # round(0.5) goes up
    assert token_budget(0.01, 10) == 1  # never 0


@pytest.mark.parametrize("bad", [0, -0.1, 1.01, float("nan"), "x"])
def test_bad_retention(bad):
    with pytest.raises(AdaTPInputError, match="retention"):
        token_budget(bad, 10)


def test_budgets_sum_and_caps_random():
    rng = random.Random(0)
    for _ in range(500):
        m = rng.randint(1, 8)
        sizes = [rng.randint(1, 50) for _ in range(m)]
        shares = [rng.random() + 1e-3 for _ in range(m)]
        total = rng.randint(0, sum(sizes))
        budgets = allocate_budgets(total, shares, sizes)
        assert sum(budgets) == total
        assert all(0 <= b <= s for b, s in zip(budgets, sizes))


def test_budgets_largest_remainder_without_caps():
    # raw = 10 * (0.45, 0.35, 0.2) = (4.5, 3.5, 2.0): floors (4, 3, 2), one leftover unit;
    # both 0.5 remainders tie, and the lower index wins
    assert allocate_budgets(10, [0.45, 0.35, 0.2], [100, 100, 100]) == (5, 3, 2)


def test_budgets_cap_and_redistribute():
    # raw (90, 5, 5): segment 0 capped at 10; its 80 go 40/40 to the others
    assert allocate_budgets(100, [0.9, 0.05, 0.05], [10, 100, 100]) == (10, 45, 45)
    # repeated redistribution: the second round caps segment 1 too
    assert allocate_budgets(60, [0.8, 0.15, 0.05], [10, 12, 100]) == (10, 12, 38)


def test_select_takes_first_budget_of_each_segment():
    order = torch.tensor([2, 0, 1, 5, 3, 4])
    keep = select_tokens(order, [3, 3], (2, 1))
    assert keep.tolist() == [0, 2, 5]


# -- on the scores' device ----------------------------------------------------------------
def _random_selection_case(seed=3):
    gen = torch.Generator().manual_seed(seed)
    grid = (6, 4, 5)
    scores = torch.randint(0, 5, (6 * 4 * 5,), generator=gen).float()  # many ties
    segments = ((0, 1), (2, 4), (5, 5))
    return grid, scores, segments


@pytest.mark.parametrize("m", [None, 1, 2])
def test_selection_on_the_scores_device_equals_cpu(device, m):
    grid, scores, segments = _random_selection_case()
    sizes = [(last - first + 1) * 20 for first, last in segments]
    budgets = allocate_budgets(37, [0.5, 0.3, 0.2], sizes)
    order = pick_order(scores.to(device), grid, segments, m)
    keep = select_tokens(order, sizes, budgets)
    assert order.device.type == keep.device.type == device.type
    expected = pick_order(scores, grid, segments, m)
    assert torch.equal(order.cpu(), expected)
    assert torch.equal(keep.cpu(), select_tokens(expected, sizes, budgets))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_selection_never_waits_for_the_device():
    """No host sync in the pick order and the keep set (CUDA's sync debug mode raises on one)."""
    grid, scores, segments = _random_selection_case()
    scores = scores.cuda()
    sizes = [(last - first + 1) * 20 for first, last in segments]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        select_tokens(pick_order(scores, grid, segments, 1), sizes, (10, 20, 7))
    finally:
        torch.cuda.set_sync_debug_mode("default")
