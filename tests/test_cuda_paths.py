"""Issue 18: defects of the CUDA-only paths, shown on the CPU with fakes, meta
tensors, forced failures and spies. What only a GPU can show is in tests/gpu/."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import QUESTION, LoaderStopped

from adatp_core import static_decode, steps
from adatp_core.attention import extract_attention
from adatp_core.debias import global_debias, local_debias
from adatp_core.errors import AdaTPEnvironmentError, AdaTPInputError, AdaTPOutOfMemoryError
from adatp_core.generate import SamplingConfig, generate_answer, next_token
from adatp_core.prune import prune_tokens


def _state(model, frames, question=QUESTION, retention=0.25, layer=2):
    return prune_tokens(local_debias(global_debias(extract_attention(model, frames, question, layer=layer))),
                        retention)


# ----- 1. kept_injection: both sides of searchsorted on the keep set's device -----------------

def test_kept_injection_stays_on_the_keep_sets_device(monkeypatch):
    """Qwen3-VL on CUDA: the keep set lives on the GPU. Here "meta" plays the GPU: before the
    fix, searchsorted got the kept positions there and the visual positions on the CPU."""
    from adatp_core import state as state_module
    from adatp_core.models.base import Prompt
    from adatp_core.state import AdaTPState

    visual = torch.arange(2, 14)  # 12 visual tokens after 2 text tokens, 3 text tokens after
    prompt = Prompt(input_ids=torch.zeros(17, dtype=torch.long), visual_positions=visual,
                    extra_positions=torch.zeros(0, dtype=torch.long), question=(14, 17), after_video=14)
    dev = torch.device("meta")
    keep = torch.tensor([0, 3, 4, 9], device=dev)
    injections = tuple(torch.zeros(12, 8, device=dev) for _ in range(3))
    state = AdaTPState(model=None, question="q", prompt=prompt, layer=1, query_mode="text", grid=(1, 3, 4),
                       hidden=torch.zeros(1), past_kv=(), position_ids=torch.arange(17)[None],
                       scores=torch.zeros(12), relevance=torch.zeros(12), frame_relevance=torch.zeros(1),
                       frame_features=torch.zeros(1, 4), segments=((0, 0),), keep=keep, injections=injections)
    seen = []
    real = torch.searchsorted

    def spy(sorted_sequence, values, *args, **kwargs):
        seen.append((sorted_sequence.device, values.device))
        return real(sorted_sequence, values, *args, **kwargs)

    monkeypatch.setattr(state_module.torch, "searchsorted", spy)
    injection = state.kept_injection()
    assert seen == [(dev, dev)]
    assert injection.rows.device == dev and injection.features[1].shape == (4, 8)
    assert injection.features[0] is None  # layer 0 < K ran already: its features are not gathered
    # The same state on the CPU gives the rows of the kept visual tokens among the kept positions.
    cpu = state.evolve(keep=keep.new_tensor([0, 3, 4, 9], device="cpu"),
                       injections=tuple(torch.arange(12.0)[:, None].expand(12, 8) for _ in range(2)))
    rows = cpu.kept_injection().rows.tolist()
    assert rows == [2, 3, 4, 5]  # text tokens 0 and 1 come first
    assert cpu.kept_injection().features[1][:, 0].tolist() == [0.0, 3.0, 4.0, 9.0]


# ----- 2. flash_attention_2 runs as sdpa, and load errors say what they are ---------------------

def test_flash_attention_2_in_a_saved_workflow_loads_and_runs_as_sdpa(tiny_dir, frames, caplog):
    from adatp_core.models.loader import ATTENTIONS, load_video_llm

    assert "flash_attention_2" in ATTENTIONS  # old workflows hold it: the combo keeps it
    with caplog.at_level("WARNING"):
        model = load_video_llm(tiny_dir, device="cpu", dtype="float32", attention="flash_attention_2")
    assert "runs as sdpa" in caplog.text
    assert model.attention == "sdpa"
    text_attn = model.adapter.text_model.config._attn_implementation
    assert "flash" not in text_attn  # transformers would send it to the hub-kernel loader
    answer = generate_answer(_state(model, frames[:2]), SamplingConfig(max_new_tokens=3, ignore_eos=True))
    assert len(answer.token_ids) == 3


def test_a_flash_name_is_never_registered():
    from adatp_core.hf.attention_hook import register_attention

    with pytest.raises(AdaTPInputError, match="cannot be wrapped"):
        register_attention("flash_attention_2")


@pytest.mark.parametrize("error, kind, says", [
    (ValueError("LlavaOnevision does not support an attention implementation through `adatp_x` yet"),
     AdaTPEnvironmentError, "not a problem with the downloaded files"),
    (ImportError("bitsandbytes was compiled without GPU support"), AdaTPEnvironmentError, "not a problem"),
    (RuntimeError("Error(s) in loading state_dict: size mismatch for lm_head.weight"), AdaTPInputError,
     "download them again"),
    (OSError("Unable to load weights from checkpoint file"), AdaTPInputError, "download them again"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), AdaTPOutOfMemoryError,
     "not enough cpu memory to load"),
    (RuntimeError("CUDA error: out of memory"), AdaTPOutOfMemoryError, "not enough cpu memory to load"),  # the driver's
])
def test_load_errors_say_whether_the_files_are_at_fault(tiny_dir, monkeypatch, error, kind, says):
    import transformers

    from adatp_core.models.loader import load_video_llm

    def from_pretrained(folder, **kwargs):
        raise error

    monkeypatch.setattr(transformers.LlavaOnevisionForConditionalGeneration, "from_pretrained", from_pretrained)
    with pytest.raises(kind, match=says) as info:
        load_video_llm(tiny_dir, device="cpu", dtype="float32")
    if kind is AdaTPEnvironmentError:
        assert "download them again" not in str(info.value)


# ----- 4 and 5. capture: own device, own stream, state restored when it fails --------------------

class _FakeCuda:
    """The torch.cuda calls that capture_graph makes, recorded. A capture fails as a real
    one does: the body raises (an op that synchronises), then capture_end raises too."""

    def __init__(self, body_error=None, end_error=None):
        self.calls = []
        self.device_stack = []
        self.body_error = body_error
        self.end_error = end_error
        self.allocating_to_pool = False
        fake = self

        class Stream:
            made = 0

            def __init__(self, device=None, priority=0):
                self.device_index = 0
                self.stream_id = Stream.made % 3  # torch hands out pooled streams round robin
                Stream.made += 1

            def wait_stream(self, other):
                fake.calls.append("wait")

        class Graph:
            def capture_begin(self, pool=None, capture_error_mode="global"):
                fake.calls.append(("begin", fake.current(), tuple(fake.device_stack), capture_error_mode))
                fake.allocating_to_pool = True

            def capture_end(self):
                fake.calls.append("end")
                if fake.end_error is not None:
                    raise fake.end_error  # like torch: before the allocator leaves the pool
                fake.allocating_to_pool = False

            def reset(self):
                fake.calls.append("reset")

        self.Stream, self.Graph = Stream, Graph

    @contextlib.contextmanager
    def device(self, dev):
        self.device_stack.append(str(dev))
        try:
            yield
        finally:
            self.device_stack.pop()

    def install(self, monkeypatch):
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "device", self.device)
        monkeypatch.setattr(cuda, "Stream", self.Stream)
        monkeypatch.setattr(cuda, "CUDAGraph", self.Graph)
        monkeypatch.setattr(cuda, "current_stream", lambda device=None: self.stream_now)
        monkeypatch.setattr(cuda, "set_stream", lambda stream: setattr(self, "stream_now", stream))
        monkeypatch.setattr(cuda, "graph_pool_handle", lambda: (0, 7))
        monkeypatch.setattr(cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", self.end_allocate, raising=False)
        monkeypatch.setattr(torch._C, "_cuda_releasePool", self.release_pool, raising=False)

    def current(self):
        return "default-stream" if self.stream_now is self.default else "capture-stream"

    def end_allocate(self, index, pool):
        self.calls.append(("end_allocate", index, pool))
        if not self.allocating_to_pool:
            raise RuntimeError("endAllocatePool: not currently recording to mempool_id")
        self.allocating_to_pool = False

    def release_pool(self, index, pool):
        self.calls.append(("release_pool", index, pool))

    def body(self):
        self.calls.append(("step", self.current()))
        if self.body_error is not None and self.allocating_to_pool:  # only inside the capture
            raise self.body_error
        return "logits"


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    def make(**kwargs):
        fake = _FakeCuda(**kwargs)
        fake.default = fake.stream_now = fake.Stream("cuda")
        fake.install(monkeypatch)
        return fake
    return make


def test_capture_runs_on_the_models_device_and_its_own_stream(fake_cuda_graphs):
    fake = fake_cuda_graphs()
    graph, out, stream = steps.capture_graph(fake.body, torch.device("cuda", 1))
    begin = next(c for c in fake.calls if c[0] == "begin")
    assert begin[1] == "capture-stream" and begin[2] == ("cuda:1",)  # under torch.cuda.device(cuda:1)
    assert begin[3] == "thread_local"
    assert out == "logits" and isinstance(stream, fake.Stream) and stream is not fake.default
    assert fake.current() == "default-stream" and not fake.allocating_to_pool
    import gc

    second = steps.capture_graph(fake.body, torch.device("cuda", 1))
    third = steps.capture_graph(fake.body, torch.device("cuda", 1))
    assert len({stream.stream_id, second[2].stream_id, third[2].stream_id}) == 3
    freed = third[2].stream_id
    del third
    gc.collect()
    # The pool wraps around to the first two streams: live graphs were captured on them, so they are skipped.
    fourth = steps.capture_graph(fake.body, torch.device("cuda", 1))
    assert fourth[2].stream_id == freed
    del graph, second, fourth
    gc.collect()
    assert not +steps._GRAPH_STREAMS  # every dropped graph freed its stream


def test_a_failed_capture_puts_the_stream_and_allocator_back(fake_cuda_graphs):
    """torch.cuda.graph leaves the thread on the capture stream and the allocator
    allocating to the graph's pool when capture_end raises after an in-capture sync."""
    fake = fake_cuda_graphs(body_error=RuntimeError("CUDA error: operation not permitted when stream is capturing"),
                            end_error=RuntimeError("CUDA error: operation failed due to a previous error during capture"))
    with pytest.raises(RuntimeError, match="not permitted when stream is capturing"):  # the first error, not the second
        steps.capture_graph(fake.body, torch.device("cuda", 0))
    assert fake.current() == "default-stream"
    assert not fake.allocating_to_pool
    assert ("release_pool", 0, (0, 7)) in fake.calls


def test_a_capture_end_failure_puts_the_stream_and_allocator_back(fake_cuda_graphs):
    fake = fake_cuda_graphs(end_error=RuntimeError("CUDA error: capture invalidated"))
    with pytest.raises(RuntimeError, match="capture invalidated"):
        steps.capture_graph(fake.body, torch.device("cuda", 0))
    assert fake.current() == "default-stream" and not fake.allocating_to_pool
    assert ("release_pool", 0, (0, 7)) in fake.calls


def test_a_body_error_with_a_valid_capture_drops_the_graph(fake_cuda_graphs):
    fake = fake_cuda_graphs(body_error=ValueError("a Python error inside the step"))
    with pytest.raises(ValueError):
        steps.capture_graph(fake.body, torch.device("cuda", 0))
    assert fake.current() == "default-stream" and "reset" in fake.calls
    assert not any(c[0] == "release_pool" for c in fake.calls if isinstance(c, tuple))  # reset gives it back


class _Module(torch.nn.Module):
    pass


def _adapter(model, split=False):
    return type("Adapter", (), {"model": model, "is_split": split})()


def test_graphs_are_never_tried_where_capture_must_fail():
    int8 = type("Linear8bitLt", (torch.nn.Linear,), {})
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), int8(2, 2))
    assert "bnb-8bit" in steps.graph_blocker(_adapter(model))
    offloaded = torch.nn.Sequential(torch.nn.Linear(2, 2))
    offloaded[0]._hf_hook = type("Hook", (), {"offload": True})()
    assert "offloaded" in steps.graph_blocker(_adapter(offloaded))
    assert "split" in steps.graph_blocker(_adapter(torch.nn.Linear(2, 2), split=True))
    assert steps.graph_blocker(_adapter(torch.nn.Linear(2, 2))) is None


def test_out_of_memory_during_capture_is_the_packs_error_not_a_silent_fallback(tiny_dir, frames, monkeypatch):
    from adatp_core.models.loader import load_video_llm

    model = load_video_llm(tiny_dir, device="cpu", dtype="float32")

    def oom(fn, dev):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB")

    init = static_decode.StaticDecoder.__init__

    def with_graph(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.use_graph = True  # as on CUDA

    monkeypatch.setattr(steps, "capture_graph", oom)
    monkeypatch.setattr(static_decode.StaticDecoder, "__init__", with_graph)
    with pytest.raises(AdaTPEnvironmentError, match="out of memory during generation"):
        generate_answer(_state(model, frames[:2]), SamplingConfig(max_new_tokens=3, decode_mode="static"))
    assert len(model.static_decoders) == 0  # the bucket is not pinned to eager mode: it is gone


# ----- 6. multi-GPU placement sizes bitsandbytes layers at their quantized size --------------------

def test_a_4bit_model_that_fits_the_gpus_is_placed(tiny_dir, tiny):
    import transformers

    from adatp_core.models.llava_onevision import LlavaOnevisionAdapter
    from adatp_core.models.placement import split_device_map
    from adatp_core.models.quantize import bitsandbytes_config

    config = transformers.AutoConfig.from_pretrained(tiny_dir)
    total = sum(t.numel() * t.element_size() for t in tiny.model.state_dict().values())
    budget = {0: int(total * 0.6), 1: int(total * 0.6), "cpu": 0}

    def plan(quantization):
        return split_device_map(transformers.LlavaOnevisionForConditionalGeneration, config, torch.float32,
                                LlavaOnevisionAdapter.input_modules, max_memory=budget, quantization=quantization)

    with pytest.raises(AdaTPEnvironmentError, match="bnb-4bit"):
        plan(None)  # float32 does not fit in 2 x 60%
    four = bitsandbytes_config("bnb-4bit", torch.float32, LlavaOnevisionAdapter.unquantized_modules)
    assert set(plan(four).values()) <= {0, 1}  # a quarter of the decoder's Linear weights (an eighth of fp32) fits
    small = {0: int(total * 0.3), 1: int(total * 0.3), "cpu": 0}
    with pytest.raises(AdaTPEnvironmentError) as info:
        split_device_map(transformers.LlavaOnevisionForConditionalGeneration, config, torch.float32,
                         LlavaOnevisionAdapter.input_modules, max_memory=small, quantization=four)
    assert "bnb-4bit" not in str(info.value)  # never advise what the user already chose


def test_quantized_sizes_leave_the_skipped_modules_and_non_linear_weights_alone(tiny):
    from accelerate.utils import CustomDtype

    from adatp_core.models.placement import quantized_sizes
    from adatp_core.models.quantize import bitsandbytes_config

    cfg = bitsandbytes_config("bnb-8bit", torch.bfloat16, tiny.adapter.unquantized_modules)
    dtype, special = quantized_sizes(tiny.model, torch.bfloat16, cfg)
    assert dtype == torch.int8
    names = dict(tiny.model.named_parameters())
    assert "model.language_model.layers.0.self_attn.q_proj.weight" not in special  # quantized
    assert special["model.language_model.layers.0.self_attn.q_proj.bias"] == torch.bfloat16
    assert special["model.language_model.embed_tokens.weight"] == torch.bfloat16
    assert all(special[n] == torch.bfloat16 for n in names if n.startswith(("model.vision_tower.", "lm_head.")))
    four = bitsandbytes_config("bnb-4bit", torch.bfloat16, tiny.adapter.unquantized_modules)
    assert quantized_sizes(tiny.model, torch.bfloat16, four)[0] == CustomDtype.INT4


# ----- 7. dtype auto: bf16 only where it is native -------------------------------------------------

@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
@pytest.mark.parametrize("old_torch", [False, True])
def test_dtype_auto_is_float16_before_ampere(monkeypatch, capability, expected, old_torch):
    from adatp_core.models.loader import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    if old_torch:  # no including_emulation argument; emulated bf16 counts
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    else:  # torch's own rule: native from sm80, else emulation when asked for
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: capability >= (8, 0) or including_emulation)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == expected
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


# ----- 8. device "cuda" becomes an indexed device -----------------------------------------------

@pytest.fixture
def two_gpus_current_1(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)


def test_device_cuda_is_the_current_gpu_by_index(two_gpus_current_1):
    from adatp_core.models.loader import resolve_device

    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")


def test_the_load_node_makes_room_on_the_indexed_device(two_gpus_current_1, monkeypatch):
    from comfy_stub import make_comfy
    from pack import pack_module

    bridge = pack_module("nodes.comfy_bridge")
    mm, mp = make_comfy(torch.device("cuda"), torch.device("cpu"))  # ComfyUI reporting a bare "cuda"
    freed = []
    monkeypatch.setattr(mm, "free_memory", lambda num_bytes, device, keep_loaded=(): freed.append(device))
    monkeypatch.setattr(bridge, "model_management", mm)
    assert bridge.compute_device("cuda") == torch.device("cuda", 1)
    assert bridge.compute_device("auto") == torch.device("cuda", 1)
    assert bridge.compute_device("multi-gpu") == "multi-gpu"
    load_model = pack_module("nodes.load_model")
    monkeypatch.setattr(load_model, "load_video_llm", lambda *a, **k: (_ for _ in ()).throw(LoaderStopped()))
    with pytest.raises(LoaderStopped):
        load_model.AdaTP_LoadVideoLLM().load("adatp-tiny (built-in, random weights)", "float32", "sdpa",
                                             "cuda", True)
    assert freed == [torch.device("cuda", 1)]  # equal to the device the model is tracked on


# ----- 9. auto mode: static only while the cache is short ----------------------------------------

def test_auto_mode_picks_by_cached_length():
    cap = steps.STATIC_AUTO_MAX_CAPACITY
    assert steps.static_pays_off([1000] * 28, 128)
    assert steps.static_pays_off([6000] * 2 + [1500] * 26, 128)  # K=2, R=0.25 on 32 frames
    assert not steps.static_pays_off([cap] * 28, 128)  # the bucket doubles past the limit
    assert not steps.static_pays_off([32000] * 28, 128)


def test_auto_mode_decodes_long_caches_step_by_step(tiny, frames, monkeypatch):
    from adatp_core import generate

    monkeypatch.setattr(generate, "resolve_decode_mode", lambda mode, device: "static" if mode == "auto" else mode)
    s = _state(tiny, frames[:2])
    short = generate_answer(s, SamplingConfig(max_new_tokens=2, ignore_eos=True))
    assert short.stats["decode_mode"] == "static"
    monkeypatch.setattr(steps, "STATIC_AUTO_MAX_CAPACITY", 128)
    long = generate_answer(s, SamplingConfig(max_new_tokens=2, ignore_eos=True))
    assert long.stats["decode_mode"] == "default" and long.token_ids == short.token_ids
    forced = generate_answer(s, SamplingConfig(max_new_tokens=2, ignore_eos=True, decode_mode="static"))
    assert forced.stats["decode_mode"] == "static"  # an explicit choice is kept


# ----- 10. the smaller things ---------------------------------------------------------------------

def test_a_non_finite_value_in_a_reused_buffer_cannot_poison_the_next_answer(tiny_dir, frames):
    from adatp_core.models.loader import load_video_llm

    model = load_video_llm(tiny_dir, device="cpu", dtype="float32")
    s = _state(model, frames[:2])
    cfg = dict(max_new_tokens=4, ignore_eos=True)
    default = generate_answer(s, SamplingConfig(**cfg, decode_mode="default"), return_logits=True)
    generate_answer(s, SamplingConfig(**cfg, decode_mode="static"))
    (decoder,) = model.static_decoders._decoders.values()
    with torch.inference_mode():
        for buffer in (t for t in (*decoder.cache.keys, *decoder.cache.values) if t is not None):
            buffer.fill_(float("nan"))  # what an fp16 overflow in an earlier answer leaves behind
    static = generate_answer(s, SamplingConfig(**cfg, decode_mode="static"), return_logits=True)
    assert torch.isfinite(static.logits).all()
    assert static.token_ids == default.token_ids
    assert (static.logits - default.logits).abs().max().item() < 1e-5


def test_extract_attention_out_of_memory_drops_the_static_buffers(tiny_dir, frames, monkeypatch):
    from adatp_core.models.loader import load_video_llm

    model = load_video_llm(tiny_dir, device="cpu", dtype="float32")
    generate_answer(_state(model, frames[:2]), SamplingConfig(max_new_tokens=2, decode_mode="static"))
    assert len(model.static_decoders) == 1

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert len(model.prefix_cache) == 1  # the answer's video prefix is kept for a next question
    monkeypatch.setattr(model.adapter, "encode", oom)
    with pytest.raises(AdaTPEnvironmentError, match="out of memory during vision encoding"):
        extract_attention(model, frames[2:], QUESTION)  # other frames: the prefix misses, the video is encoded
    assert len(model.static_decoders) == 0 and len(model.prefix_cache) == 0


def _old_top_p(logits, cfg, generator):
    """next_token as it was, with the boolean index."""
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    sorted_probs, idx = torch.sort(probs, descending=True)
    outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= cfg.top_p
    sorted_probs[outside] = 0.0
    probs = torch.zeros_like(probs).scatter_(0, idx, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def test_top_p_has_no_boolean_index_and_draws_the_same_tokens():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    # top_k off and no penalty: unset, they would take transformers' defaults (top_k 50), which the old code lacked
    cfg = SamplingConfig(do_sample=True, temperature=0.8, top_p=0.7, top_k=0, repetition_penalty=1.0)
    for seed in range(20):
        logits = torch.randn(500, generator=torch.Generator().manual_seed(seed)) * 3
        ours = next_token(logits, cfg, torch.Generator().manual_seed(seed))
        assert ours == _old_top_p(logits, cfg, torch.Generator().manual_seed(seed))
    with Ops() as ops:
        next_token(logits, cfg, torch.Generator().manual_seed(0))
    assert not [n for n in ops.names if "nonzero" in n or "index_put" in n]  # each a host sync on CUDA
    assert sum("_local_scalar_dense" in n for n in ops.names) == 1  # the chosen token only
