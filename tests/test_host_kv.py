"""Issue 30: layers >= K's keys and values on the host when the device is short ("kv on host").

Each host-homed attention layer's home is a host buffer with room for the answer; while the layer
runs, its filled part is staged on the device (the next such layer prefetched), the new keys and
values go to both, and the staged copy is released after the layer, not copied back. On the CPU
the host is the device, so these tests force "host": the same tokens and logits as on-device
decoding on every family's tiny model (the hybrid Qwen3.5 included, whose linear-attention layers
never leave), the homes written at every step, at most two staged layers at once, and static
decoding giving way with its reason. tests/gpu/test_kv_on_host.py does the CUDA side.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import QUESTION
from hybrid_fixtures import HYBRID_BUILDERS
from qwen_fixtures import BUILDERS as QWEN_BUILDERS
from qwen_fixtures import qwen_cache  # noqa: F401  (the session's folder of tiny models)

from adatp_core import generate as generate_module
from adatp_core.attention import extract_attention
from adatp_core.budget import size_text
from adatp_core.decode import kv_place
from adatp_core.errors import AdaTPInputError
from adatp_core.generate import KV_ON_HOST_NOT_STATIC, SamplingConfig, generate_answer
from adatp_core.hf.cache import HostKVLayer, KVCache, RowsKVCache
from adatp_core.models.tiny import ensure_tiny_model
from adatp_core.pipeline import PipelineConfig, select
from adatp_core.places import Place
from adatp_core.report import stats_text

STEPS = 6
FAMILIES = {"llava_onevision": ensure_tiny_model, **QWEN_BUILDERS, **HYBRID_BUILDERS}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def llm(request, qwen_cache):  # noqa: F811
    from adatp_core.models.loader import load_video_llm

    return load_video_llm(FAMILIES[request.param](qwen_cache), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def state(llm):
    """A pruned state whose continuation from K runs in calls of 16 kept tokens (64 on the hybrids' grid)."""
    from adatp_core.samples import scene_frames

    t, w, h = (2, 128, 96) if llm.adapter.family == "llava_onevision" else (4, 224, 224)
    video = torch.from_numpy(scene_frames(num_frames=t, width=w, height=h, scenes=2)).float() / 255
    # K = 1 where it may be (not on the hybrids, whose K - 1 must be full attention): three layers >= K of
    # the tiny models' four live on the host, more than the two slots, so staged copies are taken and reused
    layer = llm.adapter.default_layer() if llm.adapter._linear_layers else 1
    state = extract_attention(llm, video, QUESTION, layer=layer, reuse_prefix=False, prefill_chunk=16)
    return select(state, PipelineConfig(retention=0.5))


def _answer(state, kv, monkeypatch, **sampling):
    """The answer with ``kv``, and the rows its steps ran over (RowsKVCache.holding's)."""
    held = []
    real = RowsKVCache.holding.__func__

    def holding(cls, cache):
        rows = real(cls, cache)
        held.append(rows)
        return rows

    monkeypatch.setattr(RowsKVCache, "holding", classmethod(holding))
    answer = generate_answer(state, SamplingConfig(max_new_tokens=STEPS, ignore_eos=True, **sampling),
                             return_logits=True, kv=kv)
    monkeypatch.undo()
    return answer, held[-1] if held else None


def test_keys_and_values_on_the_host_give_the_device_answer(llm, state, monkeypatch):
    adapter = llm.adapter
    device, on_device = _answer(state, "device", monkeypatch)
    continued = []  # bytes staged when the continuation from K was done, before the first decode step
    real_continue = generate_module.continue_prefill

    def continue_prefill(*args):
        cache, logits = real_continue(*args)
        continued.append(cache.staging.staged_bytes if cache.staging is not None else 0)
        return cache, logits

    monkeypatch.setattr(generate_module, "continue_prefill", continue_prefill)
    host, on_host = _answer(state, "host", monkeypatch)
    assert host.token_ids == device.token_ids and len(host.token_ids) == STEPS
    assert torch.equal(host.logits, device.logits)
    assert host.stats["kv_on"] == "host" and host.stats["kv_reason"] == "asked for"
    assert "layers >= K's keys and values on the host" in stats_text(host.stats)
    assert device.stats["kv_on"] == "host" and "keys and values on the host" not in stats_text(device.stats)
    # the continuation ran in several calls from K (the staged copies grew chunk by chunk)
    assert len(state.kept_positions()) > (64 if adapter._linear_layers else 16)
    homed = [i for i in range(state.layer, adapter.num_layers) if not adapter.is_linear_layer(i)]
    assert sorted(on_host.homed) == homed and not on_device.homed
    assert not any(i in on_host.homed for i in range(state.layer))  # layers < K stay on the device
    lengths = on_host.row_lengths(0)
    assert lengths == on_device.row_lengths(0)
    for i in homed:
        n = lengths[i]
        # the home holds every position, the answer's included (written at each step), as the device's buffers
        assert torch.equal(on_host.keys[i][..., :n, :], on_device.keys[i][..., :n, :])
        assert torch.equal(on_host.values[i][..., :n, :], on_device.values[i][..., :n, :])
    staging = on_host.staging
    assert staging.most_alive == (2 if len(homed) > 1 else 1)
    # with more homed layers than the two slots, every step copied every homed layer's filled part to the
    # device once (bytes per position and layer: keys and values), ahead of its turn: the first homed layer
    # is prefetched by the last one after its own write (so a position longer, and once more after the last
    # step); with two or fewer, both stay staged and are never copied again
    per_position = 2 * on_host.keys[homed[0]][..., :1, :].numel() * on_host.keys[homed[0]].element_size()
    steps_staged = sum(sum(lengths[i] - 1 - s + (i == homed[0]) for s in range(STEPS - 1)) for i in homed)
    assert "kv_staged_mb" not in device.stats
    assert host.stats["kv_staged_mb"] == round(staging.staged_bytes / 1e6, 1)
    assert staging.staged_bytes - continued[-1] == (steps_staged * per_position if len(homed) > 2 else 0)
    assert staging._running is None and staging.alive() == min(len(homed), 2)  # after the answer: no layer runs
    slots = {s.keys.data_ptr() for s in staging._slots if s.keys is not None}
    assert len(slots) == min(len(homed), 2) and not slots & {on_host.keys[i].data_ptr() for i in homed}


def test_static_decoding_gives_way_to_default_steps_with_the_reason(llm, state, monkeypatch):
    """Over keys and values on the host, auto decodes in default steps, the fallback saying so only where
    auto would have run static steps; static asked for is refused, naming the settings."""
    static, _ = _answer(state, "device", monkeypatch, decode_mode="static")
    assert static.stats["decode_mode"] == "static" and "fallback_static_decoding" not in static.stats
    with pytest.raises(AdaTPInputError, match="decode_mode=static .* layers >= K's keys and values are on the host "
                                              r"\(asked for\); set decode_mode auto or default"):
        _answer(state, "host", monkeypatch, decode_mode="static")
    real = generate_module.resolve_decode_mode
    for pays in (True, False):  # auto as on CUDA: static, where static_pays_for_answer says it pays
        monkeypatch.setattr(generate_module, "resolve_decode_mode",
                            lambda mode, device: "static" if mode == "auto" else real(mode, device))
        monkeypatch.setattr(generate_module, "_static_pays", lambda state, cfg, pays=pays: pays)
        host, rows = _answer(state, "host", monkeypatch)
        assert host.stats["decode_mode"] == "default" and rows.homed and host.token_ids == static.token_ids
        if pays:
            assert host.stats["fallback_static_decoding"] == KV_ON_HOST_NOT_STATIC
            assert f"Fallback: {KV_ON_HOST_NOT_STATIC}" in stats_text(host.stats)
        else:  # auto would have run default steps anyway: no fallback to speak of
            assert "fallback_static_decoding" not in host.stats


def test_bad_kv_is_refused_before_any_work(tiny, frames):
    state = extract_attention(tiny, frames, QUESTION, reuse_prefix=False)
    with pytest.raises(AdaTPInputError, match="kv must be one of"):
        generate_answer(state, SamplingConfig(max_new_tokens=2), kv="gpu")
    answer = generate_answer(state, SamplingConfig(max_new_tokens=2))
    assert answer.stats["kv_on"] == "host" and answer.stats["kv_reason"] == "the model runs on the host"


def test_a_host_homed_cache_stages_two_layers_at_most_and_writes_its_homes():
    """Driven as decoder layers drive a cache: chunks of a prefill, then decode steps through a
    one-row window. Layers 2, 3 and 4 (of 5) have their home on the host."""
    gen = torch.Generator().manual_seed(0)
    layers, homed = 5, (2, 3, 4)
    on_device = KVCache(layers, reserve=6)
    on_host = KVCache(layers, reserve=6, host=homed)
    staging = on_host.staging
    assert [type(layer) is HostKVLayer for layer in on_host.layers] == [False, False, True, True, True]
    staged_ptrs = set()
    for m in (5, 3):  # a prefill from K in two calls
        for i in range(layers):
            k, v = torch.randn(2, 1, 2, m, 4, generator=gen)
            want = on_device.update(k, v, i)
            got = on_host.update(k, v, i)
            assert all(torch.equal(a, b) for a, b in zip(want, got))
            assert staging.alive() <= 2
            if i in homed:
                # this layer's copy is released; the next host-homed one is prefetched (circling to the
                # first) once it holds positions (not in the first call)
                following = staging.next_after(i)
                assert staging._running is None  # released; its copy stays until its slot is taken
                assert (staging._holding(following) is not None) == (m == 3 or following < i)
                staged_ptrs |= {s.keys.data_ptr() for s in staging._slots if s.keys is not None}
    assert len(staged_ptrs) == 2  # two slots' buffers, reused by every layer
    for i in homed:
        assert torch.equal(on_host.layers[i].keys, on_device.layers[i].keys)
        assert on_host.layers[i].keys.data_ptr() == on_host.layers[i]._buffers[0].data_ptr()
    rows_d, rows_h = RowsKVCache.holding(on_device), RowsKVCache.holding(on_host)
    assert sorted(rows_h.homed) == list(homed) and rows_h.keys[2] is on_host.layers[2]._buffers[0]
    with pytest.raises(ValueError, match="default steps"):
        rows_h.window(0, 1, static=True)
    for step in range(3):
        before = staging.stagings
        wd, wh = rows_d.window(0, 1), rows_h.window(0, 1)
        for i in range(layers):
            k, v = torch.randn(2, 1, 2, 1, 4, generator=gen)
            want, got = wd.update(k, v, i), wh.update(k, v, i)
            n = rows_d.lengths[0][i]
            assert all(torch.equal(a[..., :n + 1, :], b) for a, b in zip(want, got))
            if i in homed:
                assert torch.equal(rows_h.keys[i][0, :, n], k[0, :, 0])  # written to the home at this step
                assert staging.alive() <= 2
        rows_d.advance(0, 1)
        rows_h.advance(0, 1)
        assert staging.stagings - before == len(homed)  # each homed layer copied once a step, ahead of its turn
    assert staging.most_alive == 2


def test_two_homed_layers_stay_staged_and_are_not_copied_again():
    """With two host-homed layers both fit in the two slots: after the first staging each step reuses
    them (the copies are as good as the homes, which each update writes too)."""
    gen = torch.Generator().manual_seed(1)
    cache = KVCache(3, reserve=8, host=(1, 2))
    for i in range(3):
        cache.update(*torch.randn(2, 1, 2, 5, 4, generator=gen), i)
    rows = RowsKVCache.holding(cache)
    staging = rows.staging
    counts = []
    for _ in range(4):
        window = rows.window(0, 1)
        for i in range(3):
            k, v = torch.randn(2, 1, 2, 1, 4, generator=gen)
            got = window.update(k, v, i)
            assert torch.equal(got[0][..., -1:, :], k)
        rows.advance(0, 1)
        counts.append(staging.stagings)
        for i in (1, 2):  # the homes hold what the staged copies hold
            n = rows.lengths[0][i]
            slot = staging._holding(i)
            assert slot.length == n and torch.equal(slot.keys[..., :n, :], rows.keys[i][..., :n, :])
    assert counts == [counts[0]] * 4 and staging.most_alive == 2


def _fake_state(available_kept: int = 50_000, length: int = 200_000, layers: int = 36, places=None):
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         intermediate_size=12288, num_hidden_layers=layers, vocab_size=1000)
    adapter = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, is_split=False,
                              text_model=SimpleNamespace(config=config))
    return SimpleNamespace(model=SimpleNamespace(adapter=adapter), layer=2, prompt=SimpleNamespace(length=length),
                           kept_positions=lambda: range(available_kept), prefill_chunk=8192, places=places)


def test_where_no_check_placed_them_the_answer_weighs_what_it_allocates():
    """kv_place: the check before decoding's choice stands in auto; where none was made, the planner weighs
    budget.continuation_parts (the answer's copy of layers < K, layers >= K's keys and values, one call)
    against the device's free memory now: 34 layers x 50,064 positions x 4 KiB = 6.97 GB, a copy of layers
    < K (1.64 GB) and one call of 8192 tokens (about 1.1 GB)."""
    from adatp_core.budget import continuation_parts
    from adatp_core.flops import LLMShape
    from adatp_core.places import Place, Places

    state = _fake_state()
    llm = LLMShape.from_config(state.model.adapter.text_model.config)

    def need(on_host):
        return sum(b for _, b, w in continuation_parts(llm, 2, 200_000, 50_000, 64, 8192, 2, "cuda:0", on_host)
                   if w == "cuda:0")

    on, host = need(False), need(True)
    assert host < 6 << 30 < on  # 6 GiB free: 90% of it holds them only on the host
    place = kv_place(state, 64, available=lambda dev: int(on / 0.9) + 1, available_host=lambda: None)
    assert not place.host and place.auto and size_text(on) in place.reason
    place = kv_place(state, 64, available=lambda dev: 6 << 30, available_host=lambda: None)
    assert place.host and place.auto and place.reason.startswith("the device is short")
    assert f"about {size_text(on)}" in place.reason and "may still not fit" not in place.reason
    place = kv_place(state, 64, available=lambda dev: 6 << 30, available_host=lambda: 8 << 30)
    assert not place.host  # their homes (6.97 GB) are above 75% of the host's 8.6 GB: they stay
    place = kv_place(state, 64, available=lambda dev: int(host / 0.9) - 1, available_host=lambda: None)
    assert place.host and "the rest may still not fit" in place.reason
    checked = Place(True, "from the check")
    assert kv_place(_fake_state(places=Places(Place(False, ""), Place(False, ""), checked)), 64) is checked
    assert kv_place(_fake_state(places=Places(Place(False, ""), Place(False, ""), checked)), 64, "device") == \
        Place(False, "asked for")


def test_the_memory_model_counts_the_keys_and_values_on_the_host():
    """run_memory's answer side is budget.continuation_parts' (the model kv_place weighs), with layers >= K's
    keys and values on the host and their two staged copies on the device."""
    from dataclasses import replace

    from adatp_core.budget import RunPlan, continuation_parts, run_memory
    from adatp_core.flops import LLMShape, VisionShape

    state = _fake_state()
    llm = LLMShape.from_config(state.model.adapter.text_model.config)
    vision = VisionShape(layers=1, hidden=64, intermediate=128, patches=1024, patch_dim=1536, projector_out=4096)
    run = RunPlan(llm=llm, vision=vision, frames=400, decoded=(448, 448), pixels=(448, 448), prompt_tokens=100_000,
                  visual_tokens=98_000, layer=2, retention=0.25, streamed=True, prefill_chunk=8192,
                  max_new_tokens=64, where="cuda:0")
    kept = 100_000 - 98_000 + 24_500
    for on_host in (False, True):
        parts = run_memory(replace(run, kv_on_host=on_host)).parts
        answer = continuation_parts(llm, 2, 100_000, kept, 64, 8192, 2, "cuda:0", kv_on_host=on_host)[:-1]
        assert len(answer) == (3 if on_host else 2) and all(part in parts for part in answer)
        homes = [(b, w) for what, b, w in parts if what.startswith("layers >= K's keys and values")]
        assert homes == [(answer[1][1], "host" if on_host else "cuda:0")]


def test_the_free_device_memory_counts_the_process_cap(monkeypatch):
    """A card capped with set_per_process_memory_fraction (the bench's 24 GB on an 80 GB card) has what the
    cap leaves, not what the card has free: auto placements (places.plan_places) read this."""
    from adatp_core.budget import available_device_bytes

    gb = 10**9
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (50 * gb, 80 * gb))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 18 * gb)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 20 * gb)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 0.3, raising=False)
    assert available_device_bytes(torch.device("cuda", 0)) == 6 * gb  # 24 GB allowed, 18 allocated
    from adatp_core.memory import free_bytes

    assert free_bytes("cuda:0") == 6 * gb  # the batching's room (Room, auto_batch_size) reads the same
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0)
    assert available_device_bytes(torch.device("cuda", 0)) == 52 * gb  # free and the allocator's cache


def test_the_check_before_decoding_places_them_and_the_run_uses_its_places(tiny, tmp_path, monkeypatch):
    """check_video_fits, on a GPU (faked: the device and its free memory): the planner moves what the run
    needs off the device, cheapest first (places.py), checks the run that way, and returns those places;
    asked for the device, nothing moves and the run is refused."""
    import numpy as np

    from adatp_core import budget, fits
    from adatp_core import video as vid
    from adatp_core.samples import write_video

    path = write_video(tmp_path / "v.mp4", np.zeros((8, 48, 64, 3), dtype=np.uint8), fps=8.0)
    plan = vid.plan_sampling(path, 8)
    cls = type(tiny.adapter)
    monkeypatch.setattr(cls, "device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(cls, "is_split", property(lambda self: False))
    monkeypatch.setattr(budget, "available_host_bytes", lambda: 64 << 30)
    monkeypatch.setattr(budget, "available_device_bytes", lambda device: 64 << 30)

    width, height = plan.size
    prompt = fits.plan_prompt(tiny.adapter, QUESTION, plan.num_frames, height, width, plan.clip_times())
    # K = 1: three layers >= K of the four, more than the two staged copies
    run = fits.run_plan(tiny.adapter, prompt, 1, frames=plan.num_frames, decoded=plan.size, retention=0.25)

    def need(*on_host):  # the run's bytes on the device with these on the host (the check's own model)
        return budget.run_memory(fits.placed(run, frozenset(on_host))).bytes_on("cuda:0")

    needs = [need(), need("encoded"), need("encoded", "rows"), need("encoded", "rows", "kv")]
    assert needs == sorted(needs, reverse=True) and needs[2] > needs[3]
    # free memory that holds the run only with all three moved
    free = int((needs[2] + needs[3]) / 2 / budget.DEVICE_MEMORY_SHARE)
    monkeypatch.setattr(budget, "available_device_bytes", lambda device: free)
    fit = fits.check_video_fits(tiny, plan, [QUESTION], retention=0.25, layer=1)
    assert fit.places.on_host() == {"encoded", "rows", "kv"} and all(p.auto for p in (fit.places.kv,))
    assert any(p.startswith("layers >= K's keys and values") for p in fit.figures["memory_plan"]["host"])
    assert any(p.startswith("2 layers' staged copies") for p in fit.figures["memory_plan"]["cuda:0"])
    with pytest.raises(AdaTPInputError, match="memory on cuda:0"):
        fits.check_video_fits(tiny, plan, [QUESTION], retention=0.25, layer=1, kv="device", encoded="device",
                              rows="device")
    monkeypatch.setattr(budget, "available_device_bytes", lambda device: 64 << 30)
    fit = fits.check_video_fits(tiny, plan, [QUESTION], retention=0.25, layer=1)
    assert fit.places.on_host() == set() and fit.places.kv.auto and "needs about" in fit.places.kv.reason


def test_the_cli_puts_them_on_the_host_when_asked(tiny_dir, monkeypatch, capsys):
    import json

    from adatp_core import cli

    monkeypatch.setenv("ADATP_CACHE_DIR", str(tiny_dir.parent))
    assert cli.main(["--frames", "4", "--max-new-tokens", "3", "--kv", "host", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["kv_on"] == "host" and stats["kv_reason"] == "asked for" and stats["new_tokens"] == 3
    with pytest.raises(SystemExit):  # argparse's refusal, naming the choices
        cli.main(["--frames", "4", "--kv", "gpu"])
    assert "invalid choice: 'gpu'" in capsys.readouterr().err


def test_auto_answers_again_with_them_on_the_host_when_the_device_runs_out(tiny, frames, monkeypatch):
    """The estimate kept them on the device, and the answer ran out of memory there two tokens in: auto
    answers again with them on the host (the reason says so), keeping the model's video prefix (dropped only
    when the retry cannot happen or fails too, and the error says so),
    on_token given only the tokens it had not had; not when the host has no room for them, nor when
    on_token itself ran out, nor when auto did not choose the device by the estimate."""
    state = extract_attention(tiny, frames, QUESTION, reuse_prefix=False)
    want = generate_answer(state, SamplingConfig(max_new_tokens=4, ignore_eos=True))
    real, tried = generate_module._decode, []

    def decode(state, cfg, generator, on_token, return_logits, kv_on_host=False):
        tried.append(kv_on_host)
        if not kv_on_host:
            for step, token in enumerate(want.token_ids[:2] if on_token is not None else ()):
                on_token(step, token)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(state, cfg, generator, on_token, return_logits, kv_on_host)

    monkeypatch.setattr(generate_module, "_decode", decode)
    chosen = Place(False, "the continuation from K needs about 1.00 GB of the 2.00 GB free on the device", auto=True)
    monkeypatch.setattr(generate_module, "kv_place", lambda state, reserve, kv: chosen)
    monkeypatch.setattr(generate_module, "kv_retry_place", lambda state, reserve: Place(True, "room"))
    tiny.prefix_cache.clear()
    extract_attention(tiny, frames, QUESTION)  # a video prefix kept for a next question
    assert len(tiny.prefix_cache) == 1
    given = []
    answer = generate_answer(state, SamplingConfig(max_new_tokens=4, ignore_eos=True),
                             on_token=lambda step, token: given.append((step, token)))
    assert tried == [False, True] and answer.token_ids == want.token_ids
    assert given == list(enumerate(want.token_ids))  # each token once, though the answer ran twice
    assert answer.stats["kv_on"] == "host" and answer.stats["kv_reason"].startswith("the device ran out of memory")
    assert answer.stats["kv_moved"] is True
    assert len(tiny.prefix_cache) == 1  # kept through the retry: a next question over the video reuses it
    assert "the 1 video prefix(es) the model keeps were kept" in answer.stats["kv_reason"]
    assert "keys and values on the host, two layers staged on the device at a time (the device ran out" in \
        stats_text(answer.stats)
    from adatp_core.errors import AdaTPOutOfMemoryError

    def sampling():
        return SamplingConfig(max_new_tokens=4, ignore_eos=True)

    monkeypatch.setattr(generate_module, "kv_retry_place", lambda state, reserve: Place(False, "the host is short"))
    tried.clear()
    with pytest.raises(AdaTPOutOfMemoryError, match="could not go to the host either: the host is short. The 1 "
                                                    "video prefix"):
        generate_answer(state, sampling())
    assert tried == [False] and len(tiny.prefix_cache) == 0  # no retry: the next, smaller run needs them back
    extract_attention(tiny, frames, QUESTION)
    monkeypatch.setattr(generate_module, "kv_retry_place", lambda state, reserve: Place(True, "room"))

    def short(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory, on the host's path too")

    monkeypatch.setattr(generate_module, "_decode", short)
    with pytest.raises(AdaTPOutOfMemoryError, match="The 1 video prefix.es. the model kept were dropped"):
        generate_answer(state, sampling())  # the retry ran out too: then they go
    assert len(tiny.prefix_cache) == 0
    monkeypatch.setattr(generate_module, "_decode", decode)
    monkeypatch.setattr(generate_module, "kv_retry_place", lambda state, reserve: Place(True, "room"))

    def full(step, token):
        raise torch.OutOfMemoryError("out of memory in the caller's own code")

    tried.clear()
    with pytest.raises(AdaTPOutOfMemoryError):
        generate_answer(state, sampling(), on_token=full)
    assert tried == [False]
    # not auto's choice by the estimate (asked for, or the model's place, whatever the words): the error stands
    for place in (Place(False, "asked for"), Place(False, chosen.reason)):
        tried.clear()
        monkeypatch.setattr(generate_module, "kv_place", lambda state, reserve, kv, place=place: place)
        with pytest.raises(AdaTPOutOfMemoryError):
            generate_answer(state, sampling())
        assert tried == [False]


def test_the_retry_goes_to_the_host_only_with_room_there():
    from adatp_core.decode import kv_retry_place

    state = _fake_state()
    assert kv_retry_place(state, 64, available_host=lambda: 64 << 30).host
    place = kv_retry_place(state, 64, available_host=lambda: 4 << 30)  # 6.97 GB of homes
    assert not place.host and "the host has not room" in place.reason


@pytest.mark.parametrize("command", ["caption", "clips"])
def test_caption_commands_do_not_take_kv(command, capsys):
    """Captions decode their rows together on the device (their check counts them there), so the caption
    and clips commands do not offer --kv: it was accepted, documented and then ignored."""
    import importlib

    parser = importlib.import_module(f"adatp_core.{command}.cli").build_parser()
    assert "--kv" not in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["x", "--kv", "host"] if command == "caption" else ["x", "--out", "y", "--kv", "host"])
    assert "--kv" in capsys.readouterr().err


def test_the_host_running_out_gets_the_host_s_advice():
    """Parts wait on the host now (encoded rows, layer K's rows, keys and values): a failed CPU allocation
    says the host ran out and what to change there, not the device's advice."""
    from adatp_core.errors import AdaTPOutOfMemoryError
    from adatp_core.memory import OOM_ADVICE, run_guarded

    def host():
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)")

    with pytest.raises(AdaTPOutOfMemoryError, match="the host's memory ran out.*--kv device"):
        run_guarded(host, "generation")

    def device():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(AdaTPOutOfMemoryError) as err:
        run_guarded(device, "generation")
    assert OOM_ADVICE in str(err.value)


def _out_of_memory_on_the_device(monkeypatch):
    """An answer that runs out of memory with its keys and values on the device (auto's choice), and out of
    the host's memory with them on the host."""
    from adatp_core.places import Place

    def decode(state, cfg, generator, on_token, return_logits, kv_on_host=False):
        if not kv_on_host:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 8589934592 bytes")

    monkeypatch.setattr(generate_module, "_decode", decode)
    monkeypatch.setattr(generate_module, "kv_place", lambda s, r, kv: Place(False, "it fits", auto=True))
    monkeypatch.setattr(generate_module, "kv_retry_place", lambda s, r: Place(True, "the host has room"))


def test_static_asked_is_not_answered_again_on_the_host(tiny, frames, monkeypatch):
    """Static decoding cannot run over keys and values on the host: its out of memory error stands."""
    from adatp_core.errors import AdaTPOutOfMemoryError

    state = extract_attention(tiny, frames, QUESTION, reuse_prefix=False)
    _out_of_memory_on_the_device(monkeypatch)
    with pytest.raises(AdaTPOutOfMemoryError, match="out of memory during generation"):
        generate_answer(state, SamplingConfig(max_new_tokens=4, decode_mode="static"))


def test_the_host_running_out_after_the_device_does_not_advise_the_device(tiny, frames, monkeypatch):
    from adatp_core.errors import AdaTPOutOfMemoryError

    state = extract_attention(tiny, frames, QUESTION, reuse_prefix=False)
    _out_of_memory_on_the_device(monkeypatch)
    with pytest.raises(AdaTPOutOfMemoryError) as err:
        generate_answer(state, SamplingConfig(max_new_tokens=4))
    assert "--kv device" not in str(err.value) and "the device ran out" in str(err.value)
    assert "--max-pixels" in str(err.value)
