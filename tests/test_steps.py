"""The one step runner (steps.py, issue 27): a single answer is a batch of one row; running out of
memory is one rule, and a capture that runs out goes through the batch's halving and one answer's
clear error alike; the rows cache answers "is there room" as a value and the batch admits by it;
the graph's capture status is a value, and it is what the doctor reports."""

from __future__ import annotations

import logging
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from test_batching import GREEDY, PENALISED, clip_states, states, together  # noqa: F401

from adatp_core import batching, steps
from adatp_core.decode import continue_prefill, row_positions
from adatp_core.errors import AdaTPEnvironmentError, AdaTPOutOfMemoryError, is_out_of_memory
from adatp_core.generate import SamplingConfig, generate_answer
from adatp_core.hf import cache as cache_module
from adatp_core.hf.cache import RowsKVCache

OOM_FORMS = [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
             RuntimeError("CUDA error: out of memory"),
             RuntimeError("MPS backend out of memory (MPS allocated: 7.9 GB, other allocations: 1 GB)"),
             RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
             RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")]


# --- a single answer is a batch of one row -----------------------------------------------------

def _step_rows(adapter, rows: RowsKVCache, state, logits, steps_: int, static: bool) -> list[torch.Tensor]:
    """Greedy steps of one row through a runner over ``rows``; the logits of each step."""
    runner = steps.StepRunner(adapter, rows, state.position_ids, static=static)
    first = int(state.position_ids.max()) + 1
    out = [logits]
    for step in range(steps_):
        token = out[-1].argmax().view(1)
        out.append(runner(token, row_positions([first], [step], state.position_ids, adapter.device))[0])
    return out


@pytest.mark.parametrize("static", [False, True], ids=["default", "static"])
def test_one_answers_row_steps_as_a_batchs_row_does(tiny, states, static):
    """One answer's row (the prefill's own buffers, no copy; or a static bucket's) and the same clip
    copied into a batch's rows (3 slots) give the same logits at every step, bit for bit."""
    adapter, state = tiny.adapter, states[0]
    with torch.inference_mode():
        own, logits = continue_prefill(state, 6)
        base = own.lengths()
        layouts = tuple(own.layout(i) for i in range(adapter.num_layers))
        capacities = [cache_module.capacity_bucket(n + 6) for n in base]
        if static:
            one = RowsKVCache.allocated(layouts, capacities, adapter.device)
            one.add(own, 0)
        else:
            one = RowsKVCache.holding(own)
            assert one.keys[0].data_ptr() == own.layers[0].keys.data_ptr()  # the prefill's buffer itself
        alone = _step_rows(adapter, one, state, logits, 5, static)
        copied, logits = continue_prefill(state, 0)
        batch = (RowsKVCache.allocated(layouts, capacities, adapter.device, slots=3) if static
                 else RowsKVCache(adapter.num_layers, slots=3))
        batch.add(copied, 6)
        in_batch = _step_rows(adapter, batch, state, logits, 5, static)
    assert all(torch.equal(a, b) for a, b in zip(alone, in_batch))
    assert one.row_lengths(0) == batch.row_lengths(0) == tuple(n + 5 for n in base)


@pytest.mark.parametrize("mode", ["default", "static"])
def test_a_single_answer_equals_a_batch_of_one(tiny, states, mode):
    """generate_answer and decode_together at batch size 1 run the same runner over one row: the same
    tokens, cache lengths and decode mode, greedy with a penalty and sampled."""
    for cfg in (PENALISED["greedy 1.05"], PENALISED["sampled 1.05"]):
        cfg = replace(cfg, decode_mode=mode)
        alone = [generate_answer(s, cfg) for s in states]
        rows = together(tiny, states, cfg, 1)
        assert [a.token_ids for a in rows] == [a.token_ids for a in alone]
        assert [a.stats["kv_lengths"] for a in rows] == [a.stats["kv_lengths"] for a in alone]
        assert {a.stats["decode_mode"] for a in rows} == {a.stats["decode_mode"] for a in alone} == {mode}


def test_a_prefills_own_buffers_refuse_a_static_window(tiny, states):
    with torch.inference_mode():
        own, _ = continue_prefill(states[0], 2)
    with pytest.raises(ValueError, match="static"):
        RowsKVCache.holding(own).window(0, 1, static=True)  # past its length nothing was written


# --- one out-of-memory rule --------------------------------------------------------------------

@pytest.mark.parametrize("error", OOM_FORMS, ids=lambda e: str(e)[:24])
def test_every_form_of_out_of_memory_is_one(error):
    assert is_out_of_memory(error)
    assert is_out_of_memory(AdaTPOutOfMemoryError("out of memory during generation (...)"))


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: device-side assert triggered"), ValueError("out of memory"),
                                   AdaTPEnvironmentError("static decoding failed (CUDA error: out of memory)")])
def test_other_errors_are_not_out_of_memory(error):
    """A ValueError, and the pack's other errors that only quote a message, are not the device's."""
    assert not is_out_of_memory(error)


def _graphs_that_run_out_of_memory(monkeypatch, error, rows_over: int):
    """CUDA graphs' semantics on the CPU; a capture over more than ``rows_over`` rows raises ``error``."""
    captures = []

    def capture(fn, device):
        warm = fn()
        captures.append(warm.shape[0])
        if warm.shape[0] > rows_over:
            raise error
        out = torch.empty_like(warm)
        return SimpleNamespace(replay=lambda: out.copy_(fn())), out, None

    monkeypatch.setattr(steps, "capture_graph", capture)
    monkeypatch.setattr(steps, "no_graph_reason", lambda adapter: None)  # as on CUDA
    return captures


@pytest.mark.parametrize("error", OOM_FORMS[:2], ids=["OutOfMemoryError", "CUDA error"])
def test_out_of_memory_in_a_capture_is_out_of_memory_for_both_callers(tiny, states, monkeypatch, caplog, error):
    """Batch: the capture over 3 rows runs out, the batch halves (and keeps graphs on for when its
    rows run whole again: test_batching.py). One answer: its only capture runs out: the pack's out-of-memory error, the kept
    bucket dropped. Neither turns graphs off, and the status says out of memory."""
    captures = _graphs_that_run_out_of_memory(monkeypatch, error, rows_over=1)
    made = []
    real = steps.StepRunner.__init__
    monkeypatch.setattr(steps.StepRunner, "__init__", lambda self, *a, **k: (real(self, *a, **k), made.append(self))[0])
    cfg = SamplingConfig(max_new_tokens=5, ignore_eos=True, decode_mode="static")
    with caplog.at_level("WARNING"):
        answers = together(tiny, states[:3], cfg, 3)
    assert "out of memory decoding 3 rows together; 1 from now on" in caplog.text
    (runner,) = [r for r in made if r.static]
    assert captures[0] == 3 and runner.use_graph and runner.status.out_of_memory  # graphs stay on
    default = replace(cfg, decode_mode="default")
    assert [a.token_ids for a in answers] == [generate_answer(s, default).token_ids for s in states[:3]]

    _graphs_that_run_out_of_memory(monkeypatch, error, rows_over=0)
    tiny.static_decoders.clear()
    with pytest.raises(AdaTPOutOfMemoryError, match="out of memory during generation"):
        generate_answer(states[0], cfg)
    assert len(tiny.static_decoders) == 0  # dropped, not pinned to steps without a graph
    last = [r for r in made if r.static][-1]
    assert last.use_graph and last.status.out_of_memory and last.status.note == "failed: out of memory"


# --- the rows cache answers "is there room" ----------------------------------------------------

def test_a_full_rows_cache_answers_no_room(tiny, states):
    with torch.inference_mode():
        prefilled = [continue_prefill(s, 0)[0] for s in states[:3]]
    rows = RowsKVCache(tiny.adapter.num_layers, slots=2)
    for cache in prefilled[:2]:
        assert rows.room(cache, 4).fits
        rows.add(cache, 4)
    room = rows.room(prefilled[2], 4)
    assert not room.row and not room.fits and str(room) == "every row is in use"


def test_the_batch_admits_by_the_room_answer_not_by_running_out_of_memory(tiny, states, monkeypatch):
    """With too little memory for the buffers to grow, a clip is not admitted while others run (no
    copy is tried); it joins when the memory is there after a row left, and decodes as it would alone.
    Alone without room, it fails alone with what to do."""
    cfg = SamplingConfig(max_new_tokens=4, ignore_eos=True, decode_mode="default")
    short, long = sorted(states, key=lambda s: s.prompt.length)[::len(states) - 1]
    with torch.inference_mode():
        needs = RowsKVCache(tiny.adapter.num_layers, 2)
        needs.add(continue_prefill(short, 0)[0], cfg.max_new_tokens)
        assert needs.room(continue_prefill(long, 0)[0], cfg.max_new_tokens).needs  # the buffers must grow for it
    adds = []
    real_add = RowsKVCache.add
    monkeypatch.setattr(RowsKVCache, "add", lambda self, *a: (adds.append(1), real_add(self, *a))[1])
    batch = batching.DecodeBatch(tiny, cfg, 2)
    assert batch.join("short", short) == [] and len(adds) == 1
    free = {"bytes": 1024}
    monkeypatch.setattr(cache_module, "free_bytes", lambda device: free["bytes"])
    assert batch.join("long", long) == []
    assert len(adds) == 1 and batch.waiting is not None and batch.limit == 1 and not batch.has_room
    done = batch.step() + batch.step()
    free["bytes"] = None  # the memory is there again
    while not done:
        done += batch.step()
    assert [f.key for f in done] == ["short"] and len(adds) == 2 and len(batch.rows) == 1  # "long" joined
    while len(batch):
        done += batch.step()
    answers = {f.key: f.answer for f in done}
    assert answers["long"].token_ids == generate_answer(long, cfg).token_ids
    assert answers["short"].token_ids == generate_answer(short, cfg).token_ids

    free["bytes"] = 1024
    out = list(batching.decode_together(tiny, cfg, [("alone", lambda: long)], 2))
    assert out[0].answer is None and "out of memory joining the decode batch" in out[0].error
    assert "MiB free" in out[0].error and "fewer frames" in out[0].error


# --- the capture status is a value -------------------------------------------------------------

def test_the_capture_status_is_a_value():
    assert steps.CaptureStatus("skipped", "not on CUDA").note == "none: not on CUDA"
    failed = steps.CaptureStatus.failure(RuntimeError("operation not permitted when stream is capturing\nmore"))
    assert failed.failed and not failed.out_of_memory and failed.note == "failed: operation not permitted when " \
                                                                         "stream is capturing"
    assert steps.CaptureStatus.failure(torch.OutOfMemoryError("CUDA out of memory")).out_of_memory
    with pytest.raises(ValueError):
        steps.CaptureStatus("lost")


@pytest.mark.parametrize("fails", [False, True], ids=["captured", "capture fails"])
def test_the_doctor_reports_the_capture_status_not_a_log_line(tiny_dir, monkeypatch, fails):
    """Graphs faked on the CPU: captured and reused is a pass; a failed capture is a failed line that
    names the status's reason, with every log line of the capture silenced."""
    from adatp_core import doctor
    from adatp_core.doctor import FAIL, PASS
    from adatp_core.models.tiny import TINY_MODEL_NAME

    def capture(fn, device):
        warm = fn()
        if fails:
            raise RuntimeError("capture refused by the driver")
        out = torch.empty_like(warm)
        return SimpleNamespace(replay=lambda: out.copy_(fn())), out, None

    monkeypatch.setattr(doctor, "families", lambda: {"LLaVA-OV": (lambda: tiny_dir, TINY_MODEL_NAME)})
    monkeypatch.setattr(steps, "capture_graph", capture)
    monkeypatch.setattr(steps, "no_graph_reason", lambda adapter: None)
    silent = logging.getLogger("adatp.test.silent")
    silent.disabled = True
    monkeypatch.setattr(steps, "log", silent)
    report = doctor.run_doctor("cpu", "auto")
    line = {c.name: c for c in report.checks}["static graph reused"]
    if fails:
        assert line.status == FAIL and "capture refused by the driver" in line.detail
    else:
        assert line.status == PASS and "captured once" in line.detail


def test_a_row_left_with_non_finite_values_cannot_poison_the_next_clip():
    """A masked position must be finite (NaN + -inf is NaN): a row's positions past its length are
    zeroed when a clip takes the row, and when the last row moves into a freed one."""
    from adatp_core.hf.cache import KVCache

    def clip(n, fill):
        c = KVCache(1)
        kv = torch.full((1, 2, n, 4), float(fill))
        c.update(kv, kv, 0)
        return c

    rows = RowsKVCache(1, slots=2)
    rows.add(clip(5, 1), 3)
    rows.add(clip(2, 2), 3)
    for buf in (rows.keys[0], rows.values[0]):  # what an fp16 overflow leaves past each row's length
        buf[0, :, 5:] = float("nan")
        buf[1, :, 2:] = float("nan")
    rows.remove(0)  # the 2-position row moves into row 0
    assert torch.isfinite(rows.keys[0][0]).all() and rows.keys[0][0, 0, :4, 0].tolist() == [2, 2, 0, 0]
    rows.add(clip(3, 3), 3)  # into row 1, whose positions past 2 held NaN
    assert torch.isfinite(rows.values[0][1]).all() and rows.values[0][1, 0, :5, 0].tolist() == [3, 3, 3, 0, 0]
