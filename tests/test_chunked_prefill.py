"""Issue 30, items 3, 4, 5 and 9: the prefill in chunks, on every family's tiny model (float32, CPU).

Layers < K run over the video's part chunk by chunk into the cache, then the question in one call;
from K the kept tokens run chunk by chunk too. Against one call over the whole prompt: the same
scores (within 1e-6), keep set and greedy tokens, logits within the family's float32 tolerance
(tests/test_exactness.py, test_qwen_exactness.py, test_hybrid.py: 1e-5), and layer K's input
rows and layers < K's keys within that tolerance relative to their size. The chunks cut a frame
(LLaVA-OV) or a temporal patch (Qwen) in two, and on the hybrid models fall on the 64-token grid
of the linear-attention layers. A reused prefix may be chunked; where the rows live is decided
from the memory estimate.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import QUESTION
from hybrid_fixtures import HYBRID_BUILDERS
from qwen_fixtures import BUILDERS as QWEN_BUILDERS
from qwen_fixtures import qwen_cache  # noqa: F401  (the session's folder of tiny models)

from adatp_core.attention import DEFAULT_PREFILL_CHUNK, _prompt_spans, extract_attention
from adatp_core.errors import AdaTPInputError
from adatp_core.generate import SamplingConfig, generate_answer
from adatp_core.hf.cache import KVCache
from adatp_core.models.tiny import ensure_tiny_model
from adatp_core.pipeline import PipelineConfig, select

TOL = 1e-5
STEPS = 8
FAMILIES = {"llava_onevision": ensure_tiny_model, **QWEN_BUILDERS, **HYBRID_BUILDERS}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def llm(family, qwen_cache):  # noqa: F811
    from adatp_core.models.loader import load_video_llm

    return load_video_llm(FAMILIES[family](qwen_cache), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def video(family):
    """LLaVA-OV: 2 frames of 196 tokens; Qwen: 5 frames (3 temporal patches, the last padded)."""
    from adatp_core.samples import scene_frames

    t, w, h = (2, 128, 96) if family == "llava_onevision" else (5, 280, 224)
    return torch.from_numpy(scene_frames(num_frames=t, width=w, height=h, scenes=2)).float() / 255


@pytest.fixture(scope="module")
def one_pass(llm, video):
    """The reference: the whole prompt in one call, its selection and answer."""
    state = extract_attention(llm, video, QUESTION, layer=llm.adapter.default_layer(), reuse_prefix=False,
                              prefill_chunk=0)
    selected = select(state, PipelineConfig(retention=0.25))
    return state, selected, _answer(selected)


def _answer(state):
    return generate_answer(state, SamplingConfig(max_new_tokens=STEPS, ignore_eos=True), return_logits=True)


def _hybrid(llm) -> bool:
    return bool(llm.adapter._linear_layers)


def _calls(llm, monkeypatch) -> list:
    """Every run_layers call from now on, as (first layer, tokens)."""
    calls, real = [], llm.adapter.run_layers

    def spy(hidden, position_ids, cache, start, stop, **kwargs):
        calls.append((start, hidden.shape[1]))
        return real(hidden, position_ids, cache, start, stop, **kwargs)

    monkeypatch.setattr(llm.adapter, "run_layers", spy)
    return calls


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = (ours - ref).abs().max().item()
    assert err <= TOL * max(ref.abs().max().item(), 1.0), f"{what}: max error {err:.3g}"


def _same_as_one_pass(state, one_pass) -> None:
    ref, ref_selected, ref_answer = one_pass
    assert (state.scores - ref.scores).abs().max().item() < 1e-6
    _close(state.hidden, ref.hidden, "layer K's input rows")
    for i, (ours, theirs) in enumerate(zip(state.past_kv, ref.past_kv)):
        for a, b in zip(ours, theirs):  # keys and values, or a linear layer's conv and recurrent states
            if isinstance(a, torch.Tensor):
                _close(a, b, f"layer {i}'s past")
    selected = select(state, PipelineConfig(retention=0.25))
    assert torch.equal(selected.keep, ref_selected.keep)
    answer = _answer(selected)
    assert answer.token_ids == ref_answer.token_ids
    assert answer.logits.shape[0] == STEPS  # the prefill's token and 7 decode steps, compared below
    err = (answer.logits - ref_answer.logits).abs().max().item()
    assert err < TOL, f"max logit error {err:.3g}"
    assert answer.stats["kv_lengths"] == ref_answer.stats["kv_lengths"]


@pytest.mark.parametrize("chunk", [50, 128])
def test_a_chunked_prefill_gives_what_one_call_gives(llm, video, one_pass, chunk, monkeypatch):
    """Without the prefix store: layers < K over the video in chunks, the question in one call,
    then the kept tokens from K in chunks of the same size."""
    layer = llm.adapter.default_layer()
    calls = _calls(llm, monkeypatch)
    state = extract_attention(llm, video, QUESTION, layer=layer, reuse_prefix=False, prefill_chunk=chunk)
    spans = _prompt_spans(llm.adapter, state.prompt, chunk)
    assert state.stats["prefill_calls"] == len(spans) >= 3 and state.stats["prefill_chunk"] == chunk
    assert calls == [(0, b - a) for a, b in spans]
    assert state.prefill_chunk == chunk
    _same_as_one_pass(state, one_pass)
    from_k = [n for start, n in calls if start == layer]
    kept = len(select(state, PipelineConfig(retention=0.25)).kept_positions())
    assert from_k == [b - a for a, b in llm.adapter.chunk_spans(0, kept, chunk)]
    assert len(from_k) > 1 or chunk >= kept


def test_a_tail_call_in_blocks_gives_what_one_call_gives(llm, video, one_pass, monkeypatch):
    """A call over a non-empty cache attends through a TailCausal, not a [chunk, prompt] mask: with a
    mask budget of one byte its queries run in blocks of MIN_TAIL_ROWS (24 here: a last block
    shorter), and the results are one call's."""
    from adatp_core import budget
    from adatp_core.hf import attention_hook

    monkeypatch.setattr(budget, "TAIL_MASK_BYTES", 1)
    monkeypatch.setattr(budget, "MIN_TAIL_ROWS", 24)
    blocks, real = [], attention_hook.TailCausal.attend

    def spy(self, query, *args):
        blocks.append((query.shape[2], self.rows(query.element_size())))
        return real(self, query, *args)

    monkeypatch.setattr(attention_hook.TailCausal, "attend", spy)
    layer = llm.adapter.default_layer()
    state = extract_attention(llm, video, QUESTION, layer=layer, reuse_prefix=False, prefill_chunk=128)
    assert blocks and all(rows == min(n, budget.MIN_TAIL_ROWS) for n, rows in blocks)
    assert any(n > rows and n % rows for n, rows in blocks)  # several blocks, the last one shorter
    _same_as_one_pass(state, one_pass)


@pytest.mark.parametrize("past, n, mask_bytes", [(100, 37, 1), (5, 70, 64 * 75 * 4), (3, 200, 1 << 20), (1, 1, 1)])
def test_a_tail_mask_attends_as_the_dense_mask_within_its_budget(past, n, mask_bytes):
    """TailCausal.attend against transformers' sdpa under the bool mask it stands in for (keys and
    values copied per query head there, shared here); its additive mask stays within the budget
    (at least MIN_TAIL_ROWS rows); a kernel other than sdpa gets the dense mask."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from adatp_core.budget import MIN_TAIL_ROWS
    from adatp_core.hf.attention_hook import TailCausal, _wrapper, causal_tail_mask

    gen = torch.Generator().manual_seed(past + n)
    q = torch.randn(1, 4, n, 16, generator=gen)
    k, v = torch.randn(2, 1, 2, past + n, 16, generator=gen)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, scaling=0.25)
    ref, _ = sdpa_attention_forward(module, q, k, v, causal_tail_mask(past, n, "cpu"), scaling=0.25)
    tail = TailCausal(past, n, mask_bytes)
    got, _ = _wrapper(sdpa_attention_forward, sdpa_attention_forward)(module, q, k, v, tail, scaling=0.25)
    assert got.shape == ref.shape and (got - ref).abs().max().item() < 1e-6
    bias = tail.bias(torch.float32, "cpu")
    assert bias.shape == (min(n, max(MIN_TAIL_ROWS, mask_bytes // ((past + n) * 4))), past + n)
    seen = []
    _wrapper(lambda module, q, k, v, mask, **kw: seen.append(mask), sdpa_attention_forward)(module, q, k, v, tail)
    assert torch.equal(seen[0], causal_tail_mask(past, n, "cpu"))


def test_the_chunks_cut_frame_groups_and_sit_on_the_linear_grid(llm, video, one_pass):
    """A boundary falls inside a frame's tokens (LLaVA-OV) or a temporal patch's (Qwen: two frames
    per patch). On a hybrid model every boundary is on the linear layers' 64-token grid: a chunk
    of 50 or 100 runs as 64, and 128 as 128."""
    prompt = one_pass[0].prompt
    per_step = prompt.plan.tokens_per_step
    first = int(prompt.visual_positions[0])
    for chunk in (50, 64, 128):
        spans = _prompt_spans(llm.adapter, prompt, chunk)
        inner = [a for a, _ in spans[1:-1]]  # boundaries inside the video's part
        assert any(first < b < first + prompt.plan.num_tokens and (b - first) % per_step for b in inner), spans
        if _hybrid(llm):
            assert all(a % 64 == 0 for a, _ in spans)
            size = 128 if chunk == 128 else 64
            assert all(b - a == size for a, b in spans[:-2])
    if _hybrid(llm):
        assert _prompt_spans(llm.adapter, prompt, 50) == _prompt_spans(llm.adapter, prompt, 100)


def test_a_prompt_within_one_chunk_runs_in_one_call(llm, video, one_pass, monkeypatch):
    """The default chunk holds a short video: one call below K and one from K, the very numbers of
    prefill_chunk=0."""
    calls = _calls(llm, monkeypatch)
    state = extract_attention(llm, video, QUESTION, layer=llm.adapter.default_layer(), reuse_prefix=False)
    assert state.stats["prefill_calls"] == 1 and state.prefill_chunk == DEFAULT_PREFILL_CHUNK
    ref = one_pass[0]
    assert torch.equal(state.hidden, ref.hidden) and torch.equal(state.scores, ref.scores)
    answer = _answer(select(state, PipelineConfig(retention=0.25)))
    assert torch.equal(answer.logits, one_pass[2].logits)
    assert [start for start, _ in calls] == [0, state.layer] + [0] * (STEPS - 1)


def test_a_second_question_reuses_a_chunked_prefix(llm, video, one_pass, monkeypatch):
    """The long video's prefix is computed in chunks once and kept; the next question runs only its
    own tokens, with what one call over its whole prompt gives. The chunk is part of the key (a
    chunked prefix equals one pass within float tolerance, not bit for bit)."""
    store = llm.prefix_cache
    store.clear()
    layer = llm.adapter.default_layer()
    first = extract_attention(llm, video, "Why?", layer=layer, prefill_chunk=64)
    assert first.stats["prefix_cache"] == "miss" and first.stats["prefill_calls"] >= 3
    calls = _calls(llm, monkeypatch)
    second = extract_attention(llm, video, QUESTION, layer=layer, prefill_chunk=64)
    assert second.stats["prefix_cache"] == "hit" and second.stats["prefill_calls"] == 1
    assert calls == [(0, second.prompt.length - second.stats["prefix_tokens"])]
    _same_as_one_pass(second, one_pass)
    assert extract_attention(llm, video, QUESTION, layer=layer, prefill_chunk=0).stats["prefix_cache"] == "miss"
    assert len(store) == 2
    store.clear()


def test_deepstack_features_below_k_are_let_go_after_the_prefill(llm, video, one_pass):
    """Layers < K ran over every visual token: the state and the stored prefix keep only the DeepStack
    features of layers >= K (None below; families without DeepStack have none), and a second question
    over the stored prefix still gives one call's numbers."""
    store = llm.prefix_cache
    store.clear()
    layer = llm.adapter.default_layer()
    first = extract_attention(llm, video, "Why?", layer=layer, prefill_chunk=64)
    (prefix,) = store._entries.values()
    for held in (first.injections, prefix.encoded.injections):
        assert all(f is None for f in held[:layer]) and all(isinstance(f, torch.Tensor) for f in held[layer:])
    assert bool(first.injections) == (llm.adapter.family in ("qwen3_vl", "qwen3_vl_moe"))
    _same_as_one_pass(extract_attention(llm, video, QUESTION, layer=layer, prefill_chunk=64), one_pass)
    store.clear()


def test_rows_kept_elsewhere_give_the_same_answer(llm, video, one_pass):
    """Layer K's input rows written chunk by chunk into a buffer of their own (where a GPU run
    puts them on the host), and only the kept rows read back."""
    from adatp_core import attention
    from adatp_core.places import Place, Places

    layer = llm.adapter.default_layer()
    state = extract_attention(llm, video, QUESTION, layer=layer, reuse_prefix=False, prefill_chunk=64)
    times: dict = {}
    spans = _prompt_spans(llm.adapter, state.prompt, 64)
    places = Places(encoded=Place(False, ""), rows=Place(True, "asked for"))
    _, hidden, *_ = attention._prefill(llm.adapter, video, state.prompt, layer, "text", times, spans, places)
    assert torch.equal(hidden, state.hidden) and hidden.is_contiguous()
    assert state.stats["rows_on"] == "host" and state.stats["rows_reason"] == "the model runs on the host"


@pytest.mark.parametrize("chunk", [-1, 1, 15, True, 2.5, "64", 1 << 25])
def test_a_bad_chunk_is_refused_with_what_to_give(tiny, frames, chunk):
    with pytest.raises(AdaTPInputError, match="prefill_chunk must be 0 .* or between 16 and"):
        extract_attention(tiny, frames, QUESTION, prefill_chunk=chunk)
    with pytest.raises(AdaTPInputError, match="rows must be one of"):
        extract_attention(tiny, frames, QUESTION, rows="gpu")


def test_a_cache_reserves_room_per_layer():
    """KVCache takes one reserve per layer: a chunked prefill reserves the rest of the prompt at a
    layer's first call, so no later call copies the layer's keys again."""
    cache = KVCache(2, reserve=(0, 6))
    k = torch.zeros(1, 1, 4, 2)
    for i in range(2):
        cache.layers[i].update(k, k)
    keys_before = cache.layers[1].keys.data_ptr()
    cache.layers[1].update(k[:, :, :3], k[:, :, :3])
    assert cache.layers[1].keys.data_ptr() == keys_before and cache.lengths() == (4, 7)
    assert cache.layers[0]._buffers[0].shape[-2] == 4 and cache.layers[1]._buffers[0].shape[-2] == 10
    with pytest.raises(ValueError, match="3 reserves for a cache of 2 layers"):
        KVCache(2, reserve=(1, 2, 3))


def test_the_cli_takes_the_chunk_and_the_stats_say_how_the_prefill_ran(tiny_dir, monkeypatch, capsys):
    """--prefill-chunk reaches the prefill; the report names the calls (and says nothing for a
    prompt within one chunk)."""
    from adatp_core import cli

    monkeypatch.setenv("ADATP_CACHE_DIR", str(tiny_dir.parent))
    argv = ["--frames", "2", "--max-new-tokens", "2", "--question", "Who?"]
    assert cli.main([*argv, "--prefill-chunk", "128", "--json"]) == 0
    chunked = json.loads(capsys.readouterr().out)
    assert chunked["prefill_chunk"] == 128 and chunked["prefill_calls"] >= 3
    assert cli.main([*argv, "--prefill-chunk", "128"]) == 0
    assert f"Prefill: layers < K in {chunked['prefill_calls']} calls (the video's part in chunks of up to 128 " \
        "tokens" in capsys.readouterr().out
    assert cli.main(argv) == 0
    assert "Prefill:" not in capsys.readouterr().out
    assert cli.main([*argv, "--prefill-chunk", "8"]) == 2
    assert "prefill_chunk must be 0" in capsys.readouterr().err


def test_a_refused_lower_right_flash_call_falls_back_to_the_blocks_once(monkeypatch, caplog):
    """A torch whose flash call refuses what can_use_flash_attention accepted (a new release) gets one
    warning and None (the caller's blocks run, same result), and is not asked again; out of memory is
    raised, not hidden."""
    import torch.backends.cuda as cuda_backends

    from adatp_core.hf import attention_hook

    monkeypatch.setattr(attention_hook, "_FLASH_REFUSED", set())
    monkeypatch.setattr(cuda_backends, "can_use_flash_attention", lambda params: True)
    calls = []

    def broken(*args, **kwargs):
        calls.append(kwargs.get("attn_mask"))
        raise RuntimeError("No available kernel. Aborting execution.")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", broken)
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    with caplog.at_level("WARNING", logger="adatp_core.hf.attention_hook"):
        assert attention_hook._lower_right_or_none(q, k, v, None, True, "GPU 0") is None
        assert attention_hook._lower_right_or_none(q, k, v, None, True, "GPU 0") is None
    assert len(calls) == 1 and len([r for r in caplog.records if "blocks of sdpa" in r.message]) == 1

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", oom)
    with pytest.raises(torch.OutOfMemoryError):
        attention_hook._lower_right_or_none(q, k, v, None, True, "GPU 1")


def test_a_changed_flash_api_costs_speed_not_the_answer(monkeypatch):
    """A torch whose SDPAParams or can_use_flash_attention changed signature (as 2.5's enable_gqa did) is
    caught like a refused call: None, so the blocks run."""
    import torch.backends.cuda as cuda_backends

    from adatp_core.hf import attention_hook

    monkeypatch.setattr(attention_hook, "_FLASH_REFUSED", set())

    def changed(*args):
        raise TypeError("SDPAParams() takes 8 positional arguments but 7 were given")

    monkeypatch.setattr(cuda_backends, "SDPAParams", changed)
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    assert attention_hook._lower_right_or_none(q, k, v, None, True, "GPU 0") is None
    assert ("GPU 0" in str(attention_hook._FLASH_REFUSED))


def test_the_memory_model_counts_per_head_key_copies_where_the_kernel_makes_them():
    """Blocks on the CPU share a group's keys; off the CPU without flash (float32, MPS, pre-Ampere, ROCm)
    the mask-taking kernel needs them copied per query head: the estimate counts one layer's copy."""
    from adatp_core.budget import prefill_parts, tail_copies_keys

    assert not tail_copies_keys("host", 2, 128) and not tail_copies_keys("cpu", 4, 128)
    assert tail_copies_keys("mps", 2, 128) and tail_copies_keys("cuda:0", 4, 128)
    assert tail_copies_keys("cuda:0", 2, 512)
    args = dict(length=100_000, attention_layers=2, kv_heads=8, head_dim=128, heads=32, d_model=4096, inner=12288,
                chunk=8192, item=2)
    on = {where: prefill_parts(**args, where=where)[2][1] for where in ("cpu", "mps")}
    assert on["mps"] - on["cpu"] == 2 * 32 * 128 * 100_000 * 2
    one_call = {where: prefill_parts(**{**args, "chunk": 0}, where=where)[2][1] for where in ("cpu", "mps")}
    assert one_call["mps"] == one_call["cpu"]  # one call over an empty cache: no tail, no copy
