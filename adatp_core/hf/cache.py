"""Where a layer's past is held: the one home for every cache the pack uses.

Which tokens a layer remembers is decided here and nowhere else:
- pruning at layer K: layers < K hold the full prompt, layers >= K only the kept
  tokens, so each layer has its own length;
- linear-attention layers (Qwen3.5's Gated DeltaNet) hold a fixed-size state, not
  keys/values: the last k inputs of their causal convolution and a recurrent state
  (``LinearState``). From K on they have taken in only the kept tokens, in order;
- static decoding holds fixed-capacity buffers that CUDA graphs write into;
- batched decoding holds B rows of different lengths, with a mask per row;
- the video prefix cache holds the question-independent part of a prefill,
  frozen: copied into a new cache, never written.

The kinds and forms here:
- ``KVCache``: attention keys/values per layer, growing, batch 1. ``past`` is copied
  in and never written, so one prefilled state (a frozen prefix) feeds many answers.
- ``StaticKVCache``: the same per-layer keys/values in fixed-capacity buffers with
  a device-side step counter, for static decoding and its CUDA graphs.
- ``RowsKVCache``: the batched-rows form, for captions decoded together. Up to
  ``slots`` rows (one clip each) packed at the front of per-layer buffers
  [slots, Hkv, capacity, d]; every row has its own length per layer (layers < K
  the clip's full prompt, layers >= K its kept tokens, plus what it decoded) and
  attends through a mask of its own filled positions. ``window(a, b)`` is the
  view that one decode step over rows [a, b) writes into.
- ``FrozenPrefix``: layers < K's keys/values, the layer-K input and the encoded video
  for the positions before a question; ``PrefixStore`` keeps a few per loaded model,
  keyed by exactly what was computed, bounded in entries and bytes.

Every form implements what transformers' layers call: ``update(key, value, layer_idx)``
for attention layers (key/value [B, Hkv, S, d]), and for linear-attention layers
``get_conv_state`` / ``update_conv_state`` (conv [B, C, k]), ``get_recurrent_state`` /
``update_recurrent_state`` (recurrent [B, Hv, dk, dv]) and ``is_recording_past``. A
layer's kind is what it was filled with: nothing here branches on the model family.

``lengths()`` counts, per layer, the positions a layer has taken in: the keys/values it
holds for an attention layer, the tokens folded into its state for a linear one. So the
spec's invariants read the same on every kind: layers < K the full prompt, layers >= K
the kept tokens, plus the generated ones.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch


class LinearState(NamedTuple):
    """One linear-attention layer's past, a fixed size whatever the length.

    conv: [B, C, k] the last k inputs of the layer's causal depthwise convolution (zeros
        before the first token), C = 2 * key_dim + value_dim.
    recurrent: [B, Hv, dk, dv] the gated delta rule's state.
    length: tokens folded in (see the module docstring's ``lengths``).
    """

    conv: torch.Tensor
    recurrent: torch.Tensor
    length: int

    def layout(self) -> tuple:
        """What fixed buffers for this layer look like (shapes without B, dtypes)."""
        return ("linear", tuple(self.conv.shape[1:]), self.conv.dtype,
                tuple(self.recurrent.shape[1:]), self.recurrent.dtype)


def fold_conv(previous: torch.Tensor | None, new: torch.Tensor, kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the convolution's input, the new conv state) for ``new`` [B, C, n] after ``previous``
    [B, C, k] (None: the first tokens). The input is ``previous`` then ``new``; without a
    previous state it is ``new`` alone, left-padded with zeros to k when shorter (what
    transformers' LinearAttentionLayer returns). The state is its last k columns."""
    if previous is None:
        full = new
        if full.shape[-1] < kernel:
            full = torch.nn.functional.pad(full, (kernel - full.shape[-1], 0))
    else:
        full = torch.cat([previous.to(new.dtype), new], dim=-1)
    return full, full[..., -kernel:]


class _LinearLayers:
    """The linear-attention half of a cache form: what transformers' Gated DeltaNet layers
    call. A form gives ``_linear_views(layer_idx)`` (conv, recurrent), or None before the
    layer's first tokens, and ``_set_linear(layer_idx, conv, recurrent, tokens)``.

    Decoding one token with a state, the layer updates the conv state in place and never
    calls ``update_conv_state``; ``update_recurrent_state`` is called on every pass, so it
    counts that pass's token when ``update_conv_state`` did not."""

    def _linear_views(self, layer_idx: int):
        raise NotImplementedError

    def _set_linear(self, layer_idx: int, conv, recurrent, tokens: int) -> None:
        raise NotImplementedError

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        views = self._linear_views(layer_idx)
        return None if views is None else views[0]

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        views = self._linear_views(layer_idx)
        return None if views is None else views[1]

    def update_conv_state(self, conv_states, layer_idx: int, state_idx: int = 0, conv_kernel_size=None, **kwargs):
        views = self._linear_views(layer_idx)
        kernel = conv_kernel_size or (views[0].shape[-1] if views is not None else conv_states.shape[-1])
        full, state = fold_conv(None if views is None else views[0], conv_states, kernel)
        self._set_linear(layer_idx, state, None, conv_states.shape[-1])
        self._conv_counted = layer_idx
        return full

    def update_recurrent_state(self, recurrent_states, layer_idx: int, state_idx: int = 0, **kwargs):
        counted = getattr(self, "_conv_counted", None) == layer_idx
        self._conv_counted = None
        self._set_linear(layer_idx, None, recurrent_states, 0 if counted else 1)
        return self._linear_views(layer_idx)[1]


class KVCache(_LinearLayers):
    """Key/value buffers for one generation, one per decoder layer (and the fixed-size
    state of each linear-attention layer, ``LinearState``).

    Layers may hold different lengths: after pruning at layer K, layers < K keep
    the full prompt and layers >= K only the kept tokens. Buffers are allocated
    once with room for the whole generation and written in place, so decoding
    does not re-copy the cache at every token. Implements the ``update`` method
    that transformers' attention modules call.

    past: per-layer (key [B, Hkv, S, d], value [B, Hkv, S, d]), or a ``LinearState``, to
        start from; they are copied, never modified, so one state can feed many generations.
    reserve: extra positions to allocate beyond each layer's first fill.
    """

    def __init__(self, num_layers: int, past=(), reserve: int = 0):
        self.reserve = int(reserve)
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self._lengths = [0] * num_layers
        self._linear: dict[int, list] = {}  # layer -> [conv, recurrent], linear-attention layers only
        for i, entry in enumerate(past):
            if isinstance(entry, LinearState):
                self._linear[i] = [entry.conv.clone(), entry.recurrent.clone()]
                self._lengths[i] = entry.length
            else:
                self.update(*entry, i)

    def _linear_views(self, layer_idx: int):
        state = self._linear.get(layer_idx)
        return None if state is None or state[1] is None else state

    def _set_linear(self, layer_idx: int, conv, recurrent, tokens: int) -> None:
        state = self._linear.setdefault(layer_idx, [None, None])
        if conv is not None:
            state[0] = conv.clone()  # a view of the conv input, which is not kept
        if recurrent is not None:
            state[1] = recurrent
        self._lengths[layer_idx] += tokens

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
        """(key, value) views of one attention layer's filled part."""
        n = self._lengths[layer_idx]
        return self._keys[layer_idx][..., :n, :], self._values[layer_idx][..., :n, :]

    def entry(self, layer_idx: int):
        """One layer's past: (key, value) views of an attention layer's filled part, or
        a linear-attention layer's ``LinearState`` (its own tensors, which a decode step
        writes in place)."""
        if layer_idx in self._linear:
            conv, recurrent = self._linear[layer_idx]
            return LinearState(conv, recurrent, self._lengths[layer_idx])
        return self.layer(layer_idx)

    def layout(self, layer_idx: int) -> tuple:
        """What fixed buffers for this layer look like: ("kv", Hkv, d, dtype) or
        ``LinearState.layout``."""
        if layer_idx in self._linear:
            return self.entry(layer_idx).layout()
        k = self._keys[layer_idx]
        return ("kv", k.shape[1], k.shape[-1], k.dtype)

    def lengths(self) -> tuple[int, ...]:
        return tuple(self._lengths)

    def buffers(self, layer_idx: int):
        """(key, value) whole buffers of one layer, filled part first, then the reserve."""
        return self._keys[layer_idx], self._values[layer_idx]

    def export(self, num_layers: int) -> tuple:
        """``entry`` of layers [0, num_layers), for storing in a state.

        Views, not copies: export only from a cache that is then dropped.
        """
        return tuple(self.entry(i) for i in range(num_layers))


@contextmanager
def linear_states_kept(cache, rows: slice = slice(None), only_on_error: bool = False):
    """Put the linear-attention states of a fixed-buffer form (``StaticKVCache``,
    ``RowsKVCache``: ``cache.linear``, layer -> (conv, recurrent), rows first) back as they
    were on entry, in place (a captured graph reads these very buffers): after the block, or
    ``only_on_error`` when it raises. ``rows``: the batch rows to keep (all by default).

    Key/value slots need nothing of the sort: a step writes its token's slot, and running the
    step again writes the same slot. A linear layer folds the token into its state in place,
    so a step that runs twice would fold it twice:
    - a CUDA graph capture's warm-up step runs, then the graph replays the step (or the step
      runs without a graph after a failed capture);
    - a batched step that runs out of memory in a late layer runs again in halves, after the
      earlier layers had updated their states."""
    saved = [(conv[rows].clone(), recurrent[rows].clone()) for conv, recurrent in cache.linear.values()]

    def restore():
        for (conv, recurrent), (old_conv, old_recurrent) in zip(cache.linear.values(), saved):
            conv[rows].copy_(old_conv)
            recurrent[rows].copy_(old_recurrent)

    try:
        yield
    except BaseException:
        restore()
        raise
    if not only_on_error:
        restore()


MIN_CAPACITY = 256


def capacity_bucket(needed: int, minimum: int = MIN_CAPACITY) -> int:
    """The smallest power of two >= max(needed, minimum)."""
    return 1 << (max(int(needed), minimum) - 1).bit_length()


class StaticKVCache(_LinearLayers):
    """Fixed-capacity per-layer buffers, refilled for every answer.

    layouts: per layer, ``KVCache.layout`` of the prefilled cache: ("kv", Hkv, d, dtype)
        gets key/value buffers [1, Hkv, capacity, d]; a linear-attention layout gets its
        conv [1, C, k] and recurrent [1, Hv, dk, dv] buffers, which a step updates in place.
    capacities: per layer, positions per key/value buffer (ignored for linear layers).
    ``load`` copies a prefilled ``KVCache`` in; ``update`` is what transformers'
    attention calls during a step.
    """

    def __init__(self, layouts, capacities, device: torch.device):
        # Zeros, not empty: a masked slot must be finite. The mask adds -inf to its score, but
        # NaN + -inf is NaN, and a 0 probability times a NaN value is NaN. ``load`` zeroes them again.
        self.keys: list = [None] * len(layouts)
        self.values: list = [None] * len(layouts)
        self.linear: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, (layout, c) in enumerate(zip(layouts, capacities)):
            if layout[0] == "linear":
                _, conv_shape, conv_dtype, rec_shape, rec_dtype = layout
                self.linear[i] = (torch.zeros((1, *conv_shape), dtype=conv_dtype, device=device),
                                  torch.zeros((1, *rec_shape), dtype=rec_dtype, device=device))
            else:
                _, h, d, dtype = layout
                self.keys[i] = torch.zeros((1, h, c, d), dtype=dtype, device=device)
                self.values[i] = torch.zeros_like(self.keys[i])
        self.capacities = tuple(capacities)
        self.base: list[int] = [0] * len(layouts)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self._base = torch.zeros(len(layouts), dtype=torch.long, device=device)
        self._arange = [None if i in self.linear else torch.arange(c, device=device)
                        for i, c in enumerate(capacities)]

    def load(self, cache: KVCache) -> None:
        """Copy the prefilled ``cache`` in (each layer's filled part) and zero the rest:
        an earlier answer's slots may hold a non-finite value (an fp16 overflow), which
        the mask cannot hide (see ``__init__``) and would poison every later answer."""
        lengths = cache.lengths()
        for i, n in enumerate(lengths):
            if i in self.linear:
                state = cache.entry(i)
                self.linear[i][0].copy_(state.conv)
                self.linear[i][1].copy_(state.recurrent)
                continue
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

    def _linear_views(self, layer_idx: int):
        return self.linear[layer_idx]

    def _set_linear(self, layer_idx: int, conv, recurrent, tokens: int) -> None:
        # In place: a captured graph reads and writes these very buffers. The step counter,
        # not ``tokens``, says how far every layer has come.
        conv_buf, rec_buf = self.linear[layer_idx]
        if conv is not None:
            conv_buf.copy_(conv)
        if recurrent is not None:
            rec_buf.copy_(recurrent)

    def masks(self) -> list:
        """Per layer, [1, 1, 1, capacity] bool: the positions filled after this step's write
        (None for a linear-attention layer, which has no positions to mask)."""
        return [None if ar is None else (ar <= self._base[i] + self.step)[None, None, None, :]
                for i, ar in enumerate(self._arange)]

    def lengths(self, steps_done: int) -> tuple[int, ...]:
        return tuple(b + steps_done for b in self.base)


class RowsKVCache:
    """Rows of different clips decoded together, one row per clip (the batched-rows form).

    Layout: per attention layer l, key/value buffers [slots, Hkv_l, C_l, d_l], zero-filled
    (a masked slot must be finite); per linear-attention layer, conv [slots, C, k] and
    recurrent [slots, Hv, dk, dv] buffers (``linear``), one row's state per row. The ``rows`` clips in use sit in rows
    [0, rows); ``add`` puts a clip's prefilled ``KVCache`` in row ``rows`` and
    ``remove`` moves the last row into the freed one, so a step runs over one
    contiguous block. Row r's layer l holds ``lengths[r][l]`` positions: exactly
    the positions it would hold alone (the full prompt below K, the kept tokens
    from K, then its generated tokens), so with its mask each row computes what
    batch 1 computes.

    A decode step over rows [a, b) goes through ``window(a, b)``: its ``update``
    writes row r's new key/value at position ``lengths[r][l]`` and returns the
    buffers cut to the window's longest row; ``masks()`` gives, per layer,
    [b - a, 1, 1, n_l] bool of the positions each row may attend to (its filled
    part and this step's token). Lengths advance only when the step has run
    (``advance``): a step that fails (out of memory) can be run again.
    Capacities grow (to a power of two) when a joining clip needs more.
    """

    def __init__(self, num_layers: int, slots: int):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.num_layers = num_layers
        self.slots = int(slots)
        self.rows = 0
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.linear: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.lengths: list[list[int]] = []  # host copy, per row in use, per layer
        self._lengths: torch.Tensor | None = None  # [slots, num_layers] long, on the buffers' device

    def capacity(self, layer_idx: int) -> int:
        buf = self.keys[layer_idx]
        return 0 if buf is None else buf.shape[-2]

    def signature(self) -> tuple:
        """Where every buffer is and how large: a captured step reads these very buffers."""
        return tuple((self.capacity(i), (self.keys[i] if i not in self.linear else self.linear[i][0]).data_ptr())
                     for i in range(self.num_layers))

    def _allocate(self, layer_idx: int, like: torch.Tensor, capacity: int) -> None:
        """(Re)allocate one layer's buffers with ``capacity`` positions, keeping the rows in use."""
        shape = (self.slots, like.shape[1], capacity, like.shape[-1])
        new_k = like.new_zeros(shape)
        new_v = torch.zeros_like(new_k)
        old = self.capacity(layer_idx)
        if old:
            new_k[:self.rows, :, :old] = self.keys[layer_idx][:self.rows]
            new_v[:self.rows, :, :old] = self.values[layer_idx][:self.rows]
        self.keys[layer_idx], self.values[layer_idx] = new_k, new_v

    def add(self, cache: KVCache, room: int) -> int:
        """Put a prefilled batch-1 ``cache`` in the next free row, with ``room`` positions
        to grow by per layer; returns the row. Raises ValueError when every slot is in use."""
        if self.rows >= self.slots:
            raise ValueError(f"all {self.slots} rows are in use")
        lengths = list(cache.lengths())
        row = self.rows
        for i, n in enumerate(lengths):
            entry = cache.entry(i)
            if isinstance(entry, LinearState):
                if i not in self.linear:
                    self.linear[i] = (entry.conv.new_zeros((self.slots, *entry.conv.shape[1:])),
                                      entry.recurrent.new_zeros((self.slots, *entry.recurrent.shape[1:])))
                self.linear[i][0][row] = entry.conv[0]
                self.linear[i][1][row] = entry.recurrent[0]
                continue
            k, v = entry
            if self.capacity(i) < n + room:
                self._allocate(i, k, capacity_bucket(n + room, minimum=64))
            self.keys[i][row, :, :n] = k[0]
            self.values[i][row, :, :n] = v[0]
        if self._lengths is None:
            device = next(b for b in (*self.keys, *(c for c, _ in self.linear.values())) if b is not None).device
            self._lengths = torch.zeros((self.slots, self.num_layers), dtype=torch.long, device=device)
        self._lengths[row] = torch.tensor(lengths, dtype=torch.long)
        self.lengths.append(lengths)
        self.rows += 1
        return row

    def remove(self, row: int) -> None:
        """Free ``row``: the last row in use moves into it (its filled part only)."""
        last = self.rows - 1
        if not 0 <= row <= last:
            raise ValueError(f"row {row} is not in use ({self.rows} rows)")
        if row != last:
            for i, n in enumerate(self.lengths[last]):
                if i in self.linear:
                    for buf in self.linear[i]:
                        buf[row] = buf[last]
                    continue
                self.keys[i][row, :, :n] = self.keys[i][last, :, :n]
                self.values[i][row, :, :n] = self.values[i][last, :, :n]
            self._lengths[row] = self._lengths[last]
            self.lengths[row] = self.lengths[last]
        self.lengths.pop()
        self.rows -= 1

    def window(self, start: int, stop: int, static: bool = False) -> "RowsWindow":
        return RowsWindow(self, start, stop, static)

    def advance(self, start: int, stop: int) -> None:
        """A step over rows [start, stop) has run: each holds one more position per layer."""
        self._lengths[start:stop] += 1
        for r in range(start, stop):
            self.lengths[r] = [n + 1 for n in self.lengths[r]]


class RowsWindow(_LinearLayers):
    """One decode step's view of rows [start, stop) of a ``RowsKVCache``: what
    transformers' attention calls ``update`` on (key/value [stop - start, Hkv, 1, d]),
    and what its linear-attention layers read and update in place (rows [start, stop)
    of their conv and recurrent buffers; the step counts in ``advance``).

    static: fixed shapes for CUDA graphs. Every layer is read at its whole capacity
    (the mask hides what a row has not filled), the lengths are read on the device
    only, and the window may reach past the rows in use into free slots (a batch
    bucket): those compute on stale but finite keys and are never read back.
    """

    def __init__(self, cache: RowsKVCache, start: int, stop: int, static: bool = False):
        if not 0 <= start < stop <= (cache.slots if static else cache.rows):
            raise ValueError(f"rows [{start}, {stop}) are not in use ({cache.rows} rows)")
        self.cache, self.start, self.stop = cache, start, stop
        if static:
            self.spans = [cache.capacity(i) for i in range(cache.num_layers)]
        else:  # per layer, the window's longest row after this step's write
            rows = cache.lengths[start:stop]
            self.spans = [max(r[i] for r in rows) + 1 for i in range(cache.num_layers)]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        c, a, b = self.cache, self.start, self.stop
        index = c._lengths[a:b, layer_idx].view(-1, 1, 1, 1).expand(-1, key_states.shape[1], 1, key_states.shape[-1])
        c.keys[layer_idx][a:b].scatter_(2, index, key_states)
        c.values[layer_idx][a:b].scatter_(2, index, value_states)
        n = self.spans[layer_idx]
        return c.keys[layer_idx][a:b, :, :n], c.values[layer_idx][a:b, :, :n]

    def _linear_views(self, layer_idx: int):
        conv, recurrent = self.cache.linear[layer_idx]
        return conv[self.start:self.stop], recurrent[self.start:self.stop]

    def _set_linear(self, layer_idx: int, conv, recurrent, tokens: int) -> None:
        views = self._linear_views(layer_idx)
        for view, new in zip(views, (conv, recurrent)):
            if new is not None:
                view.copy_(new)

    def masks(self) -> list:
        """Per layer, [rows, 1, 1, n_l] bool: each row's filled positions and this step's token
        (None for a linear-attention layer)."""
        c, a, b = self.cache, self.start, self.stop
        out = []
        for i, n in enumerate(self.spans):
            if i in c.linear:
                out.append(None)
                continue
            ar = torch.arange(n, device=c._lengths.device)
            out.append((ar[None, :] <= c._lengths[a:b, i, None])[:, None, None, :])
        return out

    def advance(self) -> None:
        """The step has run: every row of the window holds one more position per layer."""
        self.cache.advance(self.start, self.stop)
