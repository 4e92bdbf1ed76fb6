"""Continuous batching of caption decoding: the scheduler.

Each clip is prefilled on its own (vision, layers < K, selection: the stages as
they are, then ``continue_prefill``). Its cache then joins a running decode batch
of up to ``batch_size`` rows (``RowsKVCache``), and every decode step advances all
rows at once through ``decode_step``, the same function one answer uses at B = 1.
A row that ends (EOS or max_new_tokens) leaves at once and its slot goes to the
next clip, so no row waits for the slowest one.

Schedule: before each decode step, every free slot is filled: the next clip's
prefill runs there, between two steps, on the same device and stream (its frames
were decoded ahead by caption.py's workers, so it never waits on a file). The
device is busy throughout: with prefill work while a slot fills, with the batch's
step otherwise; the other rows wait for one prefill, which costs them about as
many steps as the prefill takes, once per clip.

Static mode (the decode mode "static", and "auto" on CUDA): the same buffers are
read at their whole capacity and the rows in power-of-two batch buckets
(``StaticRowsStep``), so a step's shapes depend on (batch bucket, capacity
bucket) only; on CUDA each is one graph, captured once and replayed across clips.

Faults: a clip whose prefill fails (bad input, out of memory) fails alone. Out of
memory in a step halves the rows a step runs at once and runs the step again in
halves over the same cache (lengths advance only after a step has run), so no
token is lost or produced twice; new clips then join only up to the halved
limit. A row that cannot step even alone fails alone.

Each row decodes exactly what it would alone: its own lengths per layer, a mask
of its own filled positions, its own position ids (M-RoPE too), its own
generator when sampling. DeepStack (Qwen3-VL) only touches the prefill.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from . import static_decode
from .hf.cache import LinearState, RowsKVCache, linear_states_kept
from .decode import continue_prefill, decode_step, row_positions
from .errors import AdaTPEnvironmentError, AdaTPInputError, AdaTPTransformersError
from .generate import (Answer, DecodeRun, SamplingConfig, answer_from_run, check_room, resolve_decode_mode,
                       resolved_sampling, sampling_generator)
from .sampling import TokenChooser, choose_rows
from .memory import run_guarded
from .sdpa import plan_free_attention
from .state import AdaTPState
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


def row_bytes(cache, max_new_tokens: int) -> int:
    """Bytes one clip's keys and values take in a batch: every layer's length plus its new tokens."""
    total = 0
    for i, n in enumerate(cache.lengths()):
        entry = cache.entry(i)
        if isinstance(entry, LinearState):  # a fixed size, however long
            total += sum(t[0].numel() * t.element_size() for t in (entry.conv, entry.recurrent))
            continue
        k, _ = entry
        total += 2 * (n + max_new_tokens) * k.shape[1] * k.shape[-1] * k.element_size()
    return total


def auto_batch_size(device, per_row: int) -> int:
    """Rows to decode together when the user says 0 (auto): on CUDA, as many clips' caches
    as fit in a share of the free memory (capped); on the CPU the fastest measured."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(MAX_AUTO_BATCH, int(AUTO_MEMORY_SHARE * free) // max(per_row, 1)))


class StaticRowsStep:
    """Fixed-shape decode steps over rows [0, n) of a ``RowsKVCache``, for static mode.

    n is rounded up to a batch bucket (a power of two, at most the slots) and every
    layer is read at its capacity (a capacity bucket), so the step's shapes depend on
    (batch bucket, capacities) only. On CUDA each such step is captured once as a
    CUDA graph and replayed for every step of every clip that lands in it; elsewhere
    the same fixed-shape step runs without a graph (same tokens as the default mode).
    Graphs go when the buffers are reallocated (a joining clip needed more room).
    """

    def __init__(self, adapter, cache: RowsKVCache, position_template: torch.Tensor):
        self.adapter, self.cache = adapter, cache
        self.axes = position_template.shape[:-2]  # () or (3,) for M-RoPE
        self.dtype = position_template.dtype
        self.use_graph = adapter.device.type == "cuda"
        self.entries: dict = {}
        self.capture_seconds = 0.0

    def _key(self, bucket: int) -> tuple:
        c = self.cache
        return bucket, c.signature()

    def _step(self, entry) -> torch.Tensor:
        window = self.cache.window(0, entry["bucket"], static=True)
        return decode_step(self.adapter, entry["tokens"], entry["positions"], window, window.masks())

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens [n], positions [n, 1] (or [3, n, 1]) -> logits [n, V] (a copy)."""
        n = tokens.shape[0]
        bucket = min(self.cache.slots, 1 << (n - 1).bit_length())
        key = self._key(bucket)
        entry = self.entries.get(key)
        if entry is None:
            if self.entries and next(iter(self.entries))[1:] != key[1:]:
                self.entries.clear()  # the buffers moved: their graphs read the old ones
            dev = self.adapter.device
            entry = self.entries[key] = {
                "bucket": bucket, "graph": None, "out": None,
                "tokens": torch.zeros(bucket, dtype=torch.long, device=dev),
                "positions": torch.zeros((*self.axes, bucket, 1), dtype=self.dtype, device=dev)}
        entry["tokens"][:n].copy_(tokens)
        entry["positions"][..., :n, :].copy_(positions)
        if not self.use_graph:
            return self._step(entry)[:n]
        if entry["graph"] is None:
            self._capture(entry)
        if entry["graph"] is None:  # capture failed: fixed shapes without a graph
            return self._step(entry)[:n]
        entry["graph"].replay()
        return entry["out"][:n].clone()

    def _capture(self, entry) -> None:
        """The step as a CUDA graph, captured as one answer's is (static_decode.capture_graph: its
        own stream, kept with the graph; the warm-up's advance of every row's linear-attention
        states undone)."""
        dev = self.adapter.device
        start = time.perf_counter()
        try:
            with linear_states_kept(self.cache):  # the warm-up step must not advance them
                entry["graph"], entry["out"], entry["stream"] = static_decode.capture_graph(
                    lambda: self._step(entry), dev)
        except RuntimeError as exc:
            log.warning("CUDA graph capture of a batched step failed (%s); stepping without a graph", exc)
            self.use_graph = False
        synchronize(dev)
        self.capture_seconds += time.perf_counter() - start


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
        self.static: StaticRowsStep | None = None
        self.cache: RowsKVCache | None = None
        self.rows: list[Row] = []
        self.waiting = None  # (row, its batch-1 cache): prefilled, not yet in the batch
        self.steps = 0
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
                self.size = auto_batch_size(self.adapter.device, row_bytes(cache, self.cfg.max_new_tokens))
                log.info("decoding up to %d clips together (auto)", self.size)
            self.limit = self.size
            self.cache = RowsKVCache(self.adapter.num_layers, self.size)
            if self.mode == "static":
                self.static = StaticRowsStep(self.adapter, self.cache, state.position_ids)
        if self._choose([row]):
            return [self._finish(row, tuple(cache.lengths()))]
        self.waiting = (row, cache)
        return self._admit()

    def _admit(self) -> list[Finished]:
        """Copy the waiting clip's cache into a row. Out of memory there: with other rows
        running, it waits for them to end (and the batch stays at their number); alone, it fails."""
        row, cache = self.waiting
        try:
            run_guarded(lambda: self.cache.add(cache, self.cfg.max_new_tokens), "joining the batch")
        except AdaTPTransformersError:  # every clip would fail alike: the run stops, as at batch 1
            raise
        except AdaTPEnvironmentError as exc:
            if self.rows:
                self.limit = max(1, len(self.rows))
                log.warning("out of memory joining the decode batch; %d rows from now on", self.limit)
                return []
            self.waiting = None
            return [Finished(row.key, error=str(exc))]
        self.waiting = None
        self.rows.append(row)
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
            except AdaTPTransformersError:  # every clip would fail alike: the run stops, as at batch 1
                raise
            except AdaTPEnvironmentError as exc:
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
                row.busy_seconds += seconds / len(part)
            ended += [start + r for r in self._choose(part)]
            start = stop
        self.steps += 1
        out = []
        for index in sorted(set(ended) | set(failed), reverse=True):  # the last row moves into a freed one
            row = self.rows[index]
            lengths = tuple(self.cache.lengths[index])
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
        """Logits [stop - start, V] of one step over rows [start, stop); lengths advance after it ran."""
        dev = self.adapter.device
        part = self.rows[start:stop]
        # A step over several rows that fails (out of memory) runs again in halves: its linear
        # states must not have taken the token in already (the key/value slots are simply written
        # again). That costs a copy of those rows' states per step (hybrid models only; ~48 MiB
        # per row for a 9B); one row that fails is not run again, so it needs none.
        keep = (linear_states_kept(self.cache, slice(start, stop), only_on_error=True) if stop - start > 1
                else contextlib.nullcontext())
        with torch.inference_mode(), plan_free_attention(dev), keep:
            tokens = torch.tensor([row.tokens[-1] for row in part], device=dev)
            positions = row_positions([row.first for row in part], [len(row.tokens) - 1 for row in part],
                                      part[0].state.position_ids, dev)
            if self.static is not None and start == 0 and stop == len(self.rows):
                logits = self.static(tokens, positions)
            else:  # default mode, or a part of the rows after running out of memory
                window = self.cache.window(start, stop)
                logits = decode_step(self.adapter, tokens, positions, window, window.masks())
            synchronize(dev)
        self.cache.advance(start, stop)
        return logits

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
                        passes=row.passes, mode=self.mode,
                        capture_seconds=self.static.capture_seconds if self.static is not None else 0.0)
        answer = answer_from_run(row.state, run, self.cfg)
        answer.stats.update({"time_decode_share": row.busy_seconds, "batch_size": self.size})
        return Finished(row.key, answer)


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
