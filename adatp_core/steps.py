"""One step runner: one decode step for one answer or for B rows. A single answer is a batch of one row.

Both callers hold their rows in a ``RowsKVCache`` and step them here:
- one answer (generate.py): one row. In default mode the row is the prefilled cache's own buffers
  (``RowsKVCache.holding``, no copy); in static mode a bucket's buffers kept per loaded model
  (static_decode.py's ``StaticDecoders``), so the next answer replays the same graph;
- captions decoded together (batching.py, the scheduler): up to ``slots`` rows. The scheduler
  decides who runs (which rows, how many at once, who joins: ``RowsKVCache.room``); this module
  decides how a step over them runs.

What lives here, once for both:
- the default step: rows [a, b) over their filled positions, each through a mask of its own; a
  lone row needs no mask (all it reads is its own), so it runs the kernel that one answer always
  ran (flash with split-KV and GQA on CUDA), in a batch too;
- the static step: the rows rounded up to a batch bucket (``row_bucket``) and every layer read at
  its whole capacity, so a step's shapes depend on (bucket, buffers) only; on CUDA each is one
  graph, captured once (``capture_graph``) and replayed. The capture's outcome is a value
  (``CaptureStatus``: captured, reused, skipped and why, failed and why) that the caller reads;
- the graph-or-not decision: whether graphs can be taken at all (``graph_blocker``), and where
  auto mode takes a static step: only where it pays, by the positions per layer it reads beyond a
  default step against the card's measured break-even (``static_break_even``,
  ``static_rows_pay_off``; one answer: ``static_pays_off``);
- the out-of-memory rule (errors.is_out_of_memory): running out of memory while capturing is
  raised, as anywhere in a step, never turned into "no graph": the caller's halving (a batch) or
  its clear error (one answer) follows. Any other capture failure turns graphs off for the runner
  (slower, never wrong) and says so in its status;
- undoing a step's advance of the linear-attention states where a step that fails can run again:
  a capture's warm-up always; a step of several rows without a graph when it raises (the batch
  runs it again in halves). A graph replay allocates nothing, so it cannot fail halfway.

Lengths advance only when a step has run (``RowsKVCache.advance``, called here), so a step that
raised can run again over the same cache.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections import Counter
from dataclasses import dataclass

import torch

from .errors import is_out_of_memory
from .hf.cache import RowsKVCache, capacity_bucket, linear_states_kept
from .timing import synchronize

log = logging.getLogger(__name__)


def decode_step(adapter, tokens: torch.Tensor, positions: torch.Tensor, cache, masks=None) -> torch.Tensor:
    """One decode step of B rows.

    tokens: [B] long, each row's last chosen token.
    positions: [B, 1] long position ids (M-RoPE: [3, B, 1]).
    cache: what the layers read and write (a ``KVCache`` for B = 1, a ``RowsWindow``).
    masks: per layer, [B, 1, 1, n] bool of the positions each row attends to (None: all).
    Returns float32 logits [B, V].
    """
    hidden = adapter.embed_tokens(tokens.view(-1, 1))
    hidden = adapter.run_layers(hidden, positions, cache, 0, adapter.num_layers, masks=masks)
    return adapter.last_logits(hidden)


@dataclass(frozen=True)
class CaptureStatus:
    """What became of a static step's CUDA graph, as a value (the doctor and the stats read it).

    outcome: "pending" (not captured yet), "captured", "reused" (an earlier capture replayed),
        "skipped" (no graph is taken: ``reason`` says why) or "failed" (``reason``: the error's
        first line; steps run without a graph, or, when ``out_of_memory``, the error was raised).
    seconds: what the capture took (0 unless captured now)."""

    outcome: str
    reason: str = ""
    out_of_memory: bool = False
    seconds: float = 0.0

    OUTCOMES = ("pending", "captured", "reused", "skipped", "failed")

    def __post_init__(self):
        if self.outcome not in self.OUTCOMES:
            raise ValueError(f"capture outcome must be one of {self.OUTCOMES}, got {self.outcome!r}")

    @property
    def failed(self) -> bool:
        return self.outcome == "failed"

    @property
    def note(self) -> str:
        """The stats' one-word form ("static_graph"): captured, reused, "none: why", "failed: why"."""
        if self.outcome == "pending":
            return "not captured yet"
        if self.outcome == "skipped":
            return f"none: {self.reason}" if self.reason else "none"
        if self.outcome == "failed":
            return f"failed: {self.reason}"
        return self.outcome

    @classmethod
    def failure(cls, exc: BaseException) -> "CaptureStatus":
        if is_out_of_memory(exc):
            return cls("failed", "out of memory", out_of_memory=True)
        text = str(exc).strip()
        return cls("failed", text.splitlines()[0][:120] if text else type(exc).__name__)


def row_bucket(rows: int, slots: int) -> int:
    """The batch bucket a static step over ``rows`` rows runs at: 1, 2, 4, 8, then the next
    multiple of 8 (as vLLM's graph sizes), at most ``slots``. Finer than powers of two, so 33 rows
    pad to 40, not 64; a batch of up to 64 rows has at most 11 buckets (graphs)."""
    bucket = 1 << (rows - 1).bit_length() if rows <= 8 else -(-rows // 8) * 8
    return min(slots, bucket)


def no_graph_reason(adapter) -> str | None:
    """Why static steps of ``adapter``'s model run without a CUDA graph (None: they are captured)."""
    if adapter.device.type != "cuda":
        return "not on CUDA"
    return graph_blocker(adapter)


def static_pays_for_answer(adapter, lengths, max_new_tokens: int) -> bool:
    """Auto mode's choice for one answer, before its prefill (static copies the prefill into its own
    buffers; default reserves room in the prefill's): ``lengths``, the positions each layer holds
    (linear-attention layers left out: a state has no capacity), at this device's break-even."""
    return not lengths or static_pays_off(lengths, max_new_tokens, static_break_even(adapter.device))


@dataclass
class _Bucket:
    """One static step's fixed inputs, and its graph once captured."""

    rows: int
    tokens: torch.Tensor  # [rows] long
    positions: torch.Tensor  # [rows, 1] (M-RoPE: [3, rows, 1])
    graph: object = None
    out: torch.Tensor | None = None  # the graph's logits [rows, V]
    stream: object = None  # the graph's own capture stream, kept as long as the graph


class StepRunner:
    """One decode step over rows of ``cache``: default steps, or static ones (``static``).

    position_template: a row's prompt position ids ([1, L] or [3, 1, L]), for the static inputs'
        shapes. use_graph: whether static steps are captured (None: on CUDA unless ``graph_blocker``
        says no). ``status`` is the last capture's ``CaptureStatus``; ``capture_seconds`` the total.
    """

    def __init__(self, adapter, cache: RowsKVCache, position_template: torch.Tensor, static: bool = False,
                 use_graph: bool | None = None):
        self.adapter, self.cache, self.static = adapter, cache, static
        self.axes = tuple(position_template.shape[:-2])  # () or (3,) for M-RoPE
        self.dtype = position_template.dtype
        self.break_even = static_break_even(adapter.device)
        reason = no_graph_reason(adapter) if use_graph is None else (None if use_graph else "")
        if static and reason and adapter.device.type == "cuda":
            log.info("static decoding without a CUDA graph: %s", reason)
        self.use_graph = static and reason is None
        self.status = CaptureStatus("pending") if self.use_graph else CaptureStatus("skipped", reason or "")
        self.entries: dict = {}
        self.capture_seconds = 0.0

    # -- the step -------------------------------------------------------------------------------
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, start: int = 0,
                 static: bool | None = None) -> torch.Tensor:
        """Feed ``tokens`` [n] (long, any device) at ``positions`` [n, 1] (M-RoPE [3, n, 1]) to rows
        [start, start + n) and advance them; returns float32 logits [n, V], the caller's to keep.
        static: a static step (rows from 0 only); None: the runner's mode."""
        n = tokens.shape[0]
        if self.static if static is None else static:
            if start:
                raise ValueError(f"a static step runs rows from 0, not {start}")
            logits = self._static(tokens, positions)
        else:
            logits = self._default(tokens, positions, start, start + n)
        self.cache.advance(start, start + n)
        return logits

    def _default(self, tokens, positions, start: int, stop: int) -> torch.Tensor:
        window = self.cache.window(start, stop)
        masks = window.masks() if stop - start > 1 else None  # a lone row reads only its own positions
        with self._kept(start, stop):
            return decode_step(self.adapter, tokens, positions, window, masks)

    def _static(self, tokens, positions) -> torch.Tensor:
        n = tokens.shape[0]
        entry = self._entry(n)
        entry.tokens[:n].copy_(tokens)
        entry.positions[..., :n, :].copy_(positions)
        if self.use_graph and entry.graph is None:
            self._capture(entry)
        if entry.graph is None:  # no graph: the same fixed-shape step, run
            with self._kept(0, n):
                return self._fixed_step(entry)[:n]
        logits = torch.empty_like(entry.out[:n])  # before the replay: after it, nothing may fail
        entry.graph.replay()
        return logits.copy_(entry.out[:n])

    def _fixed_step(self, entry: _Bucket) -> torch.Tensor:
        window = self.cache.window(0, entry.rows, static=True)
        return decode_step(self.adapter, entry.tokens, entry.positions, window, window.masks())

    def _kept(self, start: int, stop: int):
        """The rows' linear-attention states put back if the step raises, where the caller may run
        it again: a step of several rows (a batch halves them on out of memory). One row that fails
        is not run again; a graph replay cannot fail halfway (it allocates nothing)."""
        if stop - start > 1 and self.cache.linear:
            return linear_states_kept(self.cache, slice(start, stop), only_on_error=True)
        return contextlib.nullcontext()

    # -- buckets and graphs ---------------------------------------------------------------------
    def _entry(self, rows: int) -> _Bucket:
        bucket = row_bucket(rows, self.cache.slots)
        key = (bucket, self.cache.signature())
        entry = self.entries.get(key)
        if entry is None:
            if self.entries and next(iter(self.entries))[1:] != key[1:]:
                self.entries.clear()  # the buffers moved: their graphs read the old ones
            dev = self.adapter.device
            entry = self.entries[key] = _Bucket(
                bucket, torch.zeros(bucket, dtype=torch.long, device=dev),
                torch.zeros((*self.axes, bucket, 1), dtype=self.dtype, device=dev))
        return entry

    def capture(self, rows: int = 1) -> CaptureStatus:
        """Capture the static step over ``rows`` rows as a CUDA graph, unless it is captured already
        (reused) or no graph is taken (skipped, or failed before); the status. Out of memory is raised."""
        return self._capture(self._entry(rows))

    def _capture(self, entry: _Bucket) -> CaptureStatus:
        """The step as a CUDA graph (``capture_graph``: its own stream, kept with the graph), the
        warm-up's advance of the rows' linear-attention states undone. Out of memory is raised,
        with the status saying so; any other failure turns graphs off for this runner, with a
        warning and the status naming it."""
        if entry.graph is not None:
            self.status = CaptureStatus("reused")
        if not self.use_graph or entry.graph is not None:
            return self.status
        dev = self.adapter.device
        synchronize(dev)
        start = time.perf_counter()
        try:
            with linear_states_kept(self.cache):  # the warm-up step must not advance them
                entry.graph, entry.out, entry.stream = capture_graph(lambda: self._fixed_step(entry), dev)
        except RuntimeError as exc:
            entry.graph = entry.out = entry.stream = None
            self.status = CaptureStatus.failure(exc)
            if self.status.out_of_memory:
                raise
            self.use_graph = False
            log.warning("CUDA graph capture failed for a static step over %d row(s) (%s: %s); stepping with fixed "
                        "shapes but without a graph", entry.rows, type(exc).__name__, exc)
            return self.status
        synchronize(dev)
        seconds = time.perf_counter() - start
        self.capture_seconds += seconds
        self.status = CaptureStatus("captured", seconds=seconds)
        return self.status

    # -- static or not --------------------------------------------------------------------------
    def static_choice(self, rows: int, auto: bool) -> tuple[bool, float]:
        """(whether a static step over rows [0, rows) runs, the positions per attention layer it reads
        beyond a default step). Static mode always takes it; auto where ``static_rows_pay_off`` says so
        at this device's break-even. A lone row's default step has no mask and is counted free, as
        one answer's is (``static_pays_off``)."""
        c = self.cache
        layers = c.attention_layers()
        capacities = [c.capacity(i) for i in layers]
        spans = [0] * len(layers) if rows == 1 else c.spans(rows)
        shape = (rows, row_bucket(rows, c.slots), capacities, spans)
        extra = static_extra_positions(*shape)
        pays = not auto or static_rows_pay_off(*shape, self.break_even)
        log.debug("%d rows: static steps read %.0f more positions per layer; %s steps",
                  rows, extra, "static" if pays else "default")
        return pays, extra


# Auto mode decodes with static steps only while the layers' mean capacity is at most this many
# positions. Why a limit: a static step attends over its whole capacity with a bool mask, so
# transformers' sdpa expands K/V to every query head (no GQA with a mask on CUDA), and the
# memory-efficient kernel runs one thread block per query head over the whole buffer, without
# split-KV. Its cost grows with the capacity at the bandwidth of ~H blocks (a few dozen of an
# H100's 132 SMs), about 10 ns per position and layer at head_dim 128 in bf16: ~2.5 ms per token
# for a 28-layer model at 8192 positions, about what the graph saves in launches at batch 1.
# The default steps use flash with split-KV and GQA, whose cost at that length is a fraction of a
# millisecond. So: static (the graph wins) up to 8192, default beyond. An estimate from the kernels,
# to be checked with bench/decode_modes.py on a GPU (1k, 8k, 32k cached tokens).
STATIC_AUTO_MAX_CAPACITY = 8192

# The same break-even, measured on a card: positions per attention layer that a graph's saving pays
# for, keyed by torch.cuda.get_device_name. A card listed here decides by its own figure; any other
# keeps the estimate above. Empty: no GPU has been lent since the rule was written. To fill it, run
# bench/caption_throughput.py with --decode-mode static and --decode-mode default on that card: it
# prints, per batch size, the static steps' extra positions per layer and both throughputs; the
# break-even lies between the largest extra at which static won and the smallest at which it lost.
MEASURED_BREAK_EVEN: dict[str, int] = {}


def static_break_even(device=None) -> int:
    """Positions per attention layer a static step may read beyond the default step's and still pay:
    the card's measured figure (MEASURED_BREAK_EVEN) where recorded, else STATIC_AUTO_MAX_CAPACITY."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and MEASURED_BREAK_EVEN:
        return MEASURED_BREAK_EVEN.get(torch.cuda.get_device_name(device), STATIC_AUTO_MAX_CAPACITY)
    return STATIC_AUTO_MAX_CAPACITY


def static_pays_off(lengths, max_new_tokens: int, break_even: int | None = None) -> bool:
    """Whether auto mode should decode one answer with static steps, for a cache whose layers
    hold ``lengths`` positions before ``max_new_tokens`` more (see STATIC_AUTO_MAX_CAPACITY): the
    rows rule at one row, whose default step (no mask: flash with split-KV) the rule counts as free."""
    capacities = [capacity_bucket(n + max_new_tokens) for n in lengths]
    return static_rows_pay_off(1, 1, capacities, [0] * len(capacities), break_even)


def static_rows_pay_off(rows: int, bucket: int, capacities, spans, break_even: int | None = None) -> bool:
    """Whether a static step over ``rows`` rows pays: the same rule as one answer's, counting the
    attention that static mode adds. Per attention layer, a static step reads ``bucket`` rows (the
    rows rounded up to a batch bucket) at the buffer's whole ``capacity``; the default step reads
    ``rows`` rows at ``span``, the longest row's filled positions (it passes a mask too, so the
    same kernel runs). Static pays while the mean extra per layer, sum(bucket * capacity - rows *
    span) / layers, is at most the break-even (``static_break_even``; STATIC_AUTO_MAX_CAPACITY
    unless given), the positions a graph's saved launches pay for.

    Why the one answer's estimate is kept for rows until a card is measured: it prices a position
    at what it costs one row (a few dozen SMs busy), more than in a full batch (every SM busy), so
    it over-counts the extra, and the extra grows with every padded row and with the buffers'
    length: many padded rows or long clips choose the default steps. What it cannot see, the
    graph's saving shrinking as a large batch's step becomes bound by the GPU, is what the
    measured per-card figure corrects."""
    budget = STATIC_AUTO_MAX_CAPACITY if break_even is None else break_even
    return static_extra_positions(rows, bucket, capacities, spans) <= budget


def static_extra_positions(rows: int, bucket: int, capacities, spans) -> float:
    """The positions per attention layer (mean) that a static step over ``rows`` rows reads beyond
    the default step (see ``static_rows_pay_off``); 0 without an attention layer."""
    if not capacities:
        return 0.0
    return sum(bucket * c - rows * s for c, s in zip(capacities, spans)) / len(capacities)


def graph_blocker(adapter) -> str | None:
    """Why the decode step of ``adapter``'s model must not be captured as a CUDA
    graph, or None. Capturing these would fail every time (and, before the capture
    was made safe, leave the thread on the capture stream):
    - bitsandbytes 8-bit layers: LLM.int8() asks ``outliers.any()`` on the host;
    - a model split over devices, or with layers offloaded to CPU memory or disk
      (accelerate's hooks move weights during the forward).
    """
    model = adapter.model
    for module in model.modules():
        if type(module).__name__ == "Linear8bitLt":
            return "bnb-8bit layers synchronise with the host at every step"
        hook = getattr(module, "_hf_hook", None)
        if getattr(hook, "offload", False):
            return "some layers are offloaded to CPU memory"
    if adapter.is_split:
        return "the model is split over devices"
    return None


def capture_graph(fn, device) -> tuple:
    """(graph, output, stream) of ``fn()`` captured as a CUDA graph on ``device``, on a
    new stream of its own (keep it as long as the graph).

    Unlike ``torch.cuda.graph``:
    - the capture runs under ``torch.cuda.device(device)``: torch's capture belongs
      to the current device, so a model on another GPU would record an empty graph;
    - the stream is the graph's own (``_private_stream``), never torch's shared default
      capture stream: cuBLAS keeps one workspace per (handle, stream), and since
      pytorch#175276 (February 2026, so torch 2.11 onwards; still open as pytorch#193402
      in September 2026, treat 2.11-2.13 as affected) destroying a graph frees the
      workspaces of its stream, which every other graph captured on that stream still
      uses: an evicted bucket would leave the others replaying into freed memory. The
      warm-up runs on the same stream first, so the workspace exists before the capture;
    - when the capture fails (an op that synchronises with the host, running out of
      memory), the thread goes back to its previous stream and the allocator stops
      allocating to the graph's pool before the error is raised. torch's context
      manager leaves both behind when ``capture_end`` raises, and every later
      ``empty_cache`` then fails.
    """
    device = torch.device(device)
    with torch.cuda.device(device):
        stream = _private_stream(device)
        previous = torch.cuda.current_stream(device)
        stream.wait_stream(previous)
        torch.cuda.set_stream(stream)
        try:
            fn()  # warm-up on the capture stream, outside the graph (lazy inits, workspaces)
            graph = torch.cuda.CUDAGraph()
            pool = torch.cuda.graph_pool_handle()  # known here, so a failed capture can give it back
            # thread_local: CUDA calls from other threads (ComfyUI's server asking for memory
            # figures) must not invalidate the capture.
            try:
                graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            except BaseException:
                _give_back_pool(device, pool)
                raise
            try:
                out = fn()
            except BaseException:
                _abandon_capture(graph, device, pool)
                raise
            try:
                graph.capture_end()
            except BaseException:
                _give_back_pool(device, pool)
                raise
        finally:
            torch.cuda.set_stream(previous)
            previous.wait_stream(stream)  # what ran on the capture stream comes before what follows
    key = _stream_key(stream)
    _GRAPH_STREAMS[key] += 1
    weakref.finalize(graph, _GRAPH_STREAMS.subtract, [key])  # free for another graph once this one is gone
    return graph, out, stream


# Streams that live graphs of this process were captured on, with their counts. torch hands
# out streams from a small pool (32 per device and priority, round robin), so a new Stream is
# not always a new stream: one that a live graph was captured on is skipped.
_GRAPH_STREAMS: Counter = Counter()


def _stream_key(stream) -> tuple:
    return stream.device_index, stream.stream_id


def _private_stream(device: torch.device):
    """A stream of ``device`` that no live graph of this process was captured on."""
    tries = 0
    for priority in (0, -1):  # torch's pools: normal, then high priority
        for _ in range(64):
            stream = torch.cuda.Stream(device=device, priority=priority)
            tries += 1
            if _GRAPH_STREAMS[_stream_key(stream)] <= 0:
                return stream
    raise RuntimeError(f"no CUDA stream free of live graphs after {tries} tries")


def _abandon_capture(graph, device: torch.device, pool) -> None:
    """End a capture whose body raised: the capture must end on its stream, and the
    allocator must stop sending this thread's allocations to the graph's pool."""
    try:
        graph.capture_end()  # raises when the capture was invalidated (the usual case)
    except RuntimeError as exc:
        log.debug("ending the failed capture: %s", exc)
        _give_back_pool(device, pool)
    else:
        graph.reset()  # a complete graph of a failed step: drop it (and its pool)


def _give_back_pool(device: torch.device, pool) -> None:
    """What ``capture_end`` does after a successful capture and skips when it raises:
    the allocator stops allocating to ``pool``, which is then released."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    for name in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
        try:
            getattr(torch._C, name)(index, pool)
        except (RuntimeError, AttributeError) as exc:  # already done by capture_end, or an older torch
            log.debug("%s: %s", name, exc)
