"""The batched Qwen vision path fails safe: if it raises, the stock tower recomputes the
features (the same state, the same answer), the stats say so, and the model keeps the
stock tower until it is reloaded. Out of memory and interrupts are never retried.
Both tiny Qwen families, failures forced on the CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTION
from qwen_fixtures import *  # noqa: F401,F403

from adatp_core.attention import extract_attention
from adatp_core.errors import AdaTPEnvironmentError, AdaTPInterrupted
from adatp_core.generate import SamplingConfig, generate_answer
from adatp_core.models import qwen2_5_vl
from adatp_core.models.base import FALLBACK_BATCHED_VISION
from adatp_core.prune import prune_tokens
from adatp_core.report import stats_text


@pytest.fixture
def fresh(tiny_dir):
    """A fresh load per test: a fallback stays on the model it happened to."""
    from adatp_core.models.loader import load_video_llm

    return load_video_llm(tiny_dir, device="cpu", dtype="float32")


def _fail_batched_vision(monkeypatch, error) -> list:
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        raise error

    monkeypatch.setattr(qwen2_5_vl, "vision_forward", failing)
    return calls


def _answer(model, frames, question=QUESTION):
    state = prune_tokens(extract_attention(model, frames, question, layer=2), 0.25)
    return state, generate_answer(state, SamplingConfig(max_new_tokens=6, ignore_eos=True))


def test_a_failing_batched_tower_falls_back_to_the_stock_tower(tiny, fresh, frames, monkeypatch, caplog):
    healthy_state, healthy = _answer(tiny, frames)
    calls = _fail_batched_vision(monkeypatch, RuntimeError("CUDA error: no kernel image is available"))
    with caplog.at_level("WARNING"):
        state, answer = _answer(fresh, frames)
    assert calls == [1]
    assert answer.token_ids == healthy.token_ids
    assert torch.equal(state.keep, healthy_state.keep)
    assert torch.allclose(state.hidden, healthy_state.hidden, atol=1e-5)
    assert "no kernel image" in answer.stats[FALLBACK_BATCHED_VISION]
    assert "Fallback: batched vision attention failed" in stats_text(answer.stats)
    assert "batched vision attention failed" in caplog.text
    # The stock tower stays until a reload: the batched path is not tried again.
    _, again = _answer(fresh, frames, "Which colour is the disc?")
    assert calls == [1] and FALLBACK_BATCHED_VISION in again.stats
    assert FALLBACK_BATCHED_VISION not in healthy.stats


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"),
                                   AdaTPInterrupted("interrupted"), KeyboardInterrupt()],
                         ids=["out-of-memory", "interrupt", "ctrl-c"])
def test_out_of_memory_and_interrupts_in_the_tower_propagate(fresh, frames, monkeypatch, error):
    _fail_batched_vision(monkeypatch, error)
    expected = AdaTPEnvironmentError if isinstance(error, torch.OutOfMemoryError) else type(error)
    with pytest.raises(expected):
        extract_attention(fresh, frames, QUESTION, layer=2)
    assert fresh.adapter.fallbacks == {}
