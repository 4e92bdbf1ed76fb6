"""The video prefix cache (cache.FrozenPrefix, cache.PrefixStore, attention.py): a new
question about the same frames runs only its own tokens through layers < K, and gets
what a full prefill gives (float32, CPU). tests/test_qwen_prefix_cache.py runs these on
the tiny Qwen2.5-VL and Qwen3-VL."""

from __future__ import annotations

import gc
import types
import weakref

import pytest
import torch
from conftest import QUESTION

from adatp_core.attention import extract_attention
from adatp_core.debias import global_debias, local_debias
from adatp_core.generate import SamplingConfig, generate_answer
from adatp_core.prune import prune_tokens

QUESTIONS = (QUESTION, "Why?", "Describe every object and person in this clip, what moves and in which order.")
STEPS = 6
REL = 1e-6  # float32: |cached - full| <= 1e-6 * the full prefill's largest magnitude


@pytest.fixture(scope="module")
def model(tiny_dir):
    """A model of its own: these tests fill and clear its prefix store."""
    from adatp_core.models.loader import load_video_llm

    return load_video_llm(tiny_dir, device="cpu", dtype="float32")


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = (ours - ref).abs().max().item() if ref.numel() else 0.0
    scale = max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert err <= REL * scale, f"{what}: max error {err:.3g} at magnitude {scale:.3g}"


def _answer(state):
    pruned = prune_tokens(local_debias(global_debias(state)), 0.25)
    return pruned.keep, generate_answer(pruned, SamplingConfig(max_new_tokens=STEPS, ignore_eos=True),
                                        return_logits=True)


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
@pytest.mark.parametrize("query", ["text", "last"])
def test_cached_path_equals_the_full_prefill(model, frames, layer, query):
    """Questions of different lengths in two orders (medium, short, long; long, medium, short):
    the first computes and keeps the prefix, the others reuse it; each gets the full prefill's
    scores, keep set, logits and greedy tokens."""
    model.prefix_cache.clear()
    order = (0, 1, 2) if query == "text" else (2, 0, 1)
    for i, q in enumerate(QUESTIONS[j] for j in order):
        full = extract_attention(model, frames, q, layer, query, reuse_prefix=False)
        cached = extract_attention(model, frames, q, layer, query)
        assert full.stats["prefix_cache"].startswith("off")
        assert cached.stats["prefix_cache"] == ("miss" if i == 0 else "hit")
        if i:
            assert cached.stats["time_vision"] == 0.0 and cached.stats["time_preprocess"] == 0.0
        assert cached.stats["prefix_tokens"] == cached.prompt.after_video
        assert torch.equal(cached.prompt.input_ids, full.prompt.input_ids)
        assert torch.equal(cached.position_ids, full.position_ids)
        assert (cached.scores - full.scores).abs().max().item() <= REL, "scores"
        assert torch.equal(cached.relevance, full.relevance)
        _close(cached.hidden, full.hidden, "layer-K input")
        assert len(cached.past_kv) == len(full.past_kv) == layer
        for (k, v), (rk, rv) in zip(cached.past_kv, full.past_kv):
            _close(k, rk, "keys")
            _close(v, rv, "values")
        keep, ours = _answer(cached)
        ref_keep, ref = _answer(full)
        assert torch.equal(keep, ref_keep)
        assert ours.token_ids == ref.token_ids
        _close(ours.logits, ref.logits, "logits")


@pytest.mark.parametrize("layer", [0, 2])
def test_a_hit_is_bit_identical_to_a_fresh_model(model, frames, layer):
    """The same arithmetic on the same tensors: a question answered from a kept prefix gives
    exactly what a freshly started model (a miss) gives; at K = 0 also exactly the full prefill."""
    model.prefix_cache.clear()
    fresh = extract_attention(model, frames, QUESTIONS[1], layer)
    extract_attention(model, frames, QUESTIONS[2], layer)
    again = extract_attention(model, frames, QUESTIONS[1], layer)
    assert (fresh.stats["prefix_cache"], again.stats["prefix_cache"]) == ("miss", "hit")
    for a, b in [(fresh.scores, again.scores), (fresh.hidden, again.hidden),
                 *[(x, y) for kv, kv2 in zip(fresh.past_kv, again.past_kv) for x, y in zip(kv, kv2)]]:
        assert torch.equal(a, b)
    assert torch.equal(_answer(fresh)[1].logits, _answer(again)[1].logits)
    if layer == 0:
        full = extract_attention(model, frames, QUESTIONS[1], layer, reuse_prefix=False)
        assert torch.equal(full.hidden, again.hidden) and torch.equal(full.scores, again.scores)


def _times(n: int, step: float):
    return types.SimpleNamespace(timestamps=[i * step for i in range(n)])


def test_only_identical_frames_and_settings_hit(model, frames):
    """The key is exact: a copy of the same frames hits; one changed value, another dtype,
    another pixel budget, other frame times or another K misses."""
    model.prefix_cache.clear()
    n = frames.shape[0]
    first = extract_attention(model, frames, QUESTION, 2, video_info=_times(n, 0.5))
    assert first.stats["prefix_cache"] == "miss"

    def status(f=frames, layer=2, info=_times(n, 0.5), max_pixels=None):
        return extract_attention(model, f, QUESTIONS[1], layer, video_info=info,
                                 max_pixels=max_pixels).stats["prefix_cache"]

    assert status(frames.clone()) == "hit"  # another tensor object, the same bytes
    changed = frames.clone()
    changed[-1, -1, -1, -1] = torch.nextafter(changed[-1, -1, -1, -1], torch.tensor(2.0))
    assert status(changed) == "miss"
    assert status((frames * 255).round().to(torch.uint8)) == "miss"
    assert status() == "hit"  # the first entry is still kept (3 of 4 entries)
    assert status(max_pixels=128 * 128) == "miss"
    assert status(info=_times(n, 1.0)) == "miss"
    assert status(layer=1) == "miss"


def test_memory_stays_within_budget_after_50_videos(model):
    """50 different videos: the store never holds more than its entries and bytes; a prefix
    larger than the whole budget is computed, used, and not kept (the stats say so)."""
    from adatp_core.prefix_cache import PrefixStore, tensor_bytes

    saved = model.prefix_cache
    gen = torch.Generator().manual_seed(0)
    try:
        probe = extract_attention(model, torch.rand(2, 48, 64, 3, generator=gen), QUESTION, 2)
        one = next(reversed(saved._entries.values())).nbytes if len(saved) else None  # the probe's
        assert one and probe.stats["prefix_cache"] == "miss"
        budget = int(2.5 * one)  # room for two
        object.__setattr__(model, "prefix_cache", PrefixStore(max_entries=4, max_bytes=budget))
        made = []  # every prefix's visual tokens, weakly: evicted ones must really be freed
        for i in range(50):
            video = torch.rand(2, 48, 64, 3, generator=gen)
            state = extract_attention(model, video, QUESTION, 2)
            assert state.stats["prefix_cache"] == "miss"
            store = model.prefix_cache
            assert len(store) <= 2 and store.nbytes <= budget
            assert store.nbytes == sum(tensor_bytes(p.encoded, p.key_values, p.hidden)
                                       for p in store._entries.values())
            made.append(weakref.ref(next(reversed(store._entries.values())).encoded.visual))
        del state
        gc.collect()
        assert sum(r() is not None for r in made) == len(model.prefix_cache) == 2
        assert extract_attention(model, video, QUESTIONS[1], 2).stats["prefix_cache"] == "hit"
        object.__setattr__(model, "prefix_cache", PrefixStore(max_entries=4, max_bytes=one // 2))
        state = extract_attention(model, video, QUESTION, 2)
        assert state.stats["prefix_cache"].startswith("miss (not kept:")
        assert len(model.prefix_cache) == 0
        assert "not kept" in state.stats["prefix_cache"] and torch.isfinite(state.scores).all()
    finally:
        object.__setattr__(model, "prefix_cache", saved)


def test_changed_or_moved_weights_drop_the_prefixes(model, frames):
    model.prefix_cache.clear()
    extract_attention(model, frames, QUESTION, 2)
    assert extract_attention(model, frames, QUESTIONS[1], 2).stats["prefix_cache"] == "hit"
    weight = model.adapter.text_model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        weight.mul_(1.0)  # written in place (as load_state_dict does): the values may have changed
    assert extract_attention(model, frames, QUESTIONS[1], 2).stats["prefix_cache"] == "miss"
    assert len(model.prefix_cache) == 1


def test_the_template_check_and_the_fallback(model, frames, monkeypatch):
    """Every family's template gives the same ids up to the video for any question; one that
    writes something of the question before the video is refused, and a refused model runs
    the full prefill, saying why."""
    from adatp_core.models.chat import video_prefix_refusal

    adapter = model.adapter
    assert adapter.prefix_refusal is None
    video_text = adapter.tokenizer.convert_ids_to_tokens(adapter.video_token_id)
    leaky = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content[1].text | length }} "
             "{{ '" + video_text + "' }}{{ m.content[1].text }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
    assert video_prefix_refusal(adapter.tokenizer, leaky, video_text) == (
        "the chat template puts question-dependent tokens before the video")
    monkeypatch.setattr(adapter, "prefix_refusal", "the chat template puts question-dependent tokens before the video")
    model.prefix_cache.clear()
    state = extract_attention(model, frames, QUESTION, 2)
    assert state.stats["prefix_cache"] == "off (the chat template puts question-dependent tokens before the video)"
    assert len(model.prefix_cache) == 0
    full = extract_attention(model, frames, QUESTION, 2, reuse_prefix=False)
    assert torch.equal(state.scores, full.scores) and torch.equal(state.hidden, full.hidden)


def test_stats_line_says_where_the_prefix_came_from(model, frames):
    from adatp_core.report import stats_text

    model.prefix_cache.clear()
    lines = [stats_text(extract_attention(model, frames, q, 2).stats).splitlines()[-1] for q in QUESTIONS[:2]]
    assert lines[0].startswith("Video prefix: computed and kept for the next question")
    assert lines[1].startswith("Video prefix: reused from an earlier question")
    assert "the question's own part" in lines[1]
