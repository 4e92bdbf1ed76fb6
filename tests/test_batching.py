"""Captions decoded together (continuous batching): every row decodes exactly what
it would alone, greedy and sampled, whatever its prompt length, kept tokens and
position ids; the scheduler's faults (a failing prefill, out of memory in a step,
Cancel between steps); the batched-rows cache form; --batch-size and the node input.

test_qwen_batching.py runs the model-level tests on the tiny Qwen2.5-VL and Qwen3-VL."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from pack import pack_module

from adatp_core import batching, steps
from adatp_core import caption as cap
from adatp_core.hf.cache import KVCache, RowsKVCache
from adatp_core.caption_cli import build_parser
from adatp_core.errors import AdaTPInputError, AdaTPInterrupted
from adatp_core.generate import SamplingConfig, generate_answer
from adatp_core.pipeline import PipelineConfig, prefill
from adatp_core.samples import scene_frames

# (frames, retention): different prompt lengths and kept-token counts, 1.0 and no pruning included.
CLIPS = [(4, 0.25), (2, 1.0), (6, 0.5), (3, None), (5, 0.1)]
GREEDY = SamplingConfig(max_new_tokens=10, decode_mode="default")
SAMPLED = SamplingConfig(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9, seed=7,
                         decode_mode="default")
# Qwen2.5-VL's shipped penalty, greedy and with seeded sampling (issue 27), and one strong enough to change tokens.
PENALISED = {"greedy 1.05": replace(GREEDY, repetition_penalty=1.05),
             "sampled 1.05": replace(SAMPLED, repetition_penalty=1.05, top_k=20),
             "greedy 2.0": replace(GREEDY, repetition_penalty=2.0)}


def clip_states(model):
    states = []
    for i, (n, retention) in enumerate(CLIPS):
        frames = torch.from_numpy(scene_frames(n, 64 + 16 * i, 56, scenes=2)).float() / 255
        states.append(prefill(model, frames, "Describe the video.", PipelineConfig(num_frames=n, retention=retention)))
    return states


@pytest.fixture(scope="module")
def states(tiny):
    return clip_states(tiny)


def together(model, states, sampling, batch_size):
    out = {f.key: f for f in batching.decode_together(model, sampling, [(i, lambda s=s: s) for i, s in
                                                                          enumerate(states)], batch_size)}
    assert sorted(out) == list(range(len(states)))
    assert all(f.error is None for f in out.values()), [f.error for f in out.values()]
    return [out[i].answer for i in range(len(states))]


@pytest.fixture(scope="module")
def early_eos(tiny, states):
    """An EOS token that one clip generates at its 4th step, so it stops early while others
    go on (for this module's tests); yields batch 1's answers."""
    free = [generate_answer(s, SamplingConfig(max_new_tokens=10, ignore_eos=True, decode_mode="default"))
            for s in states]
    config = tiny.model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = free[0].token_ids[3]
    try:
        reference = [generate_answer(s, GREEDY) for s in states]
        lengths = [len(a.token_ids) for a in reference]
        assert lengths[0] <= 3 and max(lengths) == GREEDY.max_new_tokens, lengths  # the case is really mixed
        yield reference
    finally:
        config.eos_token_id = saved


@pytest.mark.parametrize("batch_size", [2, 3, 8])
def test_greedy_rows_equal_batch_one_token_for_token(tiny, states, early_eos, batch_size):
    """Greedy captions at B rows (fewer slots than clips, and more) are batch 1's, one clip
    stopping early at EOS; the per-row cache lengths are batch 1's too."""
    answers = together(tiny, states, GREEDY, batch_size)
    assert [a.token_ids for a in answers] == [a.token_ids for a in early_eos]
    assert [a.text for a in answers] == [a.text for a in early_eos]
    assert [a.stats["kv_lengths"] for a in answers] == [a.stats["kv_lengths"] for a in early_eos]
    assert all(a.stats["batch_size"] == batch_size for a in answers)


def test_static_rows_equal_batch_one(tiny, states, early_eos):
    """Static mode across the batch (fixed-shape steps in batch and capacity buckets; a CUDA
    graph each on CUDA, none here) chooses batch 1's tokens too, bucket rows included."""
    static = SamplingConfig(max_new_tokens=GREEDY.max_new_tokens, decode_mode="static")
    answers = together(tiny, states, static, 3)
    assert [a.token_ids for a in answers] == [a.token_ids for a in early_eos]
    assert {a.stats["decode_mode"] for a in answers} == {"static"}


def test_sampled_rows_equal_batch_one_with_the_same_seed(tiny, states):
    """Each row samples with its own generator, seeded as batch 1 seeds it."""
    reference = [generate_answer(s, SAMPLED).token_ids for s in states]
    assert [a.token_ids for a in together(tiny, states, SAMPLED, 3)] == reference
    assert len(set(reference)) > 1  # the clips really differ


@pytest.mark.parametrize("name", sorted(PENALISED))
def test_penalised_rows_equal_batch_one(tiny, states, name):
    """With a repetition penalty, greedy or sampled, 4 rows (5 clips: rows leave and join, and
    move) choose batch 1's tokens: each row's own history (its prompt too) and generator."""
    sampling = PENALISED[name]
    reference = [generate_answer(s, sampling).token_ids for s in states]
    assert [a.token_ids for a in together(tiny, states, sampling, 4)] == reference
    if name == "greedy 2.0":  # the history really acts (without EOS: early_eos may have made the answers short)
        free = [replace(cfg, ignore_eos=True) for cfg in (sampling, GREEDY)]
        assert [generate_answer(s, free[0]).token_ids for s in states] != [generate_answer(s, free[1]).token_ids
                                                                             for s in states]


def test_a_batched_step_reads_the_chosen_tokens_once(tiny, states, monkeypatch):
    """Issue 27: with a penalty or sampling, each row was chosen alone, int() each (a host sync per
    row on CUDA) after torch.multinomial (which checks the probabilities on the host). All rows are
    chosen in one go on the device now; the step reads the tokens to the host once (tolist)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if any(n in name for n in ("_local_scalar_dense", "multinomial", "nonzero", "equal")):
                reads.append(name)
            return func(*args, **(kwargs or {}))

    sampling = replace(PENALISED["sampled 1.05"], ignore_eos=True)
    batch = batching.DecodeBatch(tiny, sampling, 4)
    for i, s in enumerate(states[:4]):
        assert batch.join(i, s) == []
    real, tolist = batch._choose, torch.Tensor.tolist
    per_step = []

    def spy(rows):
        with Reads():
            ended = real(rows)
        per_step.append((len(rows), reads[:]))
        reads.clear()
        return ended

    reads = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: (reads.append("tolist"), tolist(self))[1])
    batch._choose = spy
    for _ in range(3):
        batch.step()
    assert per_step == [(4, ["tolist"])] * 3


def test_rows_logits_match_batch_one(tiny, states):
    """The figure behind the token equality: a batched step's logits against batch 1's."""
    cfg = SamplingConfig(max_new_tokens=6, ignore_eos=True, decode_mode="default")
    reference = [generate_answer(s, cfg, return_logits=True).logits for s in states]
    batch = batching.DecodeBatch(tiny, cfg, len(states))
    for i, s in enumerate(states):
        assert batch.join(i, s) == []
    seen = {i: [] for i in range(len(states))}
    real = batch._choose

    def spy(rows):
        for row in rows:
            seen[row.key].append(row.logits.clone())
        return real(rows)

    batch._choose = spy
    while len(batch):
        batch.step()
    worst = max((torch.stack(seen[i]) - reference[i][1:]).abs().max().item() for i in seen)
    assert worst < 1e-4, worst


def test_a_failing_prefill_fails_its_clip_alone(tiny, states):
    def broken():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")

    clips = [(0, lambda: states[0]), (1, broken), (2, lambda: states[2]),
             (3, lambda: (_ for _ in ()).throw(AdaTPInputError("corrupt clip")))]
    out = {f.key: f for f in batching.decode_together(tiny, GREEDY, clips, 2)}
    assert "out of memory" in out[1].error and out[3].error == "corrupt clip"
    assert out[0].answer.token_ids == generate_answer(states[0], GREEDY).token_ids
    assert out[2].answer.token_ids == generate_answer(states[2], GREEDY).token_ids


def test_out_of_memory_in_a_step_halves_the_batch_and_loses_nothing(tiny, states, monkeypatch):
    real = steps.decode_step
    sizes = []

    def small_memory(adapter, tokens, *args, **kwargs):
        sizes.append(tokens.shape[0])
        if tokens.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(adapter, tokens, *args, **kwargs)

    monkeypatch.setattr(steps, "decode_step", small_memory)
    answers = together(tiny, states, GREEDY, 5)
    assert [a.token_ids for a in answers] == [generate_answer(s, GREEDY).token_ids for s in states]
    assert sizes[0] == 5 and max(sizes[1:]) == 2  # 5 -> 2 (halved twice: 5 // 2), then never more


def static_runners(monkeypatch) -> list:
    """The static step runners made from now on (the batch's)."""
    made = []
    real = steps.StepRunner.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if self.static:
            made.append(self)

    monkeypatch.setattr(steps.StepRunner, "__init__", init)
    return made


def _graphs_on_the_cpu(monkeypatch, error=None):
    """Batched static steps with CUDA graphs' semantics (the warm-up runs the step, the capture
    records it, a replay runs it again), failing with ``error`` for buckets of several rows.
    Returns the static step runners made."""
    from types import SimpleNamespace

    def capture(fn, device):
        warm = fn()
        if error is not None and warm.shape[0] > 1:
            raise error
        out = torch.empty_like(warm)
        return SimpleNamespace(replay=lambda: out.copy_(fn())), out, None

    monkeypatch.setattr(steps, "capture_graph", capture)
    monkeypatch.setattr(steps, "no_graph_reason", lambda adapter: None)  # as on CUDA
    return static_runners(monkeypatch)


def _static_rows_with_a_failing_capture(tiny, states, monkeypatch, caplog, error):
    """Three rows decoded together in static mode, graphs faked on the CPU with a first capture that
    raises ``error``: checks that the tokens are the default mode's; returns the batch's step runner."""
    made = _graphs_on_the_cpu(monkeypatch, error)
    cfg = SamplingConfig(max_new_tokens=6, ignore_eos=True, decode_mode="static")
    with caplog.at_level("WARNING"):
        answers = together(tiny, states, cfg, 3)
    default = SamplingConfig(max_new_tokens=6, ignore_eos=True, decode_mode="default")
    assert [a.token_ids for a in answers] == [generate_answer(s, default).token_ids for s in states]
    (step,) = made
    return step


def test_out_of_memory_in_a_batched_capture_halves_the_batch_and_keeps_graphs(tiny, states, monkeypatch, caplog):
    """Out of memory while capturing a batched step's graph is out of memory in that step, as for one
    answer (one step runner for both): the rows run in halves, and graphs stay on for the buckets that
    fit. It used to turn graphs off for the whole batch, under a warning that hid the out of memory."""
    step = _static_rows_with_a_failing_capture(
        tiny, states, monkeypatch, caplog, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert "out of memory decoding 3 rows together" in caplog.text
    assert "without a graph" not in caplog.text and step.use_graph
    assert any(e.rows == 1 and e.graph is not None for e in step.entries.values())


def test_another_batched_capture_failure_steps_without_a_graph_and_names_it(tiny, states, monkeypatch, caplog):
    step = _static_rows_with_a_failing_capture(
        tiny, states, monkeypatch, caplog, RuntimeError("CUDA error: operation not permitted when stream is capturing"))
    assert not step.use_graph and "out of memory" not in caplog.text
    assert "RuntimeError: CUDA error: operation not permitted when stream is capturing" in caplog.text
    assert step.status.failed and not step.status.out_of_memory


def test_rows_cache_form():
    """Rows of different lengths per layer, packed at the front; a removed row's place
    goes to the last row; lengths advance only when a step has run."""
    def batch1(lengths, fill):
        c = KVCache(2)
        for layer, n in enumerate(lengths):
            kv = torch.full((1, 2, n, 4), float(fill))
            c.update(kv, kv, layer)
        return c

    rows = RowsKVCache(2, slots=3)
    for r, lengths in enumerate([(5, 2), (3, 3), (7, 1)]):
        assert rows.add(batch1(lengths, r + 1), room=4) == r
    with pytest.raises(ValueError):
        rows.add(batch1((1, 1), 9), room=1)
    window = rows.window(0, 3)
    masks = window.masks()
    assert [m.shape for m in masks] == [(3, 1, 1, 8), (3, 1, 1, 4)]
    assert masks[1][:, 0, 0].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    new = torch.full((3, 2, 1, 4), -1.0)
    k, _ = window.update(new, new, 1)
    assert k.shape == (3, 2, 4, 4) and k[0, 0, :, 0].tolist() == [1, 1, -1, 0] and k[2, 0, 1, 0] == -1
    assert rows.lengths == [[5, 2], [3, 3], [7, 1]]  # not advanced yet: the step may be run again
    window.advance()
    rows.remove(0)
    assert rows.rows == 2 and rows.lengths == [[8, 2], [4, 4]]
    assert rows.keys[1][0, 0, :2, 0].tolist() == [3, -1]  # the old last row, moved into row 0


# --- captioning a folder ---------------------------------------------------------------------

@pytest.fixture
def clips(tmp_path):
    from adatp_core.samples import write_video

    root = tmp_path / "clips"
    root.mkdir()
    for i, n in enumerate([6, 4, 8, 5]):
        write_video(root / f"c{i}.mp4", scene_frames(n, 64 + 16 * i, 48, scenes=2), fps=4.0)
    (root / "c1b.mp4").write_bytes(b"not a video")
    return root


def job(root, batch_size, **kw):
    cfg = PipelineConfig(num_frames=4, generation=SamplingConfig(max_new_tokens=6))
    return cap.CaptionJob(folder=root, pipeline=cfg, workers=0, batch_size=batch_size, **kw)


def test_folder_captions_equal_batch_one_and_are_written_once(tiny, clips, tmp_path, monkeypatch):
    one = cap.caption_folder(tiny, job(clips, 1, out=tmp_path / "one"))
    writes = []
    real = cap.write_atomic
    monkeypatch.setattr(cap, "write_atomic", lambda path, text: (writes.append(path), real(path, text)))
    many = cap.caption_folder(tiny, job(clips, 3, out=tmp_path / "many"), manifest=tmp_path / "m.jsonl")
    assert many.captions == one.captions and len(many.captions) == 4
    assert many.failed == one.failed and [f[0] for f in many.failed] == ["c1b.mp4"]
    assert len(writes) == len(set(writes)) == 4
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [x["path"] for x in lines] == ["c0.mp4", "c1.mp4", "c1b.mp4", "c2.mp4", "c3.mp4"]  # clip order
    assert many.batch_size == 3 and "Decoded up to 3 clips together." in many.text()


def test_auto_batch_size_is_reported(tiny, clips, tmp_path):
    summary = cap.caption_folder(tiny, job(clips, 0))
    assert summary.batch_size == batching.CPU_BATCH_SIZE
    assert f"Decoded up to {batching.CPU_BATCH_SIZE} clips together." in summary.text()


def test_auto_batch_size_on_cuda_follows_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 80 * 2**30))
    assert batching.auto_batch_size("cuda:0", 2**30) == 6  # 60% of 10 GiB, 1 GiB a clip
    assert batching.auto_batch_size("cuda:0", 2**20) == batching.MAX_AUTO_BATCH
    assert batching.auto_batch_size("cuda:0", 2**40) == 1
    assert batching.auto_batch_size("cpu", 2**20) == batching.CPU_BATCH_SIZE


def test_row_bytes_counts_the_per_head_copy_below_transformers_5_23(tiny, states, monkeypatch):
    """transformers 5.17 - 5.22 copy every masked step's keys and values to each query head (repeat_kv);
    5.23 on do not. The estimate counts the copy of the largest layer (freed after each layer) where
    the installed release makes it (faked both ways), so auto picks fewer rows there."""
    from importlib import import_module

    from adatp_core.decode import continue_prefill
    from adatp_core.hf.sdpa_copy import masked_step_copies_kv, query_groups

    with torch.inference_mode():
        cache, _ = continue_prefill(states[0], 0)
    groups = query_groups(tiny.adapter.text_model)
    assert set(groups) == {2}  # the tiny LLM: 4 query heads over 2 key/value heads
    kv = batching.row_bytes(cache, 16)  # no groups given: no copy
    largest = max(2 * (n + 16) * k.shape[1] * k.shape[-1] * k.element_size()
                  for n, (k, _) in zip(cache.lengths(), (cache.entry(i) for i in range(len(cache.lengths())))))
    transformers = import_module("transformers")
    for version, copies in (("5.17.0", True), ("5.20.2", True), ("5.22.2", True), ("5.23.0", False),
                            ("5.25.0", False), ("5.26.0.dev0", False)):
        monkeypatch.setattr(transformers, "__version__", version)
        assert masked_step_copies_kv() is copies, version
        assert batching.row_bytes(cache, 16, groups) == kv + (2 * largest if copies else 0), version
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**24, 2**30))
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    old = batching.auto_batch_size("cuda:0", batching.row_bytes(cache, 4000, groups))
    monkeypatch.setattr(transformers, "__version__", "5.25.0")
    new = batching.auto_batch_size("cuda:0", batching.row_bytes(cache, 4000, groups))
    assert old < new


def test_static_rows_pay_off_by_the_rule_one_answer_uses():
    """Issue 27: auto takes static rows only where the attention they add (padded rows, whole
    capacities) stays within what a graph pays for; at one row it is one answer's rule."""
    from adatp_core import steps as sd

    assert [sd.row_bucket(n, 64) for n in (1, 2, 3, 5, 8, 9, 16, 17, 33, 57, 64)] == \
        [1, 2, 4, 8, 8, 16, 16, 24, 40, 64, 64]
    assert sd.row_bucket(33, 36) == 36  # never past the slots
    for lengths in ([1000] * 28, [6000] * 2 + [1500] * 26, [8192] * 28, [32000] * 28):
        caps = [sd.capacity_bucket(n + 128) for n in lengths]
        assert sd.static_pays_off(lengths, 128) == sd.static_rows_pay_off(1, 1, caps, [0] * 28)
    short = ([1024] * 28, [1000] * 28)  # capacities, longest rows
    assert sd.static_rows_pay_off(33, sd.row_bucket(33, 64), *short)  # 7 padded rows: pays
    assert not sd.static_rows_pay_off(33, 64, *short)  # 31 padded rows (powers of two) do not
    assert not sd.static_rows_pay_off(9, 16, [4096] * 28, [4000] * 28)  # 7 padded rows of a longer buffer
    assert not sd.static_rows_pay_off(33, 40, [8192] * 28, [6000] * 28)  # long clips: default steps
    assert sd.static_rows_pay_off(4, 4, [2048] * 28, [1000] * 28)  # every row in use, short
    assert not sd.static_rows_pay_off(4, 4, [2048] * 28, [1000] * 28, break_even=1024)  # a measured card's figure
    assert sd.static_break_even("cpu") == sd.STATIC_AUTO_MAX_CAPACITY


def test_batched_auto_steps_statically_only_where_it_pays(tiny, states, monkeypatch):
    """Auto on a (faked) CUDA device: batching.py used to take static steps whatever the rows'
    lengths and padding. Now it asks static_rows_pay_off for the rows in the batch, whenever a clip
    joins or leaves: short buffers step statically, and where the rule says no (long contexts, or
    many padded rows, here by a small break-even) every step is the default one. Same tokens."""
    cfg = SamplingConfig(max_new_tokens=6, ignore_eos=True)
    assert cfg.decode_mode == "auto"
    reference = [generate_answer(s, replace(cfg, decode_mode="default")).token_ids for s in states]
    monkeypatch.setattr(batching, "resolve_decode_mode", lambda mode, device: "static" if mode == "auto" else mode)
    asked, static_steps = [], []
    real_rule, real_static = steps.static_rows_pay_off, steps.StepRunner._static

    def rule(rows, bucket, capacities, spans, break_even=None):
        asked.append((rows, bucket))
        return real_rule(rows, bucket, capacities, spans, break_even)

    def static(self, tokens, positions):
        static_steps.append(tokens.shape[0])
        return real_static(self, tokens, positions)

    monkeypatch.setattr(steps, "static_rows_pay_off", rule)
    monkeypatch.setattr(steps.StepRunner, "_static", static)
    short = together(tiny, states, cfg, 4)
    assert [a.token_ids for a in short] == reference
    assert {a.stats["decode_mode"] for a in short} == {"static"} and static_steps
    assert asked == [(4, 4), (1, 1)]  # once per set of rows: four clips, then the fifth alone
    assert all(a.stats["decode_passes_static"] == 5 for a in short)

    asked.clear(), static_steps.clear()
    monkeypatch.setattr(steps, "STATIC_AUTO_MAX_CAPACITY", 16)  # the tiny clips count as long
    long = together(tiny, states, cfg, 4)
    assert [a.token_ids for a in long] == reference
    assert {a.stats["decode_mode"] for a in long} == {"default"} and not static_steps and asked
    forced = together(tiny, states, replace(cfg, decode_mode="static"), 4)
    assert [a.token_ids for a in forced] == reference
    assert {a.stats["decode_mode"] for a in forced} == {"static"}  # an explicit choice is kept


def test_cancel_between_steps_keeps_what_is_written(tiny, clips, tmp_path):
    steps = []

    def cancel() -> None:
        steps.append(1)
        if len(steps) == 8:  # after the first row ended (6 tokens), while the others decode
            raise AdaTPInterrupted("interrupted")

    with pytest.raises(AdaTPInterrupted):
        cap.caption_folder(tiny, job(clips, 2), on_step=cancel)
    written = sorted(p.name for p in clips.glob("*.txt"))
    assert written and len(written) < 4 and len(steps) == 8
    rerun = cap.caption_folder(tiny, job(clips, 2))
    assert [s.replace(".mp4", ".txt") for s in rerun.skipped] == written and len(rerun.done) == 4 - len(written)


def test_batch_size_option_and_node_input():
    assert build_parser().parse_args(["d"]).batch_size == 0
    assert build_parser().parse_args(["d", "--batch-size", "4"]).batch_size == 4
    with pytest.raises(AdaTPInputError, match="batch size"):
        cap.CaptionJob(folder=".", batch_size=-1)
    node = pack_module("nodes.caption_folder").AdaTP_CaptionFolder
    optional = node.INPUT_TYPES()["optional"]
    assert list(optional)[-1] == "batch_size" and optional["batch_size"][1]["default"] == 0


def test_static_batch_on_each_device_reuses_its_graphs(tiny_on, device, monkeypatch):
    """On CUDA (skipped without one): batched static steps are CUDA graphs, one per
    (batch bucket, capacity bucket), captured once and replayed for later clips; the
    tokens are batch 1's default-mode tokens."""
    model = tiny_on(device)
    states = clip_states(model)[:3]
    cfg = SamplingConfig(max_new_tokens=8, ignore_eos=True, decode_mode="default")
    reference = [generate_answer(s, cfg).token_ids for s in states]
    made = static_runners(monkeypatch)
    static = SamplingConfig(max_new_tokens=8, ignore_eos=True, decode_mode="static")
    assert [a.token_ids for a in together(model, states, static, 2)] == reference
    (step,) = made
    graphs = [e.graph for e in step.entries.values()]
    if device.type == "cuda":
        assert step.use_graph and all(g is not None for g in graphs)
        assert len(graphs) <= 2  # buckets of 2 rows and 1 row, reused by the third clip
    else:
        assert graphs and all(g is None for g in graphs)
