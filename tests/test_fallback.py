"""Fast GPU paths fail safe: in auto mode an error anywhere in static decoding (buffers,
capture, a replay) restarts the answer in default decoding from the prefilled state,
with the same tokens, the stats saying so, and auto staying default for that model
until it is reloaded. Out of memory, interrupts and errors of the token callback are
never retried. On CPU static decoding runs its fixed-shape steps without a graph, and
auto resolves to static here (as on CUDA) so the failures can be forced."""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTION

from adatp_core import generate, static_decode
from adatp_core.attention import extract_attention
from adatp_core.debias import global_debias, local_debias
from adatp_core.errors import AdaTPEnvironmentError, AdaTPInputError, AdaTPInterrupted
from adatp_core.generate import SamplingConfig, generate_answer
from adatp_core.models.base import FALLBACK_STATIC_DECODING
from adatp_core.prune import prune_tokens
from adatp_core.report import stats_text

STEPS = 6


@pytest.fixture
def model(tiny_dir):
    """A fresh load per test: a fallback stays on the model it happened to."""
    from adatp_core.models.loader import load_video_llm

    return load_video_llm(tiny_dir, device="cpu", dtype="float32")


@pytest.fixture
def auto_is_static(monkeypatch):
    """auto resolves to static, as it does on CUDA."""
    monkeypatch.setattr(generate, "resolve_decode_mode", lambda mode, device: "static" if mode == "auto" else mode)


def _state(model, frames, question=QUESTION):
    return prune_tokens(local_debias(global_debias(extract_attention(model, frames, question, layer=2))), 0.25)


class Failure:
    """Replaces one static-decoding function with one that raises ``error`` (after ``after`` good calls)."""

    def __init__(self, monkeypatch, owner, name: str, error: BaseException, after: int = 0):
        self.calls, self.error, self.after = 0, error, after
        original = getattr(owner, name)

        def failing(*args, **kwargs):
            self.calls += 1
            if self.calls > self.after:
                raise self.error
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, failing)


WHERE = {  # (owner, function, good calls first): buffers, capture, a replay mid-answer
    "buffers": (static_decode.StaticDecoders, "decoder", 0),
    "capture": (static_decode.StaticDecoder, "capture", 0),
    "replay": (static_decode.StaticDecoder, "__call__", 2),
}


@pytest.mark.parametrize("where", sorted(WHERE))
def test_a_static_failure_in_auto_mode_restarts_in_default_mode(model, frames, monkeypatch, auto_is_static,
                                                                 where, caplog):
    state = _state(model, frames)
    cfg = dict(max_new_tokens=STEPS, ignore_eos=True)
    default = generate_answer(state, SamplingConfig(**cfg, decode_mode="default"), return_logits=True)
    owner, name, after = WHERE[where]
    failure = Failure(monkeypatch, owner, name, RuntimeError("CUDA error: operation not permitted when stream "
                                                             "is capturing"), after)
    seen = []
    with caplog.at_level("WARNING"):
        answer = generate_answer(state, SamplingConfig(**cfg), on_token=lambda step, tok: seen.append(step),
                                 return_logits=True)
    assert failure.calls == after + 1
    assert answer.token_ids == default.token_ids and len(answer.token_ids) == STEPS
    assert (answer.logits - default.logits).abs().max().item() < 1e-5
    assert answer.stats["decode_mode"] == "default"
    assert "operation not permitted" in answer.stats[FALLBACK_STATIC_DECODING]
    assert "Fallback: static decoding failed" in stats_text(answer.stats)
    assert "static decoding failed" in caplog.text
    assert len(model.static_decoders) == 0  # the failed run's buffers are not kept
    assert seen[-STEPS:] == list(range(STEPS))  # the restart reports its steps from 0 again

    # Auto stays default for this model: static decoding is not tried again ...
    calls = failure.calls
    again = generate_answer(_state(model, frames, "Which colour is the disc?"), SamplingConfig(**cfg))
    assert failure.calls == calls and again.stats["decode_mode"] == "default"
    assert FALLBACK_STATIC_DECODING in again.stats
    # ... while asking for default decoding says nothing about a fallback.
    assert FALLBACK_STATIC_DECODING not in generate_answer(state, SamplingConfig(**cfg, decode_mode="default")).stats


def test_after_a_reload_auto_tries_static_again(tiny_dir, model, frames, monkeypatch, auto_is_static):
    from adatp_core.models.loader import load_video_llm

    failure = Failure(monkeypatch, static_decode.StaticDecoder, "capture", RuntimeError("capture refused"), 0)
    generate_answer(_state(model, frames), SamplingConfig(max_new_tokens=3))
    assert FALLBACK_STATIC_DECODING in model.adapter.fallbacks
    monkeypatch.undo()
    monkeypatch.setattr(generate, "resolve_decode_mode", lambda mode, device: "static" if mode == "auto" else mode)
    reloaded = load_video_llm(tiny_dir, device="cpu", dtype="float32")
    answer = generate_answer(_state(reloaded, frames), SamplingConfig(max_new_tokens=3))
    assert answer.stats["decode_mode"] == "static" and FALLBACK_STATIC_DECODING not in answer.stats
    assert failure.calls == 1


def test_sampled_answers_restart_with_a_fresh_generator(model, frames, monkeypatch, auto_is_static):
    state = _state(model, frames)
    cfg = dict(max_new_tokens=STEPS, ignore_eos=True, do_sample=True, temperature=1.5, top_p=0.9, seed=7)
    default = generate_answer(state, SamplingConfig(**cfg, decode_mode="default"))
    Failure(monkeypatch, static_decode.StaticDecoder, "__call__", RuntimeError("replay failed"), 3)
    answer = generate_answer(state, SamplingConfig(**cfg))
    assert answer.token_ids == default.token_ids and FALLBACK_STATIC_DECODING in answer.stats


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   AdaTPInterrupted("interrupted"), KeyboardInterrupt(),
                                   AdaTPInputError("bad input")],
                         ids=["out-of-memory", "interrupt", "ctrl-c", "bad-input"])
def test_out_of_memory_and_interrupts_are_never_retried(model, frames, monkeypatch, auto_is_static, error):
    state = _state(model, frames)
    Failure(monkeypatch, static_decode.StaticDecoder, "__call__", error, 2)
    expected = AdaTPEnvironmentError if isinstance(error, torch.OutOfMemoryError) else type(error)
    with pytest.raises(expected):
        generate_answer(state, SamplingConfig(max_new_tokens=STEPS, ignore_eos=True))
    assert model.adapter.fallbacks == {}


def test_errors_of_the_token_callback_propagate_unchanged(model, frames, auto_is_static):
    class InterruptProcessingException(Exception):  # ComfyUI's Cancel, by name
        pass

    class Broken(Exception):
        pass

    state = _state(model, frames)
    for error in (InterruptProcessingException(), Broken("a callback bug")):
        def on_token(step, token, error=error):
            if step == 2:
                raise error

        with pytest.raises(type(error)):
            generate_answer(state, SamplingConfig(max_new_tokens=STEPS, ignore_eos=True), on_token=on_token)
    assert model.adapter.fallbacks == {}


def test_explicit_static_mode_reports_the_failure_and_the_setting_that_avoids_it(model, frames, monkeypatch):
    state = _state(model, frames)
    Failure(monkeypatch, static_decode.StaticDecoder, "__call__", RuntimeError("replay failed"), 1)
    with pytest.raises(AdaTPEnvironmentError, match="static decoding failed.*replay failed.*decode_mode=default"):
        generate_answer(state, SamplingConfig(max_new_tokens=STEPS, ignore_eos=True, decode_mode="static"))
    assert model.adapter.fallbacks == {}
