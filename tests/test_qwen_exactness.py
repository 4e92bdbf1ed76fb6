"""The spec's exactness invariants (tests/test_exactness.py), on the tiny Qwen2.5-VL and Qwen3-VL,
and the keep-set invariant at K = 0..3 in float64 (DeepStack adds features after layers 0..2)."""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTION
from qwen_fixtures import *  # noqa: F401,F403  (tiny, stock, frames: the Qwen models)
from reference import masked_reference
from test_exactness import *  # noqa: F401,F403  (the same tests)

from adatp_core.attention import extract_attention
from adatp_core.generate import SamplingConfig, generate_answer


@pytest.fixture(scope="module")
def masked_tolerance():
    """Measured float32 errors against the masked reference are 0.9e-5 to 1.6e-5 here, on
    logits of magnitude ~7 (2e-6 relative); in float64 the two paths agree exactly
    (test_keep_sets_in_float64_at_every_k)."""
    return 3e-5


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_keep_sets_in_float64_at_every_k(family, tiny_dir, frames, layer):
    """Any keep set equals the full sequence with the dropped keys masked at layers >= K.
    For Qwen3-VL, layers < K see every DeepStack feature and layers >= K only the kept rows'."""
    from conftest import _stock

    from adatp_core.models.loader import load_video_llm

    ours_llm = load_video_llm(tiny_dir, device="cpu", dtype=torch.float64)
    stock = _stock(tiny_dir, "sdpa").double()
    state = extract_attention(ours_llm, frames, QUESTION, layer=layer)
    keep = torch.sort(torch.randperm(state.num_visual, generator=torch.Generator().manual_seed(layer))
                      [: state.num_visual // 3]).values
    ours = generate_answer(state.evolve(keep=keep), SamplingConfig(max_new_tokens=6), return_logits=True)
    ref, vanilla = masked_reference(stock, ours_llm, state, frames, ours.token_ids, keep)
    n = state.prompt.length
    steps = ours.logits.shape[0]
    assert steps >= 4
    err = (ours.logits - ref[n - 1:n - 1 + steps]).abs().max().item()
    print(f"{family} K={layer} float64: max logit error vs masked reference {err:.3g}")
    assert err < 1e-9
    assert (vanilla[n - 1] - ours.logits[0]).abs().max().item() > 1e-3
    if family == "qwen3_vl":
        assert len(state.injections) == 3 and (state.kept_injection() is None) == (layer >= 3)
