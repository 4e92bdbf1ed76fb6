"""Issue 30: the encoded visual rows and DeepStack's wait on the host when the device is short
(places.plan_places), written there chunk by chunk as they are encoded, and come to the device a
prefill call's span at a time; the text relevance reads them a span at a time, and the continuation
gathers the kept tokens' DeepStack rows of layers >= K there. On the CPU the host is the device, so
"host" takes the host's path over the same memory: what these tests check is that the path never
reads the rows whole, and gives the device placement's keep set, tokens and hidden states, on every
family that streams (tests/test_streaming.py). tests/gpu/test_gpu_encoded_on_host.py measures a GPU."""

from __future__ import annotations

import gc
import weakref
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from adatp_core import pipeline
from adatp_core import video as vid
from adatp_core.attention import _prompt_spans, extract_attention
from adatp_core.budget import RunPlan, pinned_bytes, run_memory
from adatp_core.errors import AdaTPInputError
from adatp_core.flops import LLMShape, VisionShape
from adatp_core.generate import SamplingConfig, generate_answer
from adatp_core.models.loader import load_video_llm
from adatp_core.report import prefill_line
from adatp_core.samples import scene_frames, write_video
from adatp_core.streaming import encode_video
from test_streaming import FAMILIES, QUESTION, cache, model  # noqa: F401  (the fixtures: every family)

CHUNK = 64  # tokens per prefill call: on the linear-attention layers' grid, and inside a temporal patch


def chunk_of(model) -> int:
    """Calls of 64 tokens (Qwen: 63 a temporal patch), or 256 on LLaVA-OV (196 a frame, 1,372 in all)."""
    return 256 if model.adapter.family == "llava_onevision" else CHUNK


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """5 frames (Qwen's last temporal patch padded) of 280x224: 63 tokens a temporal patch on Qwen3-VL,
    so calls of 64 tokens end inside one."""
    folder = tmp_path_factory.mktemp("host-clip")
    return write_video(folder / "clip.mp4", scene_frames(num_frames=5, width=280, height=224, scenes=2), fps=4.0)


class Watched(torch.Tensor):
    """Rows that must never be read whole: every op on them records how many rows its results have
    (a copy of them all to the device, a float32 copy, a gather of every row would show N)."""

    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim():
                cls.seen.append((getattr(func, "__name__", str(func)), int(t.shape[0])))
        return out


def watched(video):
    """The streamed video with its visual and DeepStack rows watched (the same storage)."""
    enc = video.encoded
    return replace(video, encoded=replace(enc, visual=enc.visual.as_subclass(Watched),
                                          injections=tuple(f.as_subclass(Watched) for f in enc.injections)))


def _answer(state):
    pruned = pipeline.select(state, pipeline.PipelineConfig(retention=0.25))
    return pruned, generate_answer(pruned, SamplingConfig(max_new_tokens=4, ignore_eos=True), return_logits=True)


def _same(host, device) -> None:
    assert torch.equal(host.prompt.input_ids, device.prompt.input_ids)
    torch.testing.assert_close(host.scores, device.scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(host.relevance, device.relevance, rtol=1e-5, atol=1e-6)
    err = (host.hidden - device.hidden).abs().max().item()
    assert err <= 1e-5 * max(device.hidden.abs().max().item(), 1.0), f"layer K's input rows: max error {err:.3g}"
    (kept_a, a), (kept_b, b) = _answer(host), _answer(device)
    assert torch.equal(kept_a.keep.cpu(), kept_b.keep.cpu())
    assert a.token_ids == b.token_ids
    assert (a.logits - b.logits).abs().max().item() < 1e-5


def _cuts_a_temporal_patch(state, chunk: int) -> bool:
    """Whether a call of the prefill ends inside a temporal patch's (or a frame's) visual rows."""
    per_step = state.grid[1] * state.grid[2]
    positions = state.prompt.visual_positions.view(-1, per_step)
    edges = torch.tensor([b for _, b in _prompt_spans(state.model.adapter, state.prompt, chunk)[:-1]])
    return any(bool(((step[0] < edges) & (edges <= step[-1])).any()) for step in positions)


def test_rows_on_the_host_give_the_device_placement_answer_and_are_never_read_whole(model, clip):
    """Streamed in chunks of 2 frames into the host's buffers, the prefill in calls that end inside a
    temporal patch (or a frame): the same scores, keep set, tokens and hidden states as the rows on the
    device, and no op on the rows gave all of them at once (assembly, relevance, DeepStack, the gather)."""
    sample, chunk = vid.plan_sampling(clip, 5), chunk_of(model)
    device = encode_video(model, sample, chunk=2, encoded="device", prefill_chunk=chunk)
    host = encode_video(model, sample, chunk=2, encoded="host", prefill_chunk=chunk)
    # asked for, either way (places.py: one wording); only "host" takes the host's path on a CPU model
    assert (device.stats["encoded_on"], device.stats["encoded_reason"], device.stats["encoded_moved"]) == \
        ("host", "asked for", False)
    assert (host.stats["encoded_on"], host.stats["encoded_reason"], host.stats["encoded_moved"]) == \
        ("host", "asked for", True)
    assert torch.equal(host.encoded.visual, device.encoded.visual)
    n = host.encoded.visual.shape[0]
    Watched.seen = []
    on_host = extract_attention(model, watched(host), QUESTION, reuse_prefix=False, prefill_chunk=chunk)
    on_device = extract_attention(model, device, QUESTION, reuse_prefix=False, prefill_chunk=chunk)
    assert _cuts_a_temporal_patch(on_host, chunk)
    assert on_host.stats["encoded_reason"] == "asked for" and on_host.stats["prefill_calls"] > 2
    assert "the encoded visual rows on the host (asked for)" in prefill_line(on_host.stats)
    _same(on_host, on_device)  # the answer gathers the kept DeepStack rows from the watched ones
    assert Watched.seen, "the rows were not read at all"
    assert max(rows for _, rows in Watched.seen) < n, [s for s in Watched.seen if s[1] >= n]


def test_frames_encoded_onto_the_host_give_the_same_answer(model):
    """The IMAGE path: extract_attention places the rows before encoding them, a chunk at a time."""
    frames = torch.from_numpy(scene_frames(num_frames=5, width=280, height=224, scenes=2)).float() / 255
    chunk = chunk_of(model)
    host = extract_attention(model, frames, QUESTION, reuse_prefix=False, prefill_chunk=chunk, encoded="host")
    device = extract_attention(model, frames, QUESTION, reuse_prefix=False, prefill_chunk=chunk)
    assert (host.stats["encoded_on"], host.stats["encoded_reason"]) == ("host", "asked for")
    assert device.stats["encoded_reason"] == "the model runs on the host"
    _same(host, device)


def test_a_second_question_over_rows_on_the_host_reuses_the_prefix(model, clip):
    """The prefix store keeps the rows where they wait; the second question's answer is the one a fresh
    pass over them gives it."""
    if model.adapter.prefix_refusal:
        pytest.skip(model.adapter.prefix_refusal)
    model.prefix_cache.clear()
    chunk = chunk_of(model)
    host = encode_video(model, vid.plan_sampling(clip, 5), chunk=2, encoded="host", prefill_chunk=chunk)
    first = extract_attention(model, host, QUESTION, prefill_chunk=chunk)
    second = extract_attention(model, host, "Where is it?", prefill_chunk=chunk)
    assert first.stats["prefix_cache"] == "miss" and second.stats["prefix_cache"] == "hit"
    assert second.stats["encoded_reason"] == "kept with the video's prefix"
    assert len(model.prefix_cache) == 1 and next(iter(model.prefix_cache._entries.values())).encoded.visual.device \
        == host.encoded.visual.device
    model.prefix_cache.clear()
    _same(second, extract_attention(model, host, "Where is it?", reuse_prefix=False, prefill_chunk=chunk))


def test_one_question_lets_deepstack_rows_below_k_go_before_the_answer(cache, clip, monkeypatch):
    """The one-question run (the CLI's: no prefix kept): once layers < K have run, nothing holds
    DeepStack's rows of layers < K when the continuation starts; those of layers >= K stay for it."""
    model = load_video_llm(FAMILIES["qwen3_vl"](cache), device="cpu", dtype="float32")
    refs = []
    real_encode, real_answer = pipeline.encode_video, pipeline.generate_answer

    def encode(*args, **kwargs):
        video = real_encode(*args, **kwargs)
        refs.extend(weakref.ref(f) for f in video.encoded.injections)
        return video

    alive = []

    def answer(state, *args, **kwargs):
        gc.collect()
        alive.extend(ref() is not None for ref in refs)
        return real_answer(state, *args, **kwargs)

    monkeypatch.setattr(pipeline, "encode_video", encode)
    monkeypatch.setattr(pipeline, "generate_answer", answer)
    cfg = pipeline.PipelineConfig(num_frames=5, reuse_prefix=False, prefill_chunk=CHUNK, encoded="host",
                                  generation=SamplingConfig(max_new_tokens=2, ignore_eos=True))
    result = pipeline.run_pipeline(model, clip, QUESTION, cfg)
    layer = result.state.layer
    assert len(alive) == 3 and layer == 2
    assert alive == [False] * layer + [True] * (3 - layer)
    assert result.stats["encoded_on"] == "host" and result.stats["encoded_reason"] == "asked for"


def test_a_bad_place_is_refused(model):
    with pytest.raises(AdaTPInputError, match="encoded must be one of"):
        extract_attention(model, torch.rand(2, 64, 64, 3), QUESTION, encoded="cuda")
    for name in ("encoded", "rows", "kv"):  # one validation at the boundary, before the model loads
        with pytest.raises(Exception, match=f"{name} must be one of") as refused:
            pipeline.check_config(pipeline.PipelineConfig(**{name: "gpu"}))
        assert refused.value.option == name


def test_the_memory_model_counts_the_rows_on_the_host():
    """RunPlan.encoded_on_host: the encoded and DeepStack rows on the host, one call's span of them on
    the device."""
    llm = LLMShape(layers=36, hidden=4096, intermediate=12288, heads=32, kv_heads=8, head_dim=128, vocab=151936)
    vision = VisionShape(layers=27, hidden=1152, intermediate=4304, patches=2048, patch_dim=1536, projector_out=4096)
    n, length = 230_400, 236_000
    run = RunPlan(llm=llm, vision=vision, frames=1800, decoded=(448, 448), pixels=(448, 448), prompt_tokens=length,
                  visual_tokens=n, layer=2, retention=0.25, streamed=True, prefill_chunk=8192, frames_per_step=2,
                  injections=3, item=2, where="cuda:0")
    device, host = run_memory(run), run_memory(replace(run, encoded_on_host=True))
    on_device = {what: (b, where) for what, b, where in device.parts}
    on_host = {what: (b, where) for what, b, where in host.parts}
    encoded = "the encoded rows [230400, 4096] and 3 DeepStack rows each"
    # on the host in pinned blocks, one per tensor (the rows and each DeepStack layer's), each a power of two
    assert on_device[encoded][1] == "cuda:0" and on_host[encoded] == (4 * pinned_bytes(n * 4096 * 2, "cuda:0"), "host")
    assert {w: p for w, p in on_device.items() if w != encoded} == {w: p for w, p in on_host.items() if w != encoded}
    span = [b for what, b, where in host.fixed if what.startswith("one prefill call's span of them (8192 tokens)")]
    assert len(span) == 1 and span[0] * n == on_device[encoded][0] * 8192  # a call's rows of the same width
    assert device.bytes_on("cuda:0") - host.bytes_on("cuda:0") == on_device[encoded][0] - span[0]


def test_a_calls_rows_are_a_slice_of_the_rows_waiting():
    """A call's span of rows indexed by ascending positions is a view of them (span_of): no gather on the
    host, and a pinned buffer's span goes to the device from there."""
    from adatp_core.models.base import Injection, span_of

    rows = torch.tensor([2, 3, 5, 8, 9])
    f = torch.arange(10.0).view(5, 2)
    assert span_of(rows, 4, 9) == (2, 4) and span_of(rows, 0, 2) == (0, 0) and span_of(rows, 0, 100) == (0, 5)
    window = Injection(rows, (f, None)).window(3, 9)
    assert window.rows.tolist() == [0, 2, 5] and torch.equal(window.features[0], f[1:4])
    assert window.features[0].untyped_storage().data_ptr() == f.untyped_storage().data_ptr()
    assert window.features[1] is None
    assert Injection(rows, (f,)).window(10, 12) is None
    whole = Injection(rows, (f,)).window(2, 10)
    assert whole.rows.tolist() == [0, 1, 3, 6, 7] and whole.features[0] is f
