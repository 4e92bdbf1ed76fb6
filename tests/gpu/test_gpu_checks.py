"""Issue 18's checks that only a GPU can show (the CPU halves are in tests/test_cuda_paths.py).

Collected by the normal ``pytest tests`` run; every test skips cleanly without CUDA
(the multi-GPU one without a second GPU). On a GPU machine:

    python -m pytest -q -p no:cacheprovider tests/gpu
"""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import QUESTION

from adatp_core.attention import extract_attention
from adatp_core.debias import global_debias, local_debias
from adatp_core.generate import SamplingConfig, generate_answer
from adatp_core.prune import prune_tokens
from adatp_core.steps import capture_graph

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _state(model, frames, layer=2, retention=0.25):
    return prune_tokens(local_debias(global_debias(extract_attention(model, frames, QUESTION, layer=layer))),
                        retention)


def _answers(model, state, tokens=8):
    cfg = dict(max_new_tokens=tokens, ignore_eos=True)
    default = generate_answer(state, SamplingConfig(**cfg, decode_mode="default"), return_logits=True)
    static = generate_answer(state, SamplingConfig(**cfg, decode_mode="static"), return_logits=True)
    return default, static


def _same(default, static, tol=1e-4):
    assert static.token_ids == default.token_ids
    assert (static.logits - default.logits).abs().max().item() < tol


@pytest.fixture(scope="module")
def qwen3_on_cuda(tmp_path_factory):
    from adatp_core.models.loader import load_video_llm
    from adatp_core.models.tiny_qwen import ensure_tiny_qwen3_vl

    return load_video_llm(ensure_tiny_qwen3_vl(tmp_path_factory.mktemp("gpu-qwen3")), device="cuda",
                          dtype="float32")


# 1. Qwen3-VL on CUDA, pruned at K < 3 (its DeepStack layers): kept_injection on one device.
def test_qwen3_vl_pruned_below_its_deepstack_layers_answers_on_cuda(qwen3_on_cuda, frames):
    state = _state(qwen3_on_cuda, frames, layer=2)
    assert state.keep.device.type == "cuda" and state.kept_injection() is not None
    default, static = _answers(qwen3_on_cuda, state)
    _same(default, static)


# 4. A failed capture (a real host sync inside it) leaves the thread and the allocator usable.
def test_a_real_in_capture_sync_fails_cleanly_and_the_next_capture_works():
    dev = torch.device("cuda", torch.cuda.current_device())
    x = torch.randn(64, 64, device=dev)
    before = torch.cuda.current_stream(dev)

    def syncs():
        y = x @ x
        if y.sum().item() > 0:  # .item() inside a capture: cudaErrorStreamCaptureUnsupported
            y = y + 1
        return y

    with pytest.raises(RuntimeError):
        capture_graph(syncs, dev)
    assert torch.cuda.current_stream(dev) == before  # not left on the capture stream
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()  # fails an internal assert while the allocator thinks a capture is underway
    graph, out, _ = capture_graph(lambda: x @ x + 1, dev)
    x.copy_(torch.randn(64, 64, device=dev))
    graph.replay()
    torch.cuda.synchronize(dev)
    torch.testing.assert_close(out, x @ x + 1)


# 3. Dropping one graph leaves the others' cuBLAS workspaces alone (pytorch#193402).
def test_dropping_one_graph_leaves_the_others_working():
    dev = torch.device("cuda", torch.cuda.current_device())
    a = torch.randn(4096, 640, device=dev, dtype=torch.bfloat16)
    b = torch.randn(640, 640, device=dev, dtype=torch.bfloat16)
    keep, keep_out, _ = capture_graph(lambda: a @ b, dev)
    for _ in range(3):  # captured, replayed and destroyed, as LRU eviction does
        other, _, _ = capture_graph(lambda: (a @ b).relu() @ b, dev)
        other.replay()
        del other
        gc.collect()
        torch.cuda.empty_cache()
    for _ in range(5):
        keep.replay()
    torch.cuda.synchronize(dev)  # an illegal memory access surfaces here
    torch.testing.assert_close(keep_out, a @ b)


def test_evicted_buckets_leave_the_kept_one_answering(tiny_on, frames):
    model = tiny_on("cuda")
    model.static_decoders.clear()
    one, two, four = (_state(model, frames[:1]), _state(model, frames[:2], retention=1.0), _state(model, frames))
    _same(*_answers(model, one))
    _same(*_answers(model, two))  # two buckets, two graphs
    _same(*_answers(model, four))  # a third bucket: the oldest graph (one's) is destroyed
    assert len(model.static_decoders) == 2
    _, static = _answers(model, two)  # replays the graph captured before the destroyed one
    assert static.stats["static_graph"] == "reused"
    torch.cuda.synchronize()
    _same(*_answers(model, two))


# 5. A model on a GPU other than the current one records a real graph.
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_static_decoding_on_a_non_current_gpu(tiny_dir, frames):
    from adatp_core.models.loader import load_video_llm

    assert torch.cuda.current_device() == 0
    model = load_video_llm(tiny_dir, device="cuda:1", dtype="float32")
    default, static = _answers(model, _state(model, frames))
    _same(default, static)
    assert static.stats["static_graph"] == "captured"
    assert len(set(static.token_ids)) > 1  # an empty graph repeats the first token


# 7 and 8. dtype auto and the device index on this GPU.
def test_dtype_auto_and_device_index_on_this_gpu():
    from adatp_core.models.loader import resolve_device, resolve_dtype

    dev = resolve_device("cuda")
    assert dev.index == torch.cuda.current_device()
    native = torch.cuda.get_device_capability(dev) >= (8, 0)
    assert resolve_dtype("auto", dev) == (torch.bfloat16 if native else torch.float16)


# 2. A saved workflow's flash_attention_2 loads and answers on CUDA (as sdpa), with graphs.
def test_flash_attention_2_choice_answers_on_cuda(tiny_dir, frames):
    from adatp_core.models.loader import load_video_llm

    model = load_video_llm(tiny_dir, device="cuda", dtype="float32", attention="flash_attention_2")
    default, static = _answers(model, _state(model, frames))
    assert static.token_ids == default.token_ids
    assert static.stats["static_graph"] == "captured"


# 4. bnb-8bit is never captured (its int8 matmul syncs with the host), and still answers.
def test_bnb_8bit_decodes_statically_without_a_graph(tiny_dir, frames):
    pytest.importorskip("bitsandbytes")
    from adatp_core.models.loader import load_video_llm

    model = load_video_llm(tiny_dir, device="cuda", dtype="bnb-8bit")
    default, static = _answers(model, _state(model, frames), tokens=4)
    assert static.stats["static_graph"].startswith("none: bnb-8bit")
    assert static.token_ids == default.token_ids
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.cuda.empty_cache()


# 10. Reused buffers poisoned with NaN: the graph's next answer is clean.
def test_a_poisoned_bucket_answers_cleanly_on_cuda(tiny_on, frames):
    model = tiny_on("cuda")
    model.static_decoders.clear()
    state = _state(model, frames)
    default, _ = _answers(model, state)
    (decoder,) = model.static_decoders._decoders.values()
    with torch.inference_mode():
        for buffer in (t for t in (*decoder.cache.keys, *decoder.cache.values) if t is not None):
            buffer.fill_(float("nan"))
    _, static = _answers(model, state)
    assert torch.isfinite(static.logits).all()
    _same(default, static)


# 10, issue 27. Token choice in a batched step adds no host sync: penalty 1.05 and sampling (top-k, top-p),
# 4 rows, CUDA's sync-debug mode raising on any sync. (Top-p against top-p 1.0 could not fail: both synced in
# torch.multinomial.) The batch's one read of the chosen tokens (tolist) comes after; the prompt's one copy to
# the device is made before, as at a clip's join.
def test_top_p_adds_no_host_sync(tiny_on, frames, monkeypatch):
    from adatp_core import batching

    model = tiny_on("cuda")
    real, rows = batching.choose_rows, []

    def strict(choosers, logits):
        for chooser in choosers:
            chooser._history(logits.shape[-1], logits.device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            tokens = real(choosers, logits)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        rows.append(len(choosers))
        return tokens

    cfg = SamplingConfig(max_new_tokens=6, ignore_eos=True, do_sample=True, temperature=0.8, top_k=50, top_p=0.7,
                         repetition_penalty=1.05, decode_mode="default", seed=3)
    state = _state(model, frames)
    alone = generate_answer(state, cfg).token_ids
    monkeypatch.setattr(batching, "choose_rows", strict)
    done = list(batching.decode_together(model, cfg, [(i, lambda: state) for i in range(4)], 4))
    assert max(rows) == 4 and all(f.error is None for f in done), [f.error for f in done]
    assert all(f.answer.token_ids == alone for f in done)  # each row draws from its own generator, seeded alike


# Issue 21: the hybrid Qwen3.5 (linear-attention states in the static buffers and the CUDA graph,
# the fast kernels when installed) and the MoE models on CUDA.
@pytest.mark.parametrize("build", ["ensure_tiny_qwen3_5", "ensure_tiny_qwen3_5_moe", "ensure_tiny_qwen3_vl_moe"])
def test_hybrid_and_moe_models_decode_the_same_with_and_without_graphs(build, tmp_path, frames):
    from adatp_core.batching import decode_together
    from adatp_core.models import tiny_qwen
    from adatp_core.models.loader import load_video_llm

    model = load_video_llm(getattr(tiny_qwen, build)(tmp_path), device="cuda", dtype="float32")
    state = _state(model, frames, layer=model.adapter.default_layer())
    default, static = _answers(model, state)
    _same(default, static)
    assert static.stats.get("static_graph") in ("captured", "reused"), static.stats
    again = generate_answer(state, SamplingConfig(max_new_tokens=8, ignore_eos=True, decode_mode="static"))
    assert again.token_ids == static.token_ids  # the graph replayed over the reloaded states
    rows = {f.key: f.answer for f in decode_together(
        model, SamplingConfig(max_new_tokens=8, ignore_eos=True, decode_mode="static"),
        [(i, lambda: state) for i in range(3)], 2)}
    assert all(rows[i].token_ids == default.token_ids for i in range(3))


# Issue 27, defect 1: captions decoded together on a model split over two GPUs (each attention
# layer's write index and mask on its own GPU); the CPU half is tests/test_split_model.py.
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_split_model_batched_captions_equal_batch_one(tiny_dir, frames):
    from adatp_core.batching import decode_together
    from adatp_core.models.loader import load_video_llm

    model = load_video_llm(tiny_dir, device="cuda:0", dtype="float32")
    tm = model.adapter.text_model
    for module in (*tm.layers[2:], tm.norm, model.model.lm_head):
        module.to("cuda:1")
    assert model.adapter.is_split
    states = [_state(model, frames[:n]) for n in (2, 4, 3)]
    cfg = SamplingConfig(max_new_tokens=8, ignore_eos=True)  # auto: the default mode on a split model
    reference = [generate_answer(s, cfg).token_ids for s in states]
    rows = {f.key: f for f in decode_together(model, cfg, [(i, lambda s=s: s) for i, s in enumerate(states)], 2)}
    assert all(rows[i].error is None for i in range(3)), [rows[i].error for i in range(3)]
    assert [rows[i].answer.token_ids for i in range(3)] == reference


# Issue 27, defect 3: a batched step that replays a graph keeps no copy of the linear-attention states
# (only a capture does); the CPU half is tests/test_hybrid_batching.py.
def test_batched_graph_replays_keep_no_copy_of_the_linear_states(tmp_path, frames, monkeypatch):
    from adatp_core import batching, steps
    from adatp_core.models.loader import load_video_llm
    from adatp_core.models.tiny_qwen import ensure_tiny_qwen3_5

    model = load_video_llm(ensure_tiny_qwen3_5(tmp_path), device="cuda", dtype="float32")
    states = [_state(model, frames[:n], layer=model.adapter.default_layer()) for n in (2, 4, 3)]
    cfg = dict(max_new_tokens=12, ignore_eos=True)
    reference = [generate_answer(s, SamplingConfig(**cfg, decode_mode="default")).token_ids for s in states]
    kept, made = [], []
    real_kept, real_init = steps.linear_states_kept, steps.StepRunner.__init__

    def counted(cache, rows=slice(None), only_on_error=False):
        kept.append("step" if only_on_error else "capture")
        return real_kept(cache, rows, only_on_error)

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        if self.static:
            made.append(self)

    monkeypatch.setattr(steps, "linear_states_kept", counted)
    monkeypatch.setattr(steps.StepRunner, "__init__", init)
    rows = {f.key: f.answer for f in batching.decode_together(
        model, SamplingConfig(**cfg, decode_mode="static"), [(i, lambda s=s: s) for i, s in enumerate(states)], 2)}
    assert [rows[i].token_ids for i in range(3)] == reference
    (step,) = made
    assert step.use_graph and any(e.graph is not None for e in step.entries.values())
    assert "capture" in kept and "step" not in kept, kept  # copies only where a bucket is captured


def test_frames_on_the_gpu_are_keyed_on_the_gpu(monkeypatch):
    """Issue 27 defect 6: CUDA frames are hashed where they are (no host copy of the frames),
    agree with the same digest computed on the CPU, and the same tensor is keyed by identity."""
    from adatp_core import prefix_cache
    from adatp_core.prefix_cache import FrameKeys, device_digest, digest_weights

    monkeypatch.setattr(prefix_cache, "host_digest", lambda *a: pytest.fail("GPU frames copied to the host"))
    frames = torch.rand(8, 720, 1280, 3, device="cuda")
    keys = FrameKeys(seed=3)
    first = keys(frames)
    assert first == "device:" + device_digest(frames.cpu(), digest_weights("cpu", seed=3))
    assert keys(frames) == first and keys(frames.clone()) == first
    frames[-1, -1, -1, -1] += 1
    assert keys(frames) != first
