"""Static decoding: every decode step has the same shapes, so on CUDA the whole
step (embedding, all layers, head) is captured once as a CUDA graph and replayed
per token, removing the per-kernel launch cost that dominates decoding at batch 1.

Pruning leaves layers < K with the full prompt and layers >= K with the kept
tokens only. Each layer keeps its own buffer and its own valid length; a step
writes the new key/value at ``base_l + step`` (a device-side index) and attends
over the whole buffer with a per-layer mask of the filled positions. No token
that the spec keeps is dropped; the chosen tokens equal the default mode's (a
test checks).

Buffers and graphs outlive one answer. A layer's capacity is its prompt length
plus the new tokens rounded up to a power of two (a bucket), so the next question
about a similar video lands in the same bucket: its prefilled cache is copied into
the same buffers and the same graph is replayed, with no new capture. They are kept
per loaded model (``StaticDecoders``, held by ``VideoLLM``), a few buckets at most,
and dropped when the model's weights move (offload) or the model is freed.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import Counter, OrderedDict

import torch

from .hf.cache import KVCache, StaticKVCache, capacity_bucket, linear_states_kept
from .prefix_cache import weights_fingerprint
from .memory import is_out_of_memory
from .timing import synchronize

log = logging.getLogger(__name__)

MAX_BUCKETS = 2  # buckets kept per model: each holds a whole KV cache

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


class StaticDecoder:
    """One decode step with fixed shapes over a ``StaticKVCache``; a CUDA graph of
    it on CUDA, captured once (``capture``) and replayed for every token of every
    answer that uses this decoder."""

    def __init__(self, adapter, cache: StaticKVCache, position_shape: tuple[int, ...], position_dtype=torch.long,
                 use_graph: bool | None = None):
        self.adapter = adapter
        self.cache = cache
        dev = adapter.device
        self.token = torch.zeros((1, 1), dtype=torch.long, device=dev)
        self.position = torch.zeros((*position_shape, 1), dtype=position_dtype, device=dev)
        self.graph = None
        self.out = None
        self.stream = None  # this graph's own capture stream (see capture_graph)
        self.capture_seconds = 0.0
        if use_graph is None:
            blocker = graph_blocker(adapter) if dev.type == "cuda" else "not on CUDA"
            if blocker is not None and dev.type == "cuda":
                log.info("static decoding without a CUDA graph: %s", blocker)
            use_graph = blocker is None
            self.graph_note = "none: " + blocker if blocker is not None else "not captured yet"
        else:
            self.graph_note = "not captured yet" if use_graph else "none"
        self.use_graph = use_graph

    def _step(self) -> torch.Tensor:
        hidden = self.adapter.embed_tokens(self.token)
        hidden = self.adapter.run_layers(hidden, self.position, self.cache, 0, self.adapter.num_layers,
                                         masks=self.cache.masks())
        return self.adapter.logits(hidden)[-1]

    def capture(self) -> float:
        """Capture the step as a CUDA graph if not done yet. Returns the seconds it took (0 if none).

        The warm-up step writes one slot (``base + step``) that the first real
        step overwrites before anything reads it; linear-attention states, which a
        step advances, are put back after it (``cache.linear_states_kept``). If capturing fails (a kernel that
        cannot be captured, a driver that refuses), the thread's stream and the
        allocator are put back (``capture_graph``) and this decoder runs its
        fixed-shape steps without a graph from then on: slower, never wrong. Running
        out of memory while capturing is raised (generate_answer turns it into the
        pack's out-of-memory error and drops every kept buffer), not hidden.
        """
        if self.graph is not None:
            self.graph_note = "reused"
        if not self.use_graph or self.graph is not None:
            return 0.0
        dev = self.adapter.device
        synchronize(dev)
        start = time.perf_counter()
        try:
            with linear_states_kept(self.cache):  # the warm-up must not advance them
                self.graph, self.out, self.stream = capture_graph(self._step, dev)
            self.graph_note = "captured"
        except RuntimeError as exc:
            self.use_graph, self.graph, self.out = False, None, None
            if is_out_of_memory(exc):
                self.graph_note = "failed: out of memory"
                raise
            log.warning("CUDA graph capture failed (%s); decoding with fixed shapes but without a graph", exc)
            first_line = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
            self.graph_note = f"failed: {first_line}"
        synchronize(dev)
        self.capture_seconds = time.perf_counter() - start
        return self.capture_seconds

    def __call__(self, token: int, position: torch.Tensor, step: int) -> torch.Tensor:
        """Feed ``token`` at ``position`` as decode step ``step``; returns logits [V] float32
        (on CUDA the graph's output buffer: clone it to keep it past the next step)."""
        self.token.fill_(token)
        self.position.copy_(position)
        self.cache.step.fill_(step)
        if not self.use_graph:
            return self._step()
        self.capture()
        if self.graph is None:  # the capture failed just now
            return self._step()
        self.graph.replay()
        return self.out


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


def _weights_fingerprint(adapter) -> tuple:
    """Where the weights are: a captured graph reads them at these addresses (prefix_cache.py)."""
    return weights_fingerprint(adapter.model)


class StaticDecoders:
    """The static decoders of one loaded model, one per capacity bucket, most
    recently used last. At most ``max_buckets`` are kept (each holds a whole KV
    cache). Held by the model's ``VideoLLM``, so it goes when the model goes."""

    def __init__(self, max_buckets: int = MAX_BUCKETS):
        self.max_buckets = max_buckets
        self._decoders: OrderedDict = OrderedDict()
        self._fingerprint = None

    def __len__(self) -> int:
        return len(self._decoders)

    def clear(self) -> None:
        """Drop every buffer and graph (the weights moved, or memory is wanted back)."""
        self._decoders.clear()
        self._fingerprint = None

    def decoder(self, adapter, cache: KVCache, max_new_tokens: int, position_ids: torch.Tensor) -> StaticDecoder:
        """A decoder whose buffers hold ``cache`` (copied in) with room for
        ``max_new_tokens`` more positions per layer; reused when a bucket fits."""
        fingerprint = _weights_fingerprint(adapter)
        if fingerprint != self._fingerprint:
            self.clear()
            self._fingerprint = fingerprint
        layouts = tuple(cache.layout(i) for i in range(len(cache.lengths())))
        capacities = tuple(0 if layout[0] == "linear" else capacity_bucket(n + max_new_tokens)
                           for layout, n in zip(layouts, cache.lengths()))
        key = (layouts, capacities, tuple(position_ids.shape[:-1]), position_ids.dtype)
        decoder = self._decoders.pop(key, None)
        if decoder is None:
            while len(self._decoders) >= self.max_buckets:
                self._decoders.popitem(last=False)  # least recently used
            decoder = StaticDecoder(adapter, StaticKVCache(layouts, capacities, adapter.device),
                                    tuple(position_ids.shape[:-1]), position_ids.dtype)
        self._decoders[key] = decoder
        decoder.cache.load(cache)
        return decoder
