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


@pytest.fixture
def hashes(monkeypatch):
    """Every content hash of the frames (prefix_cache.frames_digest), as the frames' shapes (no
    reference to the frames: one would keep them alive)."""
    from adatp_core import prefix_cache

    calls, real = [], prefix_cache.frames_digest
    monkeypatch.setattr(prefix_cache, "frames_digest", lambda f, *a: calls.append(tuple(f.shape)) or real(f, *a))
    return calls


def test_the_same_tensor_again_is_keyed_without_hashing(model, frames, hashes):
    """The common case (ComfyUI hands a cached IMAGE back on every Run): the same tensor object,
    unwritten, is keyed by identity. A copy hits through the content hash; a write through the
    tensor or a view of it, inference mode included (ComfyUI runs nodes there), misses."""
    model.prefix_cache.clear()
    video = frames.clone()
    assert not video.is_inference()

    def status(f, q=QUESTIONS[1]):
        return extract_attention(model, f, q, 2).stats["prefix_cache"]

    assert status(video, QUESTION) == "miss" and len(hashes) == 1
    assert [status(video) for _ in range(3)] == ["hit"] * 3 and len(hashes) == 1  # no pass over the bytes
    assert status(video.clone()) == "hit" and len(hashes) == 2  # another object: its content
    video[0, 0, 0, 0] += 0.5
    assert status(video) == "miss" and len(hashes) == 3
    assert status(video) == "hit" and len(hashes) == 3
    with torch.inference_mode():
        video[1].mul_(0.5)  # through a view, in inference mode: the version counter still moves
    assert status(video) == "miss" and len(hashes) == 4
    with torch.no_grad():
        video.copy_(frames)  # written back to the first bytes: hashed, and the first prefix hits
    assert status(video) == "hit" and len(hashes) == 5


def test_inference_tensors_are_hashed_every_time(model, frames, hashes):
    """An inference tensor keeps no version counter, so it cannot vouch for its bytes: it is
    hashed on every question, and a write in place misses."""
    model.prefix_cache.clear()
    with torch.inference_mode():
        video = frames.clone()
    assert video.is_inference()
    statuses = [extract_attention(model, video, q, 2).stats["prefix_cache"] for q in QUESTIONS[:2]]
    assert statuses == ["miss", "hit"] and len(hashes) == 2
    with torch.inference_mode():
        video[-1, -1, -1, -1] = torch.nextafter(video[-1, -1, -1, -1], torch.tensor(2.0))
    assert extract_attention(model, video, QUESTIONS[1], 2).stats["prefix_cache"] == "miss"
    assert len(hashes) == 3


def test_a_freed_tensor_whose_id_is_reused_does_not_hit(hashes):
    """The identity is a weak reference. The worst case: the frames are freed, their bytes are
    written where no version counter sees it (through NumPy), and a new tensor lands at the
    same id and address with the same shape, strides, dtype and version. Its stamp is the
    freed one's, but it is another object: it is hashed, and keyed by its new bytes."""
    import numpy as np

    from adatp_core.prefix_cache import FrameKeys, _stamp

    keys = FrameKeys()
    array = np.zeros((4, 8, 8, 3), np.float32)
    old = torch.from_numpy(array)
    digest, ident, stamp = keys(old), id(old), _stamp(old)
    array[...] = 0.5
    del old  # freed at once (no cycle holds it); nothing is allocated before the pool
    pool = []  # tensors over the same bytes, until one is given the freed tensor's id
    for _ in range(10_000):
        pool.append(torch.from_numpy(array))
        if id(pool[-1]) == ident:
            break
    new = pool[-1]
    assert id(new) == ident and _stamp(new) == stamp, "no tensor landed at the freed one's id"
    assert keys(new) != digest and len(hashes) == 2
    assert keys(new) == keys(torch.full((4, 8, 8, 3), 0.5)) and len(hashes) == 3  # new: no hash; the copy: one


def test_the_device_digest_reads_every_byte(monkeypatch):
    """device_digest (run here on the CPU, with small blocks: chunks, padding): a copy and a
    strided view of the same values agree; one changed byte anywhere, another frame order,
    another shape or dtype over the same bytes differ; other weights give other digests."""
    from adatp_core import prefix_cache
    from adatp_core.prefix_cache import device_digest, digest_weights

    monkeypatch.setattr(prefix_cache, "DIGEST_BLOCK", 64)
    monkeypatch.setattr(prefix_cache, "DIGEST_CHUNK", 3)
    weights = digest_weights("cpu", seed=1)
    assert weights.shape == (prefix_cache.DIGEST_LANES, 64) and weights.dtype == torch.int64
    gen = torch.Generator().manual_seed(0)
    video = torch.rand(3, 5, 7, 3, generator=gen)  # 1,260 bytes: 20 blocks and a partial one
    digest = device_digest(video, weights)
    assert device_digest(video.clone(), weights) == digest
    strided = video.permute(0, 2, 1, 3)
    assert device_digest(strided, weights) == device_digest(strided.contiguous(), weights)
    raw = video.view(torch.uint8).reshape(-1)
    for at in torch.randint(0, raw.numel(), (40,), generator=gen).tolist() + [0, raw.numel() - 1]:
        changed = raw.clone()
        changed[at] ^= 1 << (at % 8)
        assert device_digest(changed.view(torch.float32).view(video.shape), weights) != digest, at
    assert device_digest(video.flip(0), weights) != digest
    assert device_digest(video.reshape(3, 7, 5, 3), weights) != digest
    assert device_digest(video.view(torch.int32), weights) != digest
    assert device_digest(video, digest_weights("cpu", seed=2)) != digest
    assert torch.equal(digest_weights("cpu", seed=1), weights)


def test_frame_keys_forget_dead_tensors_and_keep_a_few():
    from adatp_core.prefix_cache import FrameKeys

    keys = FrameKeys()
    kept = [torch.rand(1, 2, 2, 3) for _ in range(FrameKeys.MAX_SEEN + 3)]
    for t in kept:
        keys(t)
    assert len(keys._seen) == FrameKeys.MAX_SEEN and keys._seen[-1][0]() is kept[-1]
    del kept, t
    gc.collect()
    keys(torch.rand(1, 2, 2, 3))
    assert len(keys._seen) == 1


def test_loaded_frames_keep_a_version_counter_in_inference_mode(hashes):
    """ComfyUI runs Load Video in inference mode; its IMAGE is made outside it, so the same
    frames on the next Run are keyed without a hash, and a write to them is still seen."""
    import numpy as np

    from adatp_core.prefix_cache import FrameKeys
    from adatp_core.video import frames_to_image

    keys = FrameKeys()
    with torch.inference_mode():
        image = frames_to_image(np.full((2, 4, 4, 3), 51, np.uint8))
        assert not image.is_inference()
        first = keys(image)
        assert keys(image) == first and len(hashes) == 1
        image[0].add_(0.1)
        assert keys(image) != first and len(hashes) == 2


def test_each_place_has_its_own_budget_from_its_memory(monkeypatch):
    """Issue 30: a long video's prefix (several GB, most of it waiting on the host beside a GPU's model) is
    the most valuable one to keep; one budget of 1 GiB for all places together kept none past ~220 frames
    of Qwen3-VL-8B. Each place now has MAX_PREFIX_BYTES or a share of its own memory."""
    from adatp_core import prefix_cache as pc

    mib = 2**20
    monkeypatch.setattr(pc, "MAX_PREFIX_BYTES", mib)
    totals = {"host": 64 * mib, "meta": None}
    monkeypatch.setattr(pc, "place_total_bytes", lambda place: totals.get(place))

    def prefix(host_mib, meta_mib=0.0):
        hidden = torch.zeros(int(host_mib * mib) // 4, dtype=torch.float32)
        meta = torch.empty(int(meta_mib * mib) // 4, dtype=torch.float32, device="meta")
        return pc.FrozenPrefix(None, ((meta, meta),), hidden.view(1, -1, 1))

    store = pc.PrefixStore()
    assert store.put("a", prefix(4)) is None  # 4 MiB on the host, within 10% of 64 MiB
    assert store.put("b", prefix(4)) is None and len(store) == 1  # 8 MiB together: the older one goes
    assert store.put("c", prefix(1, meta_mib=2)).startswith("not kept: 2.0 MiB on meta of a budget of 1 MiB")
    totals["host"] = 8 * mib  # a small host: the floor of 1 MiB
    why = pc.PrefixStore().put("d", prefix(4))
    assert why.startswith("not kept: 4.0 MiB on host of a budget of 1 MiB"), why
    assert pc.PrefixStore(max_bytes=5 * mib).put("e", prefix(4)) is None  # an explicit budget, every place
