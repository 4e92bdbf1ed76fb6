"""Static decoding of one answer: the one-row static runners kept per loaded model.

Every static decode step has the same shapes, so on CUDA the whole step (embedding, all layers,
head) is captured once as a CUDA graph and replayed per token, removing the per-kernel launch cost
that dominates decoding at batch 1. The step itself, its graph and the rules for taking one are
the step runner's (steps.py): a single answer is a batch of one row.

Pruning leaves layers < K with the full prompt and layers >= K with the kept tokens only. Each
layer keeps its own buffer and its own valid length; a step writes the new key/value at the row's
length in that layer (a device-side index) and attends over the whole buffer with a mask of the
filled positions. No token that the spec keeps is dropped; the chosen tokens equal the default
mode's (a test checks).

Buffers and graphs outlive one answer. A layer's capacity is its prompt length plus the new tokens
rounded up to a power of two (a bucket), so the next question about a similar video lands in the
same bucket: its prefilled cache is copied into the same buffers and the same graph is replayed,
with no new capture. They are kept per loaded model (``StaticDecoders``, held by ``VideoLLM``), a
few buckets at most, and dropped when the model's weights move (offload) or the model is freed.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .hf.cache import KVCache, LinearLayout, RowsKVCache, capacity_bucket
from .prefix_cache import weights_fingerprint
from .steps import CaptureStatus, StepRunner

MAX_BUCKETS = 2  # buckets kept per model: each holds a whole KV cache


class StaticDecoder(StepRunner):
    """A static step runner over one row of its own (a one-slot ``RowsKVCache`` at bucketed
    capacities), kept across answers: ``load`` copies an answer's prefilled cache in; the graph
    captured for the first answer is replayed for the next ones."""

    def __init__(self, adapter, cache: RowsKVCache, position_template: torch.Tensor, use_graph: bool | None = None):
        super().__init__(adapter, cache, position_template, static=True, use_graph=use_graph)

    def load(self, cache: KVCache) -> None:
        """Copy the prefilled ``cache`` into the row (the rest of each buffer zeroed: see
        ``RowsKVCache.add``)."""
        self.cache.clear()
        self.cache.add(cache, 0)


class StaticDecoders:
    """The static decoders of one loaded model, one per capacity bucket, most
    recently used last. At most ``max_buckets`` are kept (each holds a whole KV
    cache). Held by the model's ``VideoLLM``, so it goes when the model goes."""

    def __init__(self, max_buckets: int = MAX_BUCKETS):
        self.max_buckets = max_buckets
        self._decoders: OrderedDict = OrderedDict()
        self._fingerprint = None

    @property
    def status(self) -> CaptureStatus | None:
        """The graph status of the decoder used last (None: none kept)."""
        return next(reversed(self._decoders.values())).status if self._decoders else None

    def __len__(self) -> int:
        return len(self._decoders)

    def clear(self) -> None:
        """Drop every buffer and graph (the weights moved, or memory is wanted back)."""
        self._decoders.clear()
        self._fingerprint = None

    def decoder(self, adapter, cache: KVCache, max_new_tokens: int, position_ids: torch.Tensor) -> StaticDecoder:
        """A decoder whose buffers hold ``cache`` (copied in) with room for
        ``max_new_tokens`` more positions per layer; reused when a bucket fits."""
        fingerprint = weights_fingerprint(adapter.model)  # a captured graph reads the weights there
        if fingerprint != self._fingerprint:
            self.clear()
            self._fingerprint = fingerprint
        layouts = tuple(cache.layout(i) for i in range(len(cache.lengths())))
        capacities = tuple(0 if isinstance(layout, LinearLayout) else capacity_bucket(n + max_new_tokens)
                           for layout, n in zip(layouts, cache.lengths()))
        key = (layouts, capacities, tuple(position_ids.shape[:-1]), position_ids.dtype)
        decoder = self._decoders.pop(key, None)
        if decoder is None:
            while len(self._decoders) >= self.max_buckets:
                self._decoders.popitem(last=False)  # least recently used
            decoder = StaticDecoder(adapter, RowsKVCache.allocated(layouts, capacities, adapter.device),
                                    position_ids)
        self._decoders[key] = decoder
        decoder.load(cache)
        return decoder
