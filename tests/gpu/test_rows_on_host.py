"""Issue 30, where only a GPU can show it: layer K's input rows wait on the host (pinned),
only the kept rows come back to the device, and the answer is the one with the rows on the
device (item 5); a prefill call over a non-empty cache attends as through its dense mask.
Skips without CUDA; on a GPU machine: python -m pytest -p no:cacheprovider tests/gpu
"""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTION

from adatp_core.attention import extract_attention
from adatp_core.generate import SamplingConfig, generate_answer
from adatp_core.pipeline import PipelineConfig, select

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("chunk", [0, 128])
def test_rows_on_the_host_give_the_rows_on_the_device_answer(tiny_on, frames, chunk):
    model = tiny_on("cuda")
    answers = {}
    for rows in ("device", "host"):
        state = extract_attention(model, frames, QUESTION, layer=2, reuse_prefix=False, prefill_chunk=chunk, rows=rows)
        assert state.stats["rows_on"] == ("host" if rows == "host" else "cuda:0")
        if rows == "host":
            assert state.hidden.device.type == "cpu" and state.hidden.is_pinned()
        answers[rows] = generate_answer(select(state, PipelineConfig(retention=0.25)),
                                        SamplingConfig(max_new_tokens=6, ignore_eos=True, decode_mode="default"),
                                        return_logits=True)
    assert answers["host"].token_ids == answers["device"].token_ids
    assert (answers["host"].logits - answers["device"].logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_tail_call_attends_on_cuda_as_through_the_dense_mask(dtype):
    """A prefill call over a non-empty cache on CUDA: flash attention aligned to the bottom right with no
    mask (bf16), or the blocks with the keys copied per head (float32, which flash does not take); both
    against transformers' sdpa under the dense mask."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from adatp_core.hf.attention_hook import TailCausal, causal_tail_mask

    past, n = 700, 300
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, n, 64, device="cuda", dtype=dtype, generator=gen)
    k, v = torch.randn(2, 1, 2, past + n, 64, device="cuda", dtype=dtype, generator=gen)
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True, scaling=0.125)
    ref, _ = sdpa_attention_forward(module, q, k, v, causal_tail_mask(past, n, "cuda"), scaling=0.125)
    got = TailCausal(past, n, 1).attend(q, k, v, 0.125, 4)  # a one-byte budget: blocks of MIN_TAIL_ROWS
    assert got.shape == ref.shape
    assert (got.float() - ref.float()).abs().max().item() < (2e-2 if dtype == torch.bfloat16 else 1e-5)
