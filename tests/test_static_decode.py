"""Static decoding reuses its buffers (and, on CUDA, its graph) across answers and
questions, samples like the default path, and forgets them when the weights move."""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTION

from adatp_core.attention import extract_attention
from adatp_core.debias import global_debias, local_debias
from adatp_core.generate import SamplingConfig, generate_answer, resolve_decode_mode
from adatp_core.prune import prune_tokens
from adatp_core.static_decode import StaticDecoders, capacity_bucket

OTHER_QUESTION = "Which colour is the disc, and where does it go after the cut?"


def _state(model, frames, question, retention=0.25):
    return prune_tokens(local_debias(global_debias(extract_attention(model, frames, question, layer=2))), retention)


def test_capacity_buckets_are_powers_of_two():
    assert [capacity_bucket(n) for n in (1, 256, 257, 1000, 1024, 1025)] == [256, 256, 512, 1024, 1024, 2048]
    assert capacity_bucket(3, minimum=1) == 4


def test_auto_mode_is_static_only_on_cuda():
    assert SamplingConfig().decode_mode == "auto"
    assert resolve_decode_mode("auto", "cpu") == "default"
    assert resolve_decode_mode("auto", torch.device("cuda", 0)) == "static"
    assert resolve_decode_mode("default", "cuda") == "default"
    with pytest.raises(ValueError, match="decode_mode"):
        SamplingConfig(decode_mode="graph")


def test_two_questions_reuse_one_bucket_and_match_default(tiny_on, frames, device):
    """Two questions of different prompt lengths land in one capacity bucket: the
    second answer reuses the first one's buffers (and graph), and both choose the
    default path's tokens with logits within 1e-5."""
    model = tiny_on(device)
    model.static_decoders.clear()
    cfg = dict(max_new_tokens=8, ignore_eos=True)
    seen = []
    for question in (QUESTION, OTHER_QUESTION):
        s = _state(model, frames, question)
        default = generate_answer(s, SamplingConfig(**cfg, decode_mode="default"), return_logits=True)
        static = generate_answer(s, SamplingConfig(**cfg, decode_mode="static"), return_logits=True)
        assert static.token_ids == default.token_ids and len(static.token_ids) == 8
        assert (static.logits - default.logits).abs().max().item() < 1e-5
        assert static.stats["kv_lengths"] == default.stats["kv_lengths"]
        assert len(model.static_decoders) == 1
        (decoder,) = model.static_decoders._decoders.values()
        seen.append((s.prompt.length, decoder, decoder.cache.keys[0].data_ptr(), static.stats["time_graph_capture"]))
    (len1, dec1, ptr1, _), (len2, dec2, ptr2, capture2) = seen
    assert len1 != len2  # a new prompt length ...
    assert dec1 is dec2 and ptr1 == ptr2  # ... and the same buffers
    assert capture2 == 0.0  # no second capture (none at all off CUDA)


def test_static_sampling_is_seeded_and_matches_default(tiny_on, frames, device):
    s = _state(tiny_on(device), frames, QUESTION)

    def sample(mode, seed):
        cfg = SamplingConfig(max_new_tokens=8, ignore_eos=True, do_sample=True, temperature=1.5, top_p=0.9,
                             seed=seed, decode_mode=mode)
        return generate_answer(s, cfg).token_ids

    static = sample("static", 3)
    assert static == sample("static", 3)  # reproducible
    assert static == sample("default", 3)  # the same draws as the default path
    assert static != sample("static", 4)


def test_a_new_bucket_evicts_the_oldest_and_moved_weights_drop_all(tiny_dir, frames):
    from adatp_core.models.loader import load_video_llm

    model = load_video_llm(tiny_dir, device="cpu", dtype="float32")
    assert isinstance(model.static_decoders, StaticDecoders) and len(model.static_decoders) == 0
    s = _state(model, frames, QUESTION)
    static = SamplingConfig(max_new_tokens=4, ignore_eos=True, decode_mode="static")
    generate_answer(s, static)
    (first,) = model.static_decoders._decoders.values()
    generate_answer(_state(model, frames[:1], QUESTION), static)  # one frame: a smaller bucket
    assert len(model.static_decoders) == 2
    generate_answer(_state(model, frames[:2], QUESTION, retention=1.0), static)
    assert len(model.static_decoders) == 2 and first not in model.static_decoders._decoders.values()
    weight = model.adapter.text_model.embed_tokens.weight
    weight.data = weight.data.clone()  # what moving the weights (offload and back) does to their addresses
    generate_answer(s, static)
    assert len(model.static_decoders) == 1


def test_out_of_memory_drops_the_kept_buffers(tiny_dir, frames, monkeypatch):
    from adatp_core.errors import AdaTPEnvironmentError
    from adatp_core.models.loader import load_video_llm

    model = load_video_llm(tiny_dir, device="cpu", dtype="float32")
    s = _state(model, frames[:2], QUESTION)
    static = SamplingConfig(max_new_tokens=3, ignore_eos=True, decode_mode="static")
    generate_answer(s, static)
    assert len(model.static_decoders) == 1

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model.adapter, "run_layers", oom)
    with pytest.raises(AdaTPEnvironmentError, match="out of memory during generation"):
        generate_answer(s, static)
    assert len(model.static_decoders) == 0


def test_capture_time_is_reported_on_its_own():
    from adatp_core.report import generation_line

    stats = {"new_tokens": 5, "decode_ms_per_token": 2.0, "decode_mode": "static", "time_graph_capture": 0.0}
    assert generation_line(stats) == "Generation: 5 tokens, 2.0 ms/token (static decoding)"
    assert generation_line({**stats, "time_graph_capture": 0.25}).endswith("; one-time CUDA graph capture 0.250 s")


def test_a_failed_graph_capture_falls_back_to_steps_without_a_graph(tiny, frames, monkeypatch, caplog):
    """A capture that fails (here forced, on CPU) leaves a decoder that runs its
    fixed-shape steps without a graph and still chooses the default path's tokens."""
    from adatp_core import static_decode, steps

    def refuse(fn, dev):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(steps, "capture_graph", refuse)
    monkeypatch.setattr(static_decode.StaticDecoder, "__init__", _init_with_graph(static_decode.StaticDecoder.__init__))
    tiny.static_decoders.clear()
    s = _state(tiny, frames, QUESTION)
    cfg = dict(max_new_tokens=6, ignore_eos=True)
    default = generate_answer(s, SamplingConfig(**cfg, decode_mode="default"), return_logits=True)
    with caplog.at_level("WARNING"):
        static = generate_answer(s, SamplingConfig(**cfg, decode_mode="static"), return_logits=True)
    assert "CUDA graph capture failed" in caplog.text
    (decoder,) = tiny.static_decoders._decoders.values()
    assert decoder.use_graph is False and all(e.graph is None for e in decoder.entries.values())
    assert decoder.status.failed and decoder.status.reason == "operation not permitted when stream is capturing"
    assert static.stats["static_graph"] == "failed: operation not permitted when stream is capturing"
    assert static.token_ids == default.token_ids
    assert (static.logits - default.logits).abs().max().item() < 1e-5
    tiny.static_decoders.clear()


def _init_with_graph(init):
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.use_graph = True  # as on CUDA
    return wrapped
