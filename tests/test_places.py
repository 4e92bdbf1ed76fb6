"""Issue 30: one planner places the encoded rows, layer K's rows and layers >= K's keys and values
(places.plan_places), cheapest moves first, asked-for values honoured alike for all three; the check
before decoding's places reach the run, which does not decide them again."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import QUESTION

from adatp_core import pipeline
from adatp_core.budget import MemoryEstimate, pinned_bytes
from adatp_core.errors import AdaTPInputError
from adatp_core.places import (ASKED, FREE_UNKNOWN, MODEL_ON_HOST, MODEL_SPLIT, MOVES, Place, Places,
                               plan_places)

GB = 10**9
# bytes on the device each move takes off it (a made-up run of 10 GB on the device)
SAVES = {"encoded": 1 * GB, "rows": 2 * GB, "kv": 4 * GB}


def estimate(on_host, host_bytes: int = 0):
    device = 10 * GB - sum(SAVES[n] for n in on_host)
    return MemoryEstimate(parts=(("device", device, "cuda:0"), ("host", host_bytes + sum(SAVES[n] for n in on_host),
                                                                "host")), frames=1)


def plan(free: float, **kwargs) -> Places:
    return plan_places(estimate, "cuda:0", int(free * GB / 0.9) + 10, **kwargs)


def test_auto_moves_the_cheapest_first_until_the_run_fits():
    assert MOVES == ("encoded", "rows", "kv")
    for free, moved in ((10, set()), (9, {"encoded"}), (7, {"encoded", "rows"}), (3, {"encoded", "rows", "kv"})):
        places = plan(free)
        assert places.on_host() == moved
        assert all(getattr(places, n).auto for n in MOVES)  # each chosen by the estimate
        if moved:
            assert places.kv.reason.startswith("the device is short: the run needs about 10.00 GB")
            assert "may still not fit" not in places.kv.reason
        else:
            assert places.kv.reason == "the run needs about 10.00 GB of the 11.11 GB free on the device"
    short = plan(2)  # nothing fits: all three move, and the reason says the rest may not fit
    assert short.on_host() == set(MOVES) and "the rest may still not fit: about 3.00 GB" in short.rows.reason


def test_asked_for_values_are_honoured_alike_for_all_three():
    for name in MOVES:
        places = plan(10, **{name: "host"})  # room for everything: host still honoured
        assert places.on_host() == {name} and getattr(places, name) == Place(True, ASKED)
        places = plan(1, **{name: "device"})  # short: the others move, the asked one stays
        assert getattr(places, name) == Place(False, ASKED) and places.on_host() == set(MOVES) - {name}
    # an asked move counts: with the keys and values asked onto the host, 6 GB remain, enough for 7 free
    assert plan(7, kv="host").on_host() == {"kv"}
    cpu = plan_places(estimate, "host", None, kv="host")
    assert cpu.encoded == Place(False, MODEL_ON_HOST) and cpu.kv == Place(True, ASKED)  # the host's path, asked
    split = plan(1, split=True, rows="host")
    assert all(getattr(split, n) == Place(False, MODEL_SPLIT) for n in MOVES)
    unknown = plan_places(estimate, "cuda:0", None)
    assert all(getattr(unknown, n) == Place(False, FREE_UNKNOWN) for n in MOVES)
    decided = Place(True, "from the check")
    assert plan(10, kv=decided).kv is decided
    for name in MOVES:
        with pytest.raises(AdaTPInputError, match=f"{name} must be one of"):
            plan(10, **{name: "gpu"})


def test_a_move_the_host_cannot_hold_is_not_made():
    # the host holds 2.5 GB more (75% of 3.33 GB): the encoded rows (1 GB) and layer K's (2 GB) do not both fit
    places = plan_places(estimate, "cuda:0", int(7 * GB / 0.9), host_free=int(2.5 * GB / 0.75))
    assert places.on_host() == {"encoded"} and "the rest may still not fit" in places.rows.reason
    nothing = plan_places(lambda on_host: estimate(on_host, host_bytes=10 * GB), "cuda:0", int(7 * GB / 0.9),
                          host_free=GB)
    assert nothing.on_host() == set() and "which may run out" in nothing.kv.reason


def test_the_run_memory_answer_side_is_the_continuations():
    """run_memory's device parts include budget.continuation_parts' keys and values: the answer's copy of
    layers < K (which it lacked) and layers >= K's, one model for the check and for the answer."""

    from adatp_core.budget import RunPlan, continuation_parts, run_memory
    from adatp_core.flops import LLMShape, VisionShape

    llm = LLMShape(layers=36, hidden=4096, intermediate=12288, heads=32, kv_heads=8, head_dim=128, vocab=151936)
    vision = VisionShape(layers=27, hidden=1152, intermediate=4304, patches=2048, patch_dim=1536, projector_out=4096)
    run = RunPlan(llm=llm, vision=vision, frames=1800, decoded=(448, 448), pixels=(448, 448), prompt_tokens=236_000,
                  visual_tokens=230_400, layer=2, retention=0.25, streamed=True, prefill_chunk=8192,
                  frames_per_step=2, injections=3, max_new_tokens=64, item=2, where="cuda:0")
    for kv_on_host in (False, True):
        parts = run_memory(replace(run, kv_on_host=kv_on_host)).parts
        answer = continuation_parts(llm, 2, 236_000, 236_000 - 230_400 + 57_600, 64, 8192, 2, "cuda:0", kv_on_host)
        assert all(part in parts for part in answer[:-1])
        copy = answer[0]
        assert copy[0].startswith("the answer's copy of layers < K's") and copy[1] == 2 * 236_000 * 4096 and \
            copy[2] == "cuda:0"
    stock = run_memory(replace(run, retention=None)).parts  # the stock model: one copy of every layer
    assert not any(what.startswith("the answer's copy") for what, _, _ in stock)


def test_layer_k_rows_on_the_host_leave_a_calls_embeddings():

    from adatp_core.budget import RunPlan, run_memory
    from adatp_core.flops import LLMShape, VisionShape

    llm = LLMShape(layers=36, hidden=4096, intermediate=12288, heads=32, kv_heads=8, head_dim=128, vocab=151936)
    vision = VisionShape(layers=27, hidden=1152, intermediate=4304, patches=2048, patch_dim=1536, projector_out=4096)
    run = RunPlan(llm=llm, vision=vision, frames=400, decoded=(448, 448), pixels=(448, 448), prompt_tokens=100_000,
                  visual_tokens=98_000, layer=2, retention=0.25, streamed=True, prefill_chunk=8192, item=2,
                  where="cuda:0")
    device, host = run_memory(run), run_memory(replace(run, rows_on_host=True))
    rows = 100_000 * 4096 * 2
    assert host.bytes_on("host") - device.bytes_on("host") == pinned_bytes(rows, "cuda:0") == 2**30  # a pinned block
    assert device.bytes_on("cuda:0") - host.bytes_on("cuda:0") == rows - 8192 * 4096 * 2  # a call's embeddings


def test_the_checks_places_reach_the_run_which_does_not_decide_them_again(tiny, tmp_path, monkeypatch):
    """run_pipeline over a file: the check before decoding's places go to the encoding, extract_attention
    and generate_answer (their reasons are the check's own), and no planner runs after it."""
    import numpy as np

    from adatp_core import attention, decode, fits
    from adatp_core.generate import SamplingConfig
    from adatp_core.samples import write_video

    path = write_video(tmp_path / "v.mp4", np.zeros((4, 48, 64, 3), dtype=np.uint8), fps=4.0)
    checked = Places(encoded=Place(True, "the check's encoded"), rows=Place(True, "the check's rows"),
                     kv=Place(True, "the check's kv"))
    real = fits.check_video_fits

    def check(*args, **kwargs):
        return fits.FitCheck(real(*args, **kwargs).figures, checked)

    monkeypatch.setattr(pipeline, "check_video_fits", check)
    from adatp_core import streaming

    for module, name in ((attention, "runtime_places"), (streaming, "runtime_places"), (decode, "plan_places")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("placed again after the check"), raising=True)
    cfg = pipeline.PipelineConfig(num_frames=4, generation=SamplingConfig(max_new_tokens=2, ignore_eos=True))
    for stream in (True, False):
        stats = pipeline.run_pipeline(tiny, str(path), QUESTION, replace(cfg, stream=stream)).stats
        for name in MOVES:
            assert stats[f"{name}_reason"] == f"the check's {name}" and stats[f"{name}_moved"] is True
        assert stats["rows_on"] == stats["encoded_on"] == stats["kv_on"] == "host"


def test_without_a_check_extract_attention_places_the_rows_and_the_answer_its_keys_and_values(tiny, frames):
    from adatp_core.attention import extract_attention
    from adatp_core.generate import SamplingConfig, generate_answer

    state = extract_attention(tiny, frames, QUESTION, reuse_prefix=False, rows="host")
    assert state.places.rows == Place(True, ASKED) and state.places.encoded == Place(False, MODEL_ON_HOST)
    assert state.places.kv is None  # the kept tokens are not known yet: the answer places them
    assert state.stats["rows_moved"] is True and state.stats["encoded_moved"] is False
    from adatp_core.report import prefill_line

    assert prefill_line(state.stats) == "Prefill: layer K's input rows on the host (asked for)"
    answer = generate_answer(state, SamplingConfig(max_new_tokens=2))
    assert answer.stats["kv_reason"] == MODEL_ON_HOST and answer.stats["kv_moved"] is False
    assert torch.equal(state.hidden, extract_attention(tiny, frames, QUESTION, reuse_prefix=False).hidden)


def test_a_bad_place_stops_the_pipeline_before_any_work(tiny, frames, monkeypatch):
    from adatp_core.errors import OptionError

    monkeypatch.setattr(pipeline, "extract_attention", lambda *a, **k: pytest.fail("the prefill ran"))
    for name in MOVES:
        with pytest.raises(OptionError, match=f"{name} must be one of") as refused:
            pipeline.run_pipeline(tiny, frames, QUESTION, pipeline.PipelineConfig(**{name: "gpu"}))
        assert refused.value.option == name


def test_pinned_host_buffers_count_as_torch_allocates_them():
    """torch's caching host allocator rounds each pinned block up to a power of two (117 MB takes 134 MB)."""
    assert pinned_bytes(117_000_000, "cuda:0") == 2**27 and pinned_bytes(117_000_000, "host") == 117_000_000
    assert pinned_bytes(2**27, "cuda:1") == 2**27 and pinned_bytes(0, "cuda:0") == 0


def _fake_gpu(tiny, monkeypatch, free: int):
    """The tiny model as if it ran on cuda:0 with ``free`` bytes free there (the planner's view only)."""
    from adatp_core import budget

    cls = type(tiny.adapter)
    monkeypatch.setattr(cls, "device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(cls, "is_split", property(lambda self: False))
    monkeypatch.setattr(budget, "available_host_bytes", lambda: 64 << 30)
    monkeypatch.setattr(budget, "available_device_bytes", lambda device: free)


def _sample(tmp_path):
    import numpy as np

    from adatp_core import video
    from adatp_core.samples import write_video

    return video.plan_sampling(write_video(tmp_path / "v.mp4", np.zeros((8, 48, 64, 3), dtype=np.uint8), fps=8.0), 8)


def _keep_on_device(model, nbytes: int) -> None:
    """A kept video prefix whose encoded rows hold ``nbytes`` on cuda:0 (its tensors are the host's: only its
    count matters)."""
    from adatp_core.prefix_cache import FrozenPrefix

    store = model.prefix_cache
    prefix = FrozenPrefix(None, (), torch.zeros(1, 1, 4))
    prefix.places, prefix.nbytes, prefix.reused = {"cuda:0": 2 * nbytes}, 2 * nbytes, {"cuda:0": nbytes}
    store.check_weights(model.adapter.model)  # not dropped as another model's by the next run
    store.put(("a kept video",), prefix)


def test_a_second_question_over_a_kept_prefix_counts_its_memory_as_free(tiny, tmp_path, monkeypatch):
    """The kept prefix's encoded rows are gone from the device's free memory, and the question over it allocates
    none of them again: the check counts them as free (Places.kept), where without them the run would be
    refused."""
    from adatp_core import budget, fits

    sample = _sample(tmp_path)
    _fake_gpu(tiny, monkeypatch, 0)
    width, height = sample.size
    prompt = fits.plan_prompt(tiny.adapter, QUESTION, sample.num_frames, height, width, sample.clip_times())
    run = fits.run_plan(tiny.adapter, prompt, 1, frames=8, decoded=sample.size, retention=0.25)
    need = budget.run_memory(fits.placed(run, frozenset())).bytes_on("cuda:0")
    free = int(need / budget.DEVICE_MEMORY_SHARE) + 1000
    kept = need // 2
    store = tiny.prefix_cache
    store.clear()
    try:
        _fake_gpu(tiny, monkeypatch, free)
        first = fits.check_video_fits(tiny, sample, [QUESTION], retention=0.25, layer=1)
        assert first.places.on_host() == set() and first.places.kept == 0
        _fake_gpu(tiny, monkeypatch, free - kept)  # the first question kept its prefix on the device
        with pytest.raises(AdaTPInputError, match="available now"):  # no prefix kept: the device is short indeed
            fits.check_video_fits(tiny, sample, [QUESTION], retention=0.25, layer=1)
        _keep_on_device(tiny, kept)
        second = fits.check_video_fits(tiny, sample, [QUESTION], retention=0.25, layer=1)
        assert second.places.on_host() == set() and second.places.kept == kept
        _fake_gpu(tiny, monkeypatch, free)  # room without the kept prefix: nothing borrowed
        assert fits.check_video_fits(tiny, sample, [QUESTION], retention=0.25, layer=1).places.kept == 0
    finally:
        store.clear()


def test_a_miss_drops_the_kept_prefixes_its_plan_counted_as_free(tiny, frames):
    """A run whose plan counted the kept prefixes as free and misses gets that memory back before it allocates."""
    from adatp_core.attention import extract_attention

    store = tiny.prefix_cache
    store.clear()
    try:
        _keep_on_device(tiny, 1000)
        plain = Places(encoded=Place(False, "x"), rows=Place(False, "x"))
        extract_attention(tiny, frames, QUESTION, places=plain)
        assert len(store) == 2  # not counted: kept
        store.clear()
        _keep_on_device(tiny, 1000)
        extract_attention(tiny, frames, QUESTION, places=replace(plain, kept=1000))
        assert len(store) == 1 and store.reused_bytes_on("cuda:0") == 0  # counted: dropped, the new prefix kept
    finally:
        store.clear()


def test_a_hit_says_its_rows_are_where_the_kept_prefix_has_them(tiny, frames):
    """Rows asked for the host over a prefix kept with them on the device stay there: the stats say so."""
    from adatp_core.attention import extract_attention
    from adatp_core.places import KEPT_WITH_PREFIX

    tiny.prefix_cache.clear()
    try:
        extract_attention(tiny, frames, QUESTION, rows="device")
        hit = extract_attention(tiny, frames, QUESTION + " Again?", rows="host").stats
        assert hit["prefix_cache"] == "hit"
        assert (hit["rows_on"], hit["rows_reason"], hit["rows_moved"]) == ("host", KEPT_WITH_PREFIX, False)
        assert (hit["encoded_reason"], hit["encoded_moved"]) == (KEPT_WITH_PREFIX, False)
    finally:
        tiny.prefix_cache.clear()


def test_a_refusal_names_the_placements_asked_for_the_device_that_would_let_it_fit(tiny, tmp_path, monkeypatch):
    from adatp_core import budget, fits

    sample = _sample(tmp_path)
    _fake_gpu(tiny, monkeypatch, 0)
    width, height = sample.size
    prompt = fits.plan_prompt(tiny.adapter, QUESTION, sample.num_frames, height, width, sample.clip_times())
    run = fits.run_plan(tiny.adapter, prompt, 1, frames=8, decoded=sample.size, retention=0.25)
    need = lambda *h: budget.run_memory(fits.placed(run, frozenset(h))).bytes_on("cuda:0")  # noqa: E731
    free = int((need("encoded", "rows") + need("encoded", "rows", "kv")) / 2 / budget.DEVICE_MEMORY_SHARE)
    _fake_gpu(tiny, monkeypatch, free)
    assert fits.check_video_fits(tiny, sample, [QUESTION], retention=0.25, layer=1).places.on_host() == set(MOVES)
    with pytest.raises(AdaTPInputError) as refused:
        fits.check_video_fits(tiny, sample, [QUESTION], retention=0.25, layer=1, kv="device", rows="device",
                              encoded="device")
    advice = str(refused.value).split("available now")[-1]
    assert "--kv auto" in advice and "--rows auto" in advice and "--encoded auto" in advice
    with pytest.raises(AdaTPInputError) as refused:  # the rows asked for the host: only the others are named
        fits.check_video_fits(tiny, sample, [QUESTION], retention=0.25, layer=1, kv="device", rows="host")
    advice = str(refused.value).split("available now")[-1]
    assert "--kv auto" in advice and "--rows" not in advice and "--encoded" not in advice
    assert "--prefill-chunk" not in advice  # the frames' pixels are most of it
    calls = MemoryEstimate(parts=(("one prefill call's activations (9 tokens)", free, "cuda:0"),), frames=1)
    assert "--prefill-chunk" in fits._placement_advice(tiny.adapter, run, Places(Place(False, ""), Place(False, "")),
                                                       calls, {"encoded": "auto", "rows": "auto", "kv": "auto"})


def test_a_check_with_no_question_says_so(tiny, tmp_path):
    from adatp_core import fits

    with pytest.raises(AdaTPInputError, match="no question"):
        fits.check_video_fits(tiny, _sample(tmp_path), [])
