"""Issue 30, item 5, where only a GPU can show it: layer K's input rows wait on the host (pinned),
only the kept rows come back to the device, and the answer is the one with the rows on the
device. Skips without CUDA; on a GPU machine: python -m pytest -p no:cacheprovider tests/gpu
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
