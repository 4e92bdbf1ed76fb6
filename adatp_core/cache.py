"""Where a layer's past is held: the one home for every cache the pack uses.

Which tokens a layer remembers is decided here and nowhere else:
- pruning at layer K: layers < K hold the full prompt, layers >= K only the kept
  tokens, so each layer has its own length;
- linear-attention layers (Qwen3.5) will hold a fixed-size state, not keys/values;
- static decoding holds fixed-capacity buffers that CUDA graphs write into;
- batched decoding will hold B rows of different lengths, with a mask per row;
- the video prefix cache will hold the question-independent part of a prefill,
  frozen: copied into a new cache, never written.

The kinds and forms here:
- ``KVCache``: attention keys/values per layer, growing, batch 1. ``past`` is copied
  in and never written, so one prefilled state (a frozen prefix) feeds many answers.
- ``StaticKVCache``: the same per-layer keys/values in fixed-capacity buffers with
  a device-side step counter, for static decoding and its CUDA graphs.

Both implement ``update(key, value, layer_idx)``, the method transformers'
attention modules call. Shapes: key/value [B, Hkv, S, d].
"""

from __future__ import annotations

import torch


class KVCache:
    """Key/value buffers for one generation, one per decoder layer.

    Layers may hold different lengths: after pruning at layer K, layers < K keep
    the full prompt and layers >= K only the kept tokens. Buffers are allocated
    once with room for the whole generation and written in place, so decoding
    does not re-copy the cache at every token. Implements the ``update`` method
    that transformers' attention modules call.

    past: per-layer (key [B, Hkv, S, d], value [B, Hkv, S, d]) to start from;
        they are copied, never modified, so one state can feed many generations.
    reserve: extra positions to allocate beyond each layer's first fill.
    """

    def __init__(self, num_layers: int, past=(), reserve: int = 0):
        self.reserve = int(reserve)
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self._lengths = [0] * num_layers
        for i, (k, v) in enumerate(past):
            self.update(k, v, i)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        n = key_states.shape[-2]
        length = self._lengths[layer_idx]
        buf_k = self._keys[layer_idx]
        if buf_k is None or length + n > buf_k.shape[-2]:
            capacity = length + n + self.reserve
            new_k = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
            new_v = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]))
            if length:
                new_k[..., :length, :] = buf_k[..., :length, :]
                new_v[..., :length, :] = self._values[layer_idx][..., :length, :]
            self._keys[layer_idx], self._values[layer_idx] = new_k, new_v
        self._keys[layer_idx][..., length:length + n, :] = key_states
        self._values[layer_idx][..., length:length + n, :] = value_states
        self._lengths[layer_idx] = length + n
        return self.layer(layer_idx)

    def layer(self, layer_idx: int):
        """(key, value) views of one layer's filled part."""
        n = self._lengths[layer_idx]
        return self._keys[layer_idx][..., :n, :], self._values[layer_idx][..., :n, :]

    def lengths(self) -> tuple[int, ...]:
        return tuple(self._lengths)

    def buffers(self, layer_idx: int):
        """(key, value) whole buffers of one layer, filled part first, then the reserve."""
        return self._keys[layer_idx], self._values[layer_idx]

    def export(self, num_layers: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """(key, value) of layers [0, num_layers), for storing in a state.

        Views, not copies: export only from a cache that is then dropped.
        """
        return tuple(self.layer(i) for i in range(num_layers))


MIN_CAPACITY = 256


def capacity_bucket(needed: int, minimum: int = MIN_CAPACITY) -> int:
    """The smallest power of two >= max(needed, minimum)."""
    return 1 << (max(int(needed), minimum) - 1).bit_length()


class StaticKVCache:
    """Fixed-capacity per-layer key/value buffers, refilled for every answer.

    shapes: per layer (Hkv, d); capacities: per layer, positions per buffer.
    ``load`` copies a prefilled ``KVCache`` in; ``update`` is what transformers'
    attention calls during a step.
    """

    def __init__(self, shapes, capacities, dtype: torch.dtype, device: torch.device):
        # Zeros, not empty: a masked slot must be finite. The mask adds -inf to its score, but
        # NaN + -inf is NaN, and a 0 probability times a NaN value is NaN. ``load`` zeroes them again.
        self.keys = [torch.zeros((1, h, c, d), dtype=dtype, device=device) for (h, d), c in zip(shapes, capacities)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.capacities = tuple(capacities)
        self.base: list[int] = [0] * len(self.keys)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self._base = torch.zeros(len(self.keys), dtype=torch.long, device=device)
        self._arange = [torch.arange(c, device=device) for c in capacities]

    def load(self, cache: KVCache) -> None:
        """Copy the prefilled ``cache`` in (each layer's filled part) and zero the rest:
        an earlier answer's slots may hold a non-finite value (an fp16 overflow), which
        the mask cannot hide (see ``__init__``) and would poison every later answer."""
        lengths = cache.lengths()
        for i, n in enumerate(lengths):
            if n > self.capacities[i]:
                raise ValueError(f"layer {i} holds {n} positions, more than its capacity {self.capacities[i]}")
            k, v = cache.layer(i)
            self.keys[i][..., :n, :].copy_(k)
            self.values[i][..., :n, :].copy_(v)
            self.keys[i][..., n:, :].zero_()
            self.values[i][..., n:, :].zero_()
        self.base = list(lengths)
        self._base.copy_(torch.tensor(lengths, dtype=torch.long), non_blocking=True)
        self.step.zero_()

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        index = self._base[layer_idx:layer_idx + 1] + self.step
        self.keys[layer_idx].index_copy_(2, index, key_states)
        self.values[layer_idx].index_copy_(2, index, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def masks(self) -> list[torch.Tensor]:
        """Per layer, [1, 1, 1, capacity] bool: the positions filled after this step's write."""
        return [(ar <= self._base[i] + self.step)[None, None, None, :] for i, ar in enumerate(self._arange)]

    def lengths(self, steps_done: int) -> tuple[int, ...]:
        return tuple(b + steps_done for b in self.base)
