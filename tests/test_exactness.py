"""The spec's exactness invariants, float32 on the tiny model:

- retention 1.0 reproduces stock transformers (greedy tokens and logits);
- any keep set equals a full-sequence run with the dropped keys masked at layers >= K;
- the layer K-1 scores equal eager attention's probabilities.
"""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTION
from reference import masked_reference, stock_video_kwargs

from adatp_core.attention import extract_attention
from adatp_core.generate import SamplingConfig, generate_answer
from adatp_core.prune import prune_tokens

TOL = 1e-5
STEPS = 8


@pytest.fixture(scope="module")
def masked_tolerance():
    """Float32 tolerance of the masked-reference comparison (two different orders of float32 sums)."""
    return TOL


@pytest.fixture(scope="module")
def states(tiny, frames):
    return {k: extract_attention(tiny, frames, QUESTION, layer=k) for k in (0, 1, 2, 3)}


@pytest.mark.parametrize("layer", [0, 2])
def test_retention_one_reproduces_stock_generate(tiny_on, stock_on, frames, states, device, layer):
    """On every device present, against stock generate on the same device (the
    default decode mode: static CUDA graphs on CUDA)."""
    model, stock = tiny_on(device), stock_on(device)
    if device.type == "cpu":
        state = prune_tokens(states[layer], retention=1.0)
    else:
        state = prune_tokens(extract_attention(model, frames, QUESTION, layer=layer), retention=1.0)
    assert state.keep.numel() == state.num_visual
    ours = generate_answer(state, SamplingConfig(max_new_tokens=STEPS), return_logits=True)

    ids = state.prompt.input_ids[None].to(device)
    with torch.inference_mode():
        out = stock.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             **stock_video_kwargs(model, state.prompt, frames),
                             max_new_tokens=STEPS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    eos = set(model.adapter.eos_token_ids)
    stock_tokens = [t for t in out.sequences[0, ids.shape[1]:].tolist() if t not in eos]
    assert list(ours.token_ids) == stock_tokens
    assert len(set(stock_tokens)) > 1, "the tiny model repeats one token: the test would prove little"
    stock_logits = torch.cat(out.logits).float()[: ours.logits.shape[0]].to(ours.logits.device)
    assert ours.logits.shape[0] == STEPS
    err = (ours.logits - stock_logits).abs().max().item()
    print(f"{model.model.config.model_type} K={layer}: max logit error vs stock generate() {err:.3g}")
    assert err < TOL, f"max logit error {err}"


def test_unpruned_state_is_the_vanilla_model(tiny, states):
    """GenerateAnswer on a state no PruneTokens touched keeps every token."""
    vanilla = generate_answer(states[2], SamplingConfig(max_new_tokens=STEPS), return_logits=True)
    full = generate_answer(prune_tokens(states[2], 1.0), SamplingConfig(max_new_tokens=STEPS), return_logits=True)
    assert vanilla.token_ids == full.token_ids
    assert torch.equal(vanilla.logits, full.logits)


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_keep_sets_match_masked_reference(tiny, stock, frames, states, layer, seed, masked_tolerance):
    state = states[layer]
    gen = torch.Generator().manual_seed(seed)
    n_keep = int(torch.randint(1, state.num_visual, (1,), generator=gen))
    keep = torch.sort(torch.randperm(state.num_visual, generator=gen)[:n_keep]).values
    pruned = state.evolve(keep=keep)
    ours = generate_answer(pruned, SamplingConfig(max_new_tokens=STEPS), return_logits=True)
    assert len(ours.token_ids) >= 5, "need at least 5 decode steps to compare"

    # Reference: the full prompt plus the generated tokens, dropped keys masked.
    ref, vanilla = masked_reference(stock, tiny, state, frames, ours.token_ids, keep)
    n = state.prompt.length
    ref_steps = ref[n - 1: n - 1 + ours.logits.shape[0]]
    err = (ours.logits - ref_steps).abs().max().item()
    print(f"{tiny.model.config.model_type} K={layer} seed={seed}: max logit error vs masked reference {err:.3g}")
    assert err < masked_tolerance, f"max logit error {err} (prefill + {ours.logits.shape[0] - 1} decode steps)"
    # and pruning really changed the model's output, so the comparison has teeth
    assert (vanilla[n - 1] - ours.logits[0]).abs().max().item() > 1e-3


@pytest.mark.parametrize("layer", [1, 2, 3])
@pytest.mark.parametrize("query", ["text", "last"])
def test_scores_match_eager_attention(tiny, stock_eager, frames, states, layer, query):
    state = states[layer] if query == "text" else extract_attention(tiny, frames, QUESTION, layer, query="last")
    ids = state.prompt.input_ids[None]
    with torch.inference_mode():
        out = stock_eager(input_ids=ids, attention_mask=torch.ones_like(ids),
                          **stock_video_kwargs(tiny, state.prompt, frames), output_attentions=True)
    probs = out.attentions[layer - 1][0]  # [H, L, L] at layer index K-1
    rows = slice(state.prompt.after_video, None) if query == "text" else slice(-1, None)
    expected = probs[:, rows][:, :, state.prompt.visual_positions].mean(dim=(0, 1))
    err = (state.scores - expected).abs().max().item()
    assert err < TOL
    assert state.scores.std() > 0


def test_layer_zero_scores_are_text_relevance(states):
    assert torch.equal(states[0].scores, states[0].relevance)
    assert states[0].past_kv == ()


def test_kv_cache_layout_after_pruning(states):
    """Layers < K hold the full prompt; layers >= K only the kept tokens."""
    state = prune_tokens(states[2], 0.25)
    ans = generate_answer(state, SamplingConfig(max_new_tokens=3))
    lengths = ans.stats["kv_lengths"]
    n_new = ans.stats["new_tokens"] - 1  # the last token is never fed back
    full = state.prompt.length + n_new
    kept = state.prompt.length - state.num_visual + state.keep.numel() + n_new
    assert lengths[:2] == (full, full)
    assert set(lengths[2:]) == {kept}
