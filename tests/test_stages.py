"""The stage functions on a real state from the tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTION

from adatp_core.attention import extract_attention
from adatp_core.debias import global_debias, local_debias
from adatp_core.generate import SamplingConfig, generate_answer
from adatp_core.prune import prune_tokens, token_budget


@pytest.fixture(scope="module")
def state(tiny, frames):
    return extract_attention(tiny, frames, QUESTION, layer=2)


def _fastv(scores, retention):
    b = token_budget(retention, scores.numel())
    top = torch.sort(scores, descending=True, stable=True).indices[:b]
    return torch.sort(top).values


@pytest.mark.parametrize("retention", [0.05, 0.25, 0.5, 0.9])
def test_without_debias_the_selection_is_fastv(state, retention):
    pruned = prune_tokens(state, retention)
    assert torch.equal(pruned.keep, _fastv(state.scores, retention))


def test_fastv_at_k0_is_top_relevance(tiny, frames):
    s0 = extract_attention(tiny, frames, QUESTION, layer=0)
    assert torch.equal(prune_tokens(s0, 0.3).keep, _fastv(s0.relevance, 0.3))


def test_full_adatp_keeps_no_cell_twice_per_segment(state):
    forced = global_debias(state, segment_threshold=1.0)  # every frame its own segment
    assert len(forced.segments) == state.grid[0]
    pruned = prune_tokens(local_debias(forced), 0.25)
    t, h, w = state.grid
    assert sum(pruned.budgets) == pruned.keep.numel() == token_budget(0.25, t * h * w)
    for (first, last), b in zip(pruned.segments, pruned.budgets):
        lo, hi = first * h * w, (last + 1) * h * w
        kept = pruned.keep[(pruned.keep >= lo) & (pruned.keep < hi)]
        assert kept.numel() == b
        if b <= h * w:
            cells = kept % (h * w)
            assert cells.unique().numel() == cells.numel()


def test_local_then_global_recomputes_order_for_new_segments(state):
    a = prune_tokens(local_debias(global_debias(state, 0.5)), 0.3)
    b = prune_tokens(global_debias(local_debias(state), 0.5), 0.3)
    assert torch.equal(a.keep, b.keep)


def test_retention_one_is_identity(state):
    full = prune_tokens(local_debias(global_debias(state)), 1.0)
    assert torch.equal(full.keep, torch.arange(state.num_visual))
    assert full.stats["flops_ratio"] == pytest.approx(1.0)


def test_single_frame_is_one_segment_and_runs(tiny, frames):
    s = extract_attention(tiny, frames[:1], QUESTION)
    s = prune_tokens(local_debias(global_debias(s)), 0.5)
    assert s.segments == ((0, 0),)
    assert s.keep.numel() == token_budget(0.5, s.num_visual)


def test_stages_never_mutate_their_input(state):
    before = (state.scores.clone(), state.segments, state.keep, dict(state.stats))
    pruned = prune_tokens(local_debias(global_debias(state)), 0.25)
    assert pruned is not state
    assert torch.equal(state.scores, before[0]) and state.segments == before[1]
    assert state.keep is None and state.stats == before[3]


def test_two_branches_from_one_state_are_independent(state):
    """An A/B of two retentions from the same ExtractAttention output, in either order."""
    cfg = SamplingConfig(max_new_tokens=6)
    a, b = prune_tokens(state, 0.1), prune_tokens(state, 0.9)
    first = [generate_answer(a, cfg, return_logits=True), generate_answer(b, cfg, return_logits=True)]
    second = [generate_answer(b, cfg, return_logits=True), generate_answer(a, cfg, return_logits=True)]
    assert torch.equal(first[0].logits, second[1].logits)
    assert torch.equal(first[1].logits, second[0].logits)
    assert not torch.equal(first[0].logits[0], first[1].logits[0])


def test_sampling_is_seeded(state):
    cfg = SamplingConfig(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.9, seed=7)
    a = generate_answer(state, cfg).token_ids
    assert a == generate_answer(state, cfg).token_ids
    other = SamplingConfig(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.9, seed=8)
    assert a != generate_answer(state, other).token_ids


def test_eos_stops_generation(tiny, state):
    """Make the chosen first token count as EOS: generation returns nothing."""
    first = generate_answer(state, SamplingConfig(max_new_tokens=1)).token_ids[0]
    cfg = tiny.model.generation_config
    saved = cfg.eos_token_id
    try:
        cfg.eos_token_id = [first]
        assert generate_answer(state, SamplingConfig(max_new_tokens=5)).token_ids == ()
    finally:
        cfg.eos_token_id = saved


def test_on_token_can_interrupt(state):
    seen = []

    class Stop(Exception):
        pass

    def on_token(step, token):
        seen.append(step)
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        generate_answer(state, SamplingConfig(max_new_tokens=20), on_token=on_token)
    assert seen == [0, 1, 2]
    assert len(generate_answer(state, SamplingConfig(max_new_tokens=4)).token_ids) == 4


@pytest.fixture(scope="module")
def static_tolerance():
    """Static steps attend over a power-of-two buffer with a mask: the same terms, summed in
    another order in float32."""
    return 1e-5


@pytest.mark.parametrize("layer, retention", [(2, 0.25), (0, 0.25), (2, 1.0), (1, 0.05)])
def test_static_decoding_matches_default(tiny, frames, layer, retention, static_tolerance):
    """The fixed-shape decode (per-layer buffers and masks; a CUDA graph on GPUs)
    chooses the same greedy tokens, with the same logits, as the default mode."""
    s = prune_tokens(local_debias(global_debias(extract_attention(tiny, frames, QUESTION, layer=layer))), retention)
    default = generate_answer(s, SamplingConfig(max_new_tokens=10, ignore_eos=True), return_logits=True)
    static = generate_answer(s, SamplingConfig(max_new_tokens=10, ignore_eos=True, decode_mode="static"),
                             return_logits=True)
    assert static.token_ids == default.token_ids and len(default.token_ids) == 10
    assert (static.logits - default.logits).abs().max().item() < static_tolerance
    assert static.stats["kv_lengths"] == default.stats["kv_lengths"]
    assert (static.stats["decode_mode"], default.stats["decode_mode"]) == ("static", "default")


def test_keep_set_lives_on_the_scores_device(tiny_on, frames, device):
    """The whole selection runs where the scores are, and the keep set stays there."""
    s = extract_attention(tiny_on(device), frames, QUESTION, layer=2)
    assert s.scores.device.type == device.type
    for pruned in (prune_tokens(s, 0.25), prune_tokens(local_debias(global_debias(s, 0.5)), 0.25)):
        assert pruned.keep.device == s.scores.device
        positions = pruned.kept_positions()
        assert positions.device == s.scores.device
        assert positions.numel() == s.prompt.length - s.num_visual + pruned.keep.numel()
        assert torch.equal(positions, torch.sort(positions).values)
    assert torch.equal(prune_tokens(s, 0.25).keep, _fastv(s.scores, 0.25))
    answer = generate_answer(prune_tokens(s, 0.25), SamplingConfig(max_new_tokens=3, ignore_eos=True))
    assert len(answer.token_ids) == 3
