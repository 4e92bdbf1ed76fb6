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
from collections import OrderedDict

import torch

from .cache import KVCache, StaticKVCache, capacity_bucket, weights_fingerprint
from .timing import synchronize

log = logging.getLogger(__name__)

MAX_BUCKETS = 2  # buckets kept per model: each holds a whole KV cache


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
        self.use_graph = dev.type == "cuda" if use_graph is None else use_graph
        self.graph = None
        self.out = None
        self.capture_seconds = 0.0

    def _step(self) -> torch.Tensor:
        hidden = self.adapter.embed_tokens(self.token)
        hidden = self.adapter.run_layers(hidden, self.position, self.cache, 0, self.adapter.num_layers,
                                         masks=self.cache.masks())
        return self.adapter.logits(hidden)[-1]

    def capture(self) -> float:
        """Capture the step as a CUDA graph if not done yet. Returns the seconds it took (0 if none).

        The warm-up step writes one slot (``base + step``) that the first real
        step overwrites before anything reads it. If capturing fails (a kernel that
        cannot be captured, a driver that refuses), this decoder runs its fixed-shape
        steps without a graph from then on: slower, never wrong.
        """
        if not self.use_graph or self.graph is not None:
            return 0.0
        dev = self.adapter.device
        synchronize(dev)
        start = time.perf_counter()
        try:
            self.graph, self.out = self._capture_graph(dev)
        except RuntimeError as exc:
            log.warning("CUDA graph capture failed (%s); decoding with fixed shapes but without a graph", exc)
            self.use_graph, self.graph, self.out = False, None, None
        synchronize(dev)
        self.capture_seconds = time.perf_counter() - start
        return self.capture_seconds

    def _capture_graph(self, dev):
        """(graph, its output buffer) of one step, captured on ``dev``."""
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up outside the graph (allocations, lazy inits)
            self._step()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls from other threads (ComfyUI's server asking for memory
        # figures) must not invalidate the capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self._step()
        return graph, out

    def __call__(self, token: int, position: torch.Tensor, step: int) -> torch.Tensor:
        """Feed ``token`` at ``position`` as decode step ``step``; returns logits [V] float32
        (on CUDA the graph's output buffer: clone it to keep it past the next step)."""
        self.token.fill_(token)
        self.position.copy_(position)
        self.cache.step.fill_(step)
        if not self.use_graph:
            return self._step()
        self.capture()
        self.graph.replay()
        return self.out


def _weights_fingerprint(adapter) -> tuple:
    """Where the weights are: a captured graph reads them at these addresses (cache.py)."""
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
        shapes, capacities = [], []
        for i, n in enumerate(cache.lengths()):
            k, _ = cache.layer(i)
            shapes.append((k.shape[1], k.shape[-1]))
            capacities.append(capacity_bucket(n + max_new_tokens))
        dtype = cache.layer(0)[0].dtype
        key = (tuple(shapes), tuple(capacities), dtype, tuple(position_ids.shape[:-1]), position_ids.dtype)
        decoder = self._decoders.pop(key, None)
        if decoder is None:
            while len(self._decoders) >= self.max_buckets:
                self._decoders.popitem(last=False)  # least recently used
            decoder = StaticDecoder(adapter, StaticKVCache(shapes, capacities, dtype, adapter.device),
                                    tuple(position_ids.shape[:-1]), position_ids.dtype)
        self._decoders[key] = decoder
        decoder.cache.load(cache)
        return decoder
