"""Continuous batching of caption decoding: the scheduler.

Each clip is prefilled on its own (vision, layers < K, selection: the stages as
they are, then ``continue_prefill``). Its cache then joins a running decode batch
of up to ``batch_size`` rows (``RowsKVCache``), and every decode step advances all
rows at once through the step runner (steps.py), which one answer uses as a batch of one
row. This module is the scheduler: it decides who joins (the rows cache's ``room`` answer),
which rows a step runs, and whether it is a static step; the runner decides how it runs.
A row that ends (EOS or max_new_tokens) leaves at once and its slot goes to the
next clip, so no row waits for the slowest one.

Schedule: before each decode step, every free slot is filled: the next clip's
prefill runs there, between two steps, on the same device and stream (its frames
were decoded ahead by caption.py's workers, so it never waits on a file). The
device is busy throughout: with prefill work while a slot fills, with the batch's
step otherwise; the other rows wait for one prefill, which costs them about as
many steps as the prefill takes, once per clip.

Static mode (the decode mode "static", and "auto" on CUDA where it pays): the same
buffers are read at their whole capacity and the rows in batch buckets (``steps.row_bucket``:
1, 2, 4, 8, then multiples of 8), so a step's shapes depend on (batch bucket, capacity
bucket) only; on CUDA each is one graph, captured once and replayed across clips. Auto
takes a static step only while it pays by the rule that one answer uses
(``StepRunner.static_choice``: the attention that padded rows and whole capacities add,
against the positions a graph's saving pays for), decided again whenever a clip joins or
leaves; otherwise it steps as the default mode does.

Joining: a prefilled clip joins when the rows cache answers that there is room (a free
row, and the memory its buffers must grow by); with other rows running it otherwise waits
for them to end, and the batch stays at their number; alone, it fails alone.

Faults (errors.is_out_of_memory is the one rule): a clip whose prefill fails (bad input,
out of memory) fails alone. Out of memory in a step halves the rows a step runs at once
and runs the step again in halves over the same cache (lengths advance only after a step
has run), so no token is lost or produced twice; new clips then join only up to the
halved limit. A row that cannot step even alone fails alone. Out of memory while capturing
a static step's graph is out of memory in that step (the runner raises it, as for one
answer); any other capture failure turns graphs off for the batch, with a warning.

Each row decodes exactly what it would alone: its own lengths per layer, a mask
of its own filled positions, its own position ids (M-RoPE too), its own
generator when sampling. DeepStack (Qwen3-VL) only touches the prefill.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import torch

from .hf.cache import LinearState, RowsKVCache
from .hf.sdpa_copy import masked_step_copies_kv, query_groups
from .decode import continue_prefill, row_positions
from .errors import AdaTPEnvironmentError, AdaTPInputError, AdaTPOutOfMemoryError, AdaTPTransformersError
from .generate import (Answer, DecodeRun, SamplingConfig, answer_from_run, check_room, resolve_decode_mode,
                       resolved_sampling, sampling_generator)
from .sampling import TokenChooser, choose_rows
from .memory import OOM_ADVICE, run_guarded
from .sdpa import plan_free_attention
from .state import AdaTPState
from .steps import StepRunner
from .timing import synchronize

log = logging.getLogger(__name__)

MAX_BATCH_SIZE = 256
MAX_AUTO_BATCH = 64  # auto never picks more rows than this
CPU_BATCH_SIZE = 4  # auto on the CPU: the fastest measured (bench/caption_throughput.py, RESULTS.md)
AUTO_MEMORY_SHARE = 0.6  # auto gives the batch's caches this share of the device's free memory


def check_batch_size(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_BATCH_SIZE:
        raise AdaTPInputError(f"batch size must be an integer from 0 (auto) to {MAX_BATCH_SIZE}, got {n!r}")
    return n


def row_bytes(cache, max_new_tokens: int, groups=None, copies: bool | None = None) -> int:
    """Bytes one clip takes in a batch: every layer's keys and values at its length plus its new
    tokens; its linear-attention states twice: the states and the copy of them that a step which
    could run out of memory halfway keeps, as does a graph capture's warm-up (``linear_states_kept``;
    hybrid models only); and, where the installed transformers copies keys and values per query head
    in a masked step (``hf/sdpa_copy.py``: 5.17 - 5.22; every batched step passes a mask), the largest
    layer's copy: it is freed after each layer, so one layer's counts towards the peak.

    groups: per layer, the query heads per key/value head (``query_groups``; none given: no copy
    counted); copies: whether the release copies (the installed one's answer unless given)."""
    total = copy = 0
    copies = masked_step_copies_kv() if copies is None else copies
    for i, n in enumerate(cache.lengths()):
        entry = cache.entry(i)
        if isinstance(entry, LinearState):  # a fixed size, however long, and its snapshot
            total += 2 * sum(t[0].numel() * t.element_size() for t in (entry.conv, entry.recurrent))
            continue
        k, _ = entry
        layer = 2 * (n + max_new_tokens) * k.shape[1] * k.shape[-1] * k.element_size()
        total += layer
        if copies and groups is not None and groups[i] > 1:
            copy = max(copy, layer * groups[i])  # [Hq = Hkv * groups] keys and values
    return total + copy


def auto_batch_size(device, per_row: int) -> int:
    """Rows to decode together when the user says 0 (auto): on CUDA, as many clips' caches
    as fit in a share of the free memory (capped); on the CPU the fastest measured."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(MAX_AUTO_BATCH, int(AUTO_MEMORY_SHARE * free) // max(per_row, 1)))


@dataclass
class Row:
    """One clip in the batch. tokens: chosen so far; logits: [V] that choose the next one."""

    key: object
    state: AdaTPState
    chooser: TokenChooser  # its own generator and repetition-penalty history, as at batch 1
    first: int  # position id of the first generated token
    logits: torch.Tensor | None
    prefill_seconds: float
    tokens: list = field(default_factory=list)
    joined: float = field(default_factory=time.perf_counter)
    passes: int = 0
    static_passes: int = 0  # the passes that ran as static steps
    static_extra: float = 0.0  # their sum of positions per layer read beyond a default step's
    busy_seconds: float = 0.0  # its share of the steps it took part in


@dataclass(frozen=True)
class Finished:
    """A clip that left the batch: its answer (stats add ``time_decode_share``, ``batch_size``),
    or why it failed."""

    key: object
    answer: Answer | None = None
    error: str | None = None


class DecodeBatch:
    """Up to ``batch_size`` clips decoded together (0: auto, chosen at the first clip).

    ``join(key, state)`` prefills the rest of a clip and takes it in; ``step()`` runs
    one decode step for every row. Both return the clips that finished.
    """

    def __init__(self, model, sampling: SamplingConfig, batch_size: int = 0):
        self.model = model
        self.adapter = model.adapter
        self.cfg = resolved_sampling(self.adapter, sampling)  # the model's generation config filled in
        self.requested = check_batch_size(batch_size)
        self.size = batch_size  # slots; fixed at the first join when auto
        self.limit = batch_size  # rows one step runs at once (halved on out of memory)
        self.eos = set() if self.cfg.ignore_eos else set(self.adapter.eos_token_ids)
        mode = resolve_decode_mode(self.cfg.decode_mode, self.adapter.device)
        self.mode = "default" if self.adapter.is_split else mode  # static needs the model on one device
        self.auto = self.cfg.decode_mode == "auto"  # static steps only where they pay (StepRunner.static_choice)
        self._choice: tuple | None = None  # ((rows, joins), static?, extra) for the rows in the batch now
        self.joins = 0
        self.runner: StepRunner | None = None
        self.cache: RowsKVCache | None = None
        self.rows: list[Row] = []
        self.waiting = None  # (row, its batch-1 cache): prefilled, not yet in the batch
        self.steps = 0
        self.ran_static = False  # whether the last step ran as a static step
        self.static_extra = 0.0  # the positions per layer it read beyond a default step (static_pays)
        self.busy_seconds = 0.0

    @property
    def has_room(self) -> bool:
        return self.waiting is None and (self.cache is None or len(self.rows) < min(self.size, self.limit))

    def __len__(self) -> int:
        return len(self.rows) + (self.waiting is not None)

    # -- joining ------------------------------------------------------------------
    def join(self, key, state: AdaTPState) -> list[Finished]:
        """Prefill the rest of ``state`` (layers >= K) and put it in a free row. A clip
        that ends at its first token finishes here; one that does not fit fails alone."""
        if not self.has_room:
            raise ValueError("no free row: step until one is free")
        try:
            check_room(state, self.cfg)
            row, cache = run_guarded(lambda: self._prefill(key, state), "the prefill")
        except AdaTPTransformersError:  # every clip would fail alike: the run stops, as at batch 1
            raise
        except (AdaTPInputError, AdaTPEnvironmentError) as exc:
            return [Finished(key, error=str(exc))]
        if self.cache is None:
            if not self.size:
                per_row = row_bytes(cache, self.cfg.max_new_tokens, query_groups(self.adapter.text_model))
                self.size = auto_batch_size(self.adapter.device, per_row)
                log.info("decoding up to %d clips together (auto)", self.size)
            self.limit = self.size
            self.cache = RowsKVCache(self.adapter.num_layers, self.size)
            self.runner = StepRunner(self.adapter, self.cache, state.position_ids, static=self.mode == "static")
        if self._choose([row]):
            return [self._finish(row, tuple(cache.lengths()))]
        self.waiting = (row, cache)
        return self._admit()

    def _admit(self) -> list[Finished]:
        """Give the waiting clip a row if the rows cache says there is room for it (a free row, and
        the memory its buffers must grow by). No room: with other rows running it waits for them to
        end, and the batch stays at their number; alone, it fails alone."""
        row, cache = self.waiting
        room = self.cache.room(cache, self.cfg.max_new_tokens)
        if not room.fits:
            if self.rows:
                self.limit = max(1, len(self.rows))
                log.warning("no memory for another row in the decode batch (%s); %d rows from now on", room, self.limit)
                return []
            self.waiting = None
            return [Finished(row.key, error=f"out of memory joining the decode batch ({room}); {OOM_ADVICE}.")]
        try:  # the room was there a moment ago; a copy that fails all the same fails this clip alone
            run_guarded(lambda: self.cache.add(cache, self.cfg.max_new_tokens), "joining the batch")
        except AdaTPOutOfMemoryError as exc:
            self.waiting = None
            return [Finished(row.key, error=str(exc))]
        self.waiting = None
        self.rows.append(row)
        self.joins += 1
        return []

    def _prefill(self, key, state: AdaTPState):
        dev = self.adapter.device
        with torch.inference_mode(), plan_free_attention(dev):
            start = time.perf_counter()
            cache, logits = continue_prefill(state, 0)
            synchronize(dev)
            seconds = time.perf_counter() - start
        first = int(state.position_ids.max()) + 1
        chooser = TokenChooser(self.cfg, state.prompt.input_ids, sampling_generator(self.adapter, self.cfg))
        return Row(key, state, chooser, first, logits, seconds, busy_seconds=seconds), cache

    # -- stepping -----------------------------------------------------------------
    def step(self) -> list[Finished]:
        """One decode step for every row (in parts of ``limit`` rows); the rows that ended."""
        ended: list[int] = []
        failed: dict[int, str] = {}
        start = 0
        while start < len(self.rows):
            stop = min(start + self.limit, len(self.rows))
            t0 = time.perf_counter()
            try:
                logits = run_guarded(lambda: self._run(start, stop), "batched decoding")
            except AdaTPOutOfMemoryError as exc:
                if stop - start == 1:
                    failed[start] = str(exc)
                    start = stop
                    continue
                self.limit = max(1, (stop - start) // 2)
                log.warning("out of memory decoding %d rows together; %d from now on", stop - start, self.limit)
                continue
            seconds = time.perf_counter() - t0
            self.busy_seconds += seconds
            part = self.rows[start:stop]
            for r, row in enumerate(part):
                row.logits = logits[r]
                row.passes += 1
                row.static_passes += self.ran_static
                row.static_extra += self.static_extra if self.ran_static else 0.0
                row.busy_seconds += seconds / len(part)
            ended += [start + r for r in self._choose(part)]
            start = stop
        self.steps += 1
        out = []
        for index in sorted(set(ended) | set(failed), reverse=True):  # the last row moves into a freed one
            row = self.rows[index]
            lengths = self.cache.row_lengths(index)
            if index in failed:
                out.append(Finished(row.key, error=failed[index]))
            else:
                out.append(self._finish(row, lengths))
            self.cache.remove(index)
            self.rows[index] = self.rows[-1]
            self.rows.pop()
        out.reverse()
        if self.waiting is not None and len(self.rows) < self.limit:
            out += self._admit()
        return out

    def _run(self, start: int, stop: int) -> torch.Tensor:
        """Logits [stop - start, V] of one step over rows [start, stop); lengths advance after it ran.
        A static step only over all rows, where it runs (``static_pays``); a part of them after out of
        memory steps as the default mode does."""
        dev = self.adapter.device
        part = self.rows[start:stop]
        self.ran_static = self.runner.static and start == 0 and stop == len(self.rows) and self.static_pays()
        with torch.inference_mode(), plan_free_attention(dev):
            tokens = torch.tensor([row.tokens[-1] for row in part], device=dev)
            positions = row_positions([row.first for row in part], [len(row.tokens) - 1 for row in part],
                                      part[0].state.position_ids, dev)
            logits = self.runner(tokens, positions, start, static=self.ran_static)
            synchronize(dev)
        return logits

    def static_pays(self) -> bool:
        """Whether a static step over all rows runs now (``StepRunner.static_choice``: always in
        static mode; in auto where it pays for these rows), decided when a clip joins or leaves.
        ``static_extra``: what such a step reads beyond a default one (positions per layer)."""
        key = (len(self.rows), self.joins)
        if self._choice is None or self._choice[0] != key:
            self._choice = (key, *self.runner.static_choice(len(self.rows), self.auto))
        self.static_extra = self._choice[2]
        return self._choice[1]

    def _choose(self, rows: list[Row]) -> list[int]:
        """Choose each row's next token from its logits; the indices (in ``rows``) of rows that ended.
        All rows at once on the device, each by its own chooser (``choose_rows``: its penalty history,
        its generator), with no host sync per row: the one sync is the ``tolist()`` that reads the
        chosen tokens for the stop checks and the next step's input, once per step (as batch 1's
        ``int(token)`` is once per token)."""
        with torch.inference_mode():
            logits = torch.stack([row.logits for row in rows])
            chosen = choose_rows([row.chooser for row in rows], logits).tolist()
        ended = []
        for r, (row, token) in enumerate(zip(rows, chosen)):
            row.logits = None
            if token in self.eos:
                ended.append(r)
                continue
            row.tokens.append(int(token))
            if len(row.tokens) >= self.cfg.max_new_tokens:
                ended.append(r)
        return ended

    def _finish(self, row: Row, kv_lengths: tuple) -> Finished:
        decode_seconds = time.perf_counter() - row.joined - row.prefill_seconds
        run = DecodeRun(tokens=row.tokens, logits=None, kv_lengths=kv_lengths,
                        prefill_seconds=row.prefill_seconds, decode_seconds=max(decode_seconds, 0.0),
                        passes=row.passes, mode=self._row_mode(row),
                        capture_seconds=self.runner.capture_seconds)
        answer = answer_from_run(row.state, run, self.cfg)
        decoding = replace(answer.decoding, decode_share=row.busy_seconds, batch_size=self.size,
                           static_passes=row.static_passes,
                           static_extra=row.static_extra / row.static_passes if row.static_passes else 0.0)
        answer.stats.update(decoding.as_dict())
        return Finished(row.key, replace(answer, decoding=decoding))

    def _row_mode(self, row: Row) -> str:
        """The mode a row's steps ran in: static or default, or "mixed" where auto changed its
        choice while the row decoded (rows joined or left); the batch's mode before any step."""
        if not row.passes:
            return self.mode
        if row.static_passes == row.passes:
            return "static"
        return "default" if not row.static_passes else "mixed"


def decode_together(model, sampling: SamplingConfig, clips: Iterable[tuple[object, Callable[[], AdaTPState]]],
                    batch_size: int = 0, on_step: Callable[[], None] | None = None) -> Iterator[Finished]:
    """Continuous batching over ``clips``: (key, prefill) pairs, where prefill() gives the
    clip's state after selection. Yields each clip's ``Finished`` as it leaves the batch.

    prefill() is called only when a row is free, between decode steps. Bad input or
    out of memory in it fails that clip alone; any other exception propagates (the
    model failed). on_step() runs before each step and may raise to stop (Cancel):
    the rows in the batch are then dropped, the clips already yielded stay.
    """
    batch = DecodeBatch(model, sampling, batch_size)
    pending = iter(clips)
    more = True
    while True:
        while more and batch.has_room:
            item = next(pending, None)
            if item is None:
                more = False
                break
            key, prefill = item
            try:
                state = run_guarded(prefill, "the prefill")
            except AdaTPTransformersError:  # every clip would fail alike: the run stops, as at batch 1
                raise
            except (AdaTPInputError, AdaTPEnvironmentError) as exc:
                yield Finished(key, error=str(exc))
                continue
            yield from batch.join(key, state)
        if not len(batch):
            return
        if not batch.rows:  # only a clip waiting for memory, nothing running: it fails alone
            yield from batch._admit()
            continue
        if on_step is not None:
            on_step()
        yield from batch.step()
