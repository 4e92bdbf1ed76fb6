"""SDPA kernel choice per phase: never cuDNN (a new plan per key length) on CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTION

from adatp_core.sdpa import plan_free_attention


def test_cpu_is_left_alone():
    before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())
    with plan_free_attention("cpu"):
        assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled()) == before


def test_cuda_context_disables_cudnn_and_restores_it():
    """The CUDA branch only flips the process's SDPA flags, so it can be checked anywhere."""
    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
              torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    with plan_free_attention(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
        q = torch.randn(1, 2, 3, 8)  # CPU attention still runs under the flags
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        assert torch.isfinite(out).all()
    after = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
             torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    assert after == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("mode", ["default", "static"])
def test_no_cudnn_attention_in_prefill_or_decoding(tiny_on, frames, mode):
    from torch.profiler import ProfilerActivity, profile

    from adatp_core.attention import extract_attention
    from adatp_core.generate import SamplingConfig, generate_answer
    from adatp_core.prune import prune_tokens

    model = tiny_on("cuda")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        state = prune_tokens(extract_attention(model, frames, QUESTION + " Briefly.", layer=2), 0.25)
        generate_answer(state, SamplingConfig(max_new_tokens=4, ignore_eos=True, decode_mode=mode))
    names = {e.key for e in prof.key_averages()}
    assert not [n for n in names if "cudnn_attention" in n]
    assert [n for n in names if "scaled_dot_product" in n or "flash" in n or "efficient_attention" in n]
