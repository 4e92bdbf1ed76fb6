"""Where a layer's past is held: the one home for every cache form the pack uses, each built on
transformers' own ``Cache`` and per-layer classes.

Which tokens a layer remembers is decided here and nowhere else:
- pruning at layer K: layers < K hold the full prompt, layers >= K only the kept
  tokens, so each layer has its own length;
- linear-attention layers (Qwen3.5's Gated DeltaNet) hold a fixed-size state, not
  keys/values: the last k inputs of their causal convolution and a recurrent state
  (``LinearState``). From K on they have taken in only the kept tokens, in order;
- decoding holds rows of different lengths, with a mask per row: B clips decoded together, or
  one answer as a batch of one row; static decoding reads them at fixed capacities that CUDA
  graphs write into;
- the video prefix cache (``prefix_cache.py``) holds the question-independent part of a
  prefill, frozen: copied into a new ``KVCache`` per question, never written.

Built on transformers, not imitating it. transformers' decoder layers call methods on the cache
they are given, and it adds such calls in minor releases (5.25: ``get_recurrent_states_to_keep``
and ``increase_count``; 5.17 reads ``has_previous_state`` and ``layers[i].conv_states``). So every
form handed to a decoder layer is a ``transformers.cache_utils.Cache`` whose ``layers`` are
transformers' per-layer classes, specialised only where the pack differs:
- ``KVLayer`` is a ``DynamicLayer`` whose keys/values are views of a buffer with room to grow (no
  re-copy of the cache at every decoded token); crop, reorder, offload or reset, which replace
  ``keys``, simply make it take a new buffer at its next update;
- ``LinearLayer`` is transformers' ``LinearAttentionLayer`` unchanged (conv fold, recurrent copy,
  ``has_previous_state``, whatever a release adds) plus a host-side count of the tokens folded in
  (``lengths``), and it can hold views of the pack's buffers (a static buffer, one batch row), which
  transformers then updates in place;
- ``RowsKVLayer`` is a ``CacheLayerMixin`` of its own: transformers' ``StaticLayer`` writes every
  layer at one shared ``cumulative_length``, but after pruning each layer has its own length, and
  rows have one length per row and layer (a scatter per row, at device-side lengths, for graphs). Everything else (``get_conv_state``,
  ``has_previous_state``, ``get_recurrent_states_to_keep``, ``increase_count`` ...) is the
  ``Cache`` container's own.
``RowsKVCache`` (the rows' storage) and ``FrozenPrefix`` are never handed to transformers: their
windows and copies are. tests/test_cache_protocol.py reads the installed modeling files for every
call made on a cache and checks that each form here answers it.

The kinds and forms here:
- ``KVCache``: per layer a ``KVLayer`` or a ``LinearLayer``, growing, any batch (1 in practice).
  ``past`` is copied in and never written, so one prefilled state (a frozen prefix) feeds many answers.
- ``RowsKVCache``: the rows that decoding steps (steps.py): captions decoded together, or one
  answer in one row (its prefilled ``KVCache``'s own buffers, or a static bucket's). Up to ``slots`` rows
  (one clip each) packed at the front of per-layer buffers [slots, Hkv, capacity, d]; every row has
  its own length per layer (layers < K the clip's full prompt, layers >= K its kept tokens, plus
  what it decoded) and attends through a mask of its own filled positions. ``window(a, b)`` is the
  ``Cache`` that one decode step over rows [a, b) writes into.
- keys and values on the host (``KVCache(host=...)``, one answer's layers >= K when the device is
  short): a ``HostKVLayer`` (a ``KVLayer`` whose buffers are its home on the host) and, in a one-row
  window, a ``HostRowsKVLayer``; each runs over a copy staged on its device by ``StagedCopies`` (two
  slots, the next layer staged ahead by its ``stage``, released by its ``release``: not transformers'
  ``prefetch``/``offload``, which move a layer's own tensors), its new keys and values written to the
  copy and the home, nothing copied back.

``lengths()`` counts, per layer, the positions a layer has taken in: the keys/values it holds for
an attention layer, the tokens folded into its state for a linear one. So the spec's invariants
read the same on every kind: layers < K the full prompt, layers >= K the kept tokens, plus the
generated ones. A layer's kind comes from the model's ``layer_types`` (``KVCache``'s ``layers``)
or from what fills it (a ``LinearState`` past); nothing here branches on the model family.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, LinearAttentionLayer

from ..budget import STAGED_LAYERS
from ..memory import free_bytes, host_buffer

LINEAR_ATTENTION = "linear_attention"  # the layer kind in a text config's ``layer_types``


@dataclass(frozen=True)
class KVLayout:
    """What an attention layer's fixed buffers look like, without the rows and the capacity: keys
    and values [slots, heads, capacity, head_dim] of ``dtype``. Hashable: part of a static bucket's key."""

    heads: int
    head_dim: int
    dtype: torch.dtype

    def zeros(self, slots: int, capacity: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) buffers, zeroed (a masked slot must be finite)."""
        keys = torch.zeros((slots, self.heads, capacity, self.head_dim), dtype=self.dtype, device=device)
        return keys, torch.zeros_like(keys)


@dataclass(frozen=True)
class LinearLayout:
    """What a linear-attention layer's fixed buffers look like (a fixed size, whatever the length):
    conv [slots, *conv_shape] and recurrent [slots, *recurrent_shape] (``LinearState``'s, without B)."""

    conv_shape: tuple[int, ...]
    conv_dtype: torch.dtype
    recurrent_shape: tuple[int, ...]
    recurrent_dtype: torch.dtype

    def zeros(self, slots: int, capacity: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv, recurrent) buffers, zeroed; ``capacity`` does not apply (a fixed size)."""
        return (torch.zeros((slots, *self.conv_shape), dtype=self.conv_dtype, device=device),
                torch.zeros((slots, *self.recurrent_shape), dtype=self.recurrent_dtype, device=device))


Layout = KVLayout | LinearLayout  # one layer's (``KVCache.layout``)


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

    def layout(self) -> LinearLayout:
        """What fixed buffers for this layer look like (shapes without B, dtypes)."""
        return LinearLayout(tuple(self.conv.shape[1:]), self.conv.dtype,
                            tuple(self.recurrent.shape[1:]), self.recurrent.dtype)


# ----- per-layer forms -------------------------------------------------------------------------


class KVLayer(DynamicLayer):
    """transformers' ``DynamicLayer`` whose ``keys``/``values`` [B, Hkv, S, d] are the filled part of
    buffers allocated with ``reserve`` extra positions, written in place: decoding does not re-copy
    the cache at every token, as ``DynamicLayer``'s concatenation does.

    past: (key, value) to start from, copied (never written).
    """

    def __init__(self, reserve: int = 0, past=None):
        super().__init__()
        self.reserve = int(reserve)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        if past is not None:
            self.update(*past)

    def _writable(self, room: int) -> bool:
        """Whether ``keys`` still starts our buffer with ``room`` positions free after it. A crop
        keeps it (a shorter view of the same buffer); a reorder, offload or reset replaces it."""
        if self._buffers is None or not self.is_initialized or self.keys is None:
            return False
        buf = self._buffers[0]
        return (self.keys.data_ptr() == buf.data_ptr() and self.keys.device == buf.device
                and self.keys.shape[:-2] == buf.shape[:-2] and self.keys.shape[-2] + room <= buf.shape[-2])

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        length = self.get_seq_length()
        if not self._writable(n):
            capacity = length + n + self.reserve
            new_k = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
            new_v = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]))
            if length:
                new_k[..., :length, :] = self.keys
                new_v[..., :length, :] = self.values
            self._buffers = (new_k, new_v)
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
        buf_k, buf_v = self._buffers
        buf_k[..., length:length + n, :] = key_states
        buf_v[..., length:length + n, :] = value_states
        self.keys, self.values = buf_k[..., :length + n, :], buf_v[..., :length + n, :]
        return self.keys, self.values

    def layout(self) -> KVLayout:
        return KVLayout(self.keys.shape[1], self.keys.shape[-1], self.keys.dtype)


class LinearLayer(LinearAttentionLayer):
    """transformers' ``LinearAttentionLayer`` (a conv state [B, C, k] and a recurrent state
    [B, Hv, dk, dv]) plus ``length``, the tokens folded in, counted on the host.

    The count: a prefill calls ``update_conv_state`` with its n tokens. A one-token decode step
    updates the conv state in place, then calls ``increase_count`` (5.25) or nothing (5.17-5.24),
    then ``update_recurrent_state``, which counts the token when neither call did.

    past: a ``LinearState`` to start from, copied (never written).
    """

    def __init__(self, past: LinearState | None = None):
        super().__init__()
        self.length = 0
        self._counted = False
        if past is not None:
            self.hold(past.conv.clone(), past.recurrent.clone(), past.length)

    def hold(self, conv: torch.Tensor, recurrent: torch.Tensor, length: int) -> "LinearLayer":
        """Take ``conv`` and ``recurrent`` themselves (no copy) as the layer's states after ``length``
        tokens: transformers then reads them and updates them in place (a static buffer, the rows
        of a batch). Sets what ``lazy_initialization`` and a first update would have set."""
        self.conv_states[0], self.recurrent_states[0] = conv, recurrent
        self.is_conv_states_initialized[0] = self.is_recurrent_states_initialized[0] = True
        self.has_previous_state[0] = True
        self.conv_kernel_size[0] = conv.shape[-1]
        self.device, self.dtype = conv.device, conv.dtype
        self.set_length(length)
        return self

    def set_length(self, length: int) -> None:
        """The layer holds ``length`` tokens. 5.25 keeps a count of its own (``cumulative_length_linear``,
        which its update_conv_state and increase_count advance as ours does): set it too, in place (a
        new tensor on the device would be a host copy inside a graph capture)."""
        self.length = int(length)
        count = getattr(self, "cumulative_length_linear", None)
        if isinstance(count, torch.Tensor):
            count.fill_(self.length)

    def update_conv_state(self, conv_states, state_idx: int = 0, *args, **kwargs):
        if state_idx == 0:
            self.length += conv_states.shape[-1]
            self._counted = True
        return super().update_conv_state(conv_states, state_idx, *args, **kwargs)

    def increase_count(self, state_idx: int = 0, *args, **kwargs):
        if state_idx == 0:
            self.length += 1
            self._counted = True
        parent = getattr(super(), "increase_count", None)  # 5.25 on: transformers' own count too
        if parent is not None:
            parent(state_idx, *args, **kwargs)

    def update_recurrent_state(self, recurrent_states, state_idx: int = 0, *args, **kwargs):
        if state_idx == 0:
            if not self._counted:
                self.length += 1
            self._counted = False
        return super().update_recurrent_state(recurrent_states, state_idx, *args, **kwargs)

    def get_seq_length(self) -> int:
        return self.length

    def state(self) -> LinearState:
        """The layer's past: its own tensors (a decode step writes them in place)."""
        return LinearState(self.conv_states[0], self.recurrent_states[0], self.length)

    def layout(self) -> LinearLayout:
        return self.state().layout()


class _FixedLayer(CacheLayerMixin):
    """A key/value layer over buffers that the pack allocated (nothing to initialise lazily);
    keys/values: the whole buffers, which the mask cuts to what each row holds."""

    is_compileable = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.device = keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2], 0

    def get_max_length(self) -> int:
        return self.keys.shape[-2]


class RowsKVLayer(_FixedLayer):
    """One attention layer of a ``RowsWindow``: rows [a, b) of the ``RowsKVCache``'s buffers; a
    step writes row r's key/value at that row's own length, and returns the buffers cut to the
    window's span (its longest row after the write, or the whole capacity when static)."""

    def __init__(self, window: "RowsWindow", layer_idx: int):
        c, a, b = window.cache, window.start, window.stop
        super().__init__(c.keys[layer_idx][a:b], c.values[layer_idx][a:b])
        self.window, self.layer_idx = window, layer_idx

    def update(self, key_states, value_states, *args, **kwargs):
        w, i = self.window, self.layer_idx
        lengths = w.lengths_on(self.keys.device)[:, i]
        index = lengths.view(-1, 1, 1, 1).expand(-1, key_states.shape[1], 1, key_states.shape[-1])
        self.keys.scatter_(2, index, key_states)
        self.values.scatter_(2, index, value_states)
        n = w.spans[i]
        return self.keys[:, :, :n], self.values[:, :, :n]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.window.spans[self.layer_idx], 0

    def get_seq_length(self) -> int:
        """The window's longest row before this step."""
        return self.window.longest[self.layer_idx]


# ----- keys and values whose home is the host --------------------------------------------------


def _copy_positions(dst: torch.Tensor, src: torch.Tensor, a: int, b: int) -> None:
    """dst[..., a:b, :] = src[..., a:b, :] for buffers [B, H, capacity, d]. Between the host and a CUDA
    device, one copy per (row, head): each is then contiguous, so a pinned host buffer moves
    asynchronously (torch would gather a strided slice through a pageable temporary, synchronously)."""
    if b <= a:
        return
    if dst.device == src.device:
        dst[..., a:b, :].copy_(src[..., a:b, :])
        return
    for r in range(dst.shape[0]):
        for h in range(dst.shape[1]):
            dst[r, h, a:b].copy_(src[r, h, a:b], non_blocking=True)


class _Slot:
    """One staging slot: device buffers [B, H, capacity, d] for keys and values, and the layer whose
    first ``length`` positions they hold (None: none yet)."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.layer: int | None = None
        self.length = 0
        self.ready = None  # CUDA: the event after which the staged copy is complete
        self.used = 0  # when it was last staged or claimed (the least recent goes first)

    def fits(self, home: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> bool:
        return self.keys is not None and all(
            buf.device == device and buf.dtype == h.dtype and buf.shape[:2] == h.shape[:2]
            and buf.shape[-1] == h.shape[-1] and buf.shape[-2] >= h.shape[-2]
            for buf, h in ((self.keys, home[0]), (self.values, home[1])))


class StagedCopies:
    """The device copies of host-homed attention layers (``HostKVLayer``, ``HostRowsKVLayer``): two
    slots of device buffers, so at most two layers are staged at once: the one that runs and the
    next one, prefetched. A layer's staged copy is released after it ran; nothing is copied back
    (its new keys and values were written to its home as they came, so the copy stays as good as
    the home: a layer claimed again before its slot is taken, as with one or two homed layers, is
    not copied again).

    homed: the host-homed layers in the order they run (``next_after`` circles back to the first:
    the next step or chunk starts there). On CUDA a prefetch copies on a side stream, after what the
    default stream has queued (the slot's last reader, the home's last writes), and the layer's own
    update waits for it; elsewhere the copies are plain. Figures: ``most_alive`` (staged layers at
    once, at most 2), ``staged_bytes`` (host to device), ``stagings``.
    """

    SLOTS = STAGED_LAYERS  # budget.continuation_parts counts these

    def __init__(self, homed):
        self.homed = tuple(homed)
        self._slots = [_Slot() for _ in range(self.SLOTS)]
        self._running: _Slot | None = None
        self._streams: dict = {}
        self._clock = 0
        self.most_alive = 0
        self.staged_bytes = 0
        self.stagings = 0

    def next_after(self, layer_idx: int) -> int | None:
        """The host-homed layer that runs after ``layer_idx`` (None: no other)."""
        if len(self.homed) < 2:
            return None
        return self.homed[(self.homed.index(layer_idx) + 1) % len(self.homed)]

    def alive(self) -> int:
        return sum(slot.layer is not None for slot in self._slots)

    def _holding(self, layer_idx: int) -> _Slot | None:
        return next((slot for slot in self._slots if slot.layer == layer_idx), None)

    def stage(self, layer_idx: int, home: tuple[torch.Tensor, torch.Tensor], length: int,
              device: torch.device) -> _Slot:
        """Copy positions [0, length) of ``home`` into a slot on ``device`` (a prefetch on CUDA: on
        the side stream). A slot already holding them is kept; the slot of the running layer is never
        taken."""
        slot = self._holding(layer_idx)
        if slot is not None and slot.length == length and slot.fits(home, device):
            return slot
        if slot is None:  # the least recently used slot that is not running
            slot = min((s for s in self._slots if s is not self._running), key=lambda s: s.used)
        slot.layer, slot.length, slot.ready = layer_idx, length, None
        self._clock += 1
        slot.used = self._clock
        if not slot.fits(home, device):
            slot.keys = slot.values = None  # the old buffers go before the new ones come
            slot.keys = torch.empty(home[0].shape, dtype=home[0].dtype, device=device)
            slot.values = torch.empty(home[1].shape, dtype=home[1].dtype, device=device)
        self.stagings += 1
        self.staged_bytes += length * sum(h[..., :1, :].numel() * h.element_size() for h in home)
        self.most_alive = max(self.most_alive, self.alive())
        if device.type == "cuda" and length:
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device=device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for buf, h in zip((slot.keys, slot.values), home):
                    _copy_positions(buf, h, 0, length)
                slot.ready = torch.cuda.Event()
                slot.ready.record(stream)
            for buf in (slot.keys, slot.values):  # the allocator must not reuse them under the side stream
                buf.record_stream(stream)
        else:
            for buf, h in zip((slot.keys, slot.values), home):
                _copy_positions(buf, h, 0, length)
        return slot

    def claim(self, layer_idx: int, home: tuple[torch.Tensor, torch.Tensor], length: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's staged copy (device buffers whose positions [0, length) hold its home's), for
        its update: the prefetched one, waited for, or staged now. The layer is running until
        ``release``."""
        slot = self.stage(layer_idx, home, length, device)
        if slot.ready is not None:
            torch.cuda.current_stream(device).wait_event(slot.ready)
            slot.ready = None
        self._running = slot
        self._clock += 1
        slot.used = self._clock
        return slot.keys, slot.values

    def wrote(self, layer_idx: int, length: int) -> None:
        """The running layer's update wrote its staged copy (and its home) up to ``length``."""
        slot = self._holding(layer_idx)
        if slot is not None:
            slot.length = length

    def release(self, layer_idx: int) -> None:
        """The layer ran: its slot may be taken by the next layer (its buffers are reused, nothing is
        copied back). On CUDA the next copy into it waits for what the default stream queued."""
        if self._running is not None and self._running.layer == layer_idx:
            self._running = None


def _write_staged(staging: StagedCopies, layer_idx: int, home: tuple[torch.Tensor, torch.Tensor], length: int,
                  key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A host-homed layer's update: its staged copy (positions [0, length)) with this call's keys and
    values written after them, for this call's attention, and the same written to the home (a few
    positions when decoding). Returns the staged keys and values [B, H, length + n, d]."""
    n = key_states.shape[-2]
    staged = staging.claim(layer_idx, home, length, key_states.device)
    for buf, new, h in zip(staged, (key_states, value_states), home):
        buf[..., length:length + n, :] = new
        _copy_positions(h, buf, length, length + n)
    staging.wrote(layer_idx, length + n)
    return staged[0][..., :length + n, :], staged[1][..., :length + n, :]


class HostKVLayer(KVLayer):
    """A ``KVLayer`` whose home is the host: buffers [B, H, capacity, d] in host memory (pinned when
    the layer runs on CUDA), with room for the answer (``reserve``). ``keys``/``values`` are views of
    the home's filled part. An update runs over a staged copy on the layer's device (``StagedCopies``:
    prefetched a layer ahead, at most two alive), writes the new positions to both, and returns the
    staged copy for the attention; after the layer (``release``) the copy is released, not copied back.

    ``stage`` and ``release`` are this module's own (``_StagesHostLayers`` calls them), not transformers'
    per-layer ``prefetch``/``offload``, which move a layer's own tensors between the host and the device
    (Cache(offloading=True)): here the home never moves, and what comes and goes is a copy in a slot.
    """

    def __init__(self, staging: StagedCopies, layer_idx: int, reserve: int = 0, past=None):
        self.staging, self.layer_idx = staging, layer_idx
        super().__init__(reserve, past)
        staging.release(layer_idx)  # a past written in is not a running layer

    def _writable(self, room: int) -> bool:
        return self._buffers is not None and self.get_seq_length() + room <= self._buffers[0].shape[-2]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)  # device: where the layer runs
        n, length = key_states.shape[-2], self.get_seq_length()
        if not self._writable(n):
            pin = key_states.device.type == "cuda"
            capacity = length + n + self.reserve
            old = self._buffers
            self._buffers = tuple(host_buffer((*t.shape[:-2], capacity, t.shape[-1]), t.dtype, pin)
                                  for t in (key_states, value_states))
            if old is not None:  # read on the host: the device's writes into it must have landed
                if key_states.device.type == "cuda":
                    torch.cuda.current_stream(key_states.device).synchronize()
                for new, h in zip(self._buffers, old):
                    new[..., :length, :] = h[..., :length, :]
        out = _write_staged(self.staging, self.layer_idx, self._buffers, length, key_states, value_states)
        self.keys, self.values = (b[..., :length + n, :] for b in self._buffers)
        return out

    def stage(self):
        """Copy the home's filled part to a slot on the layer's device ahead of its turn (a side stream on CUDA)."""
        if self._buffers is not None:
            self.staging.stage(self.layer_idx, self._buffers, self.get_seq_length(), self.device)

    def release(self):
        """The layer ran: its slot may be taken (nothing is copied back: the home was written as it ran)."""
        self.staging.release(self.layer_idx)


class HostRowsKVLayer(RowsKVLayer):
    """One host-homed attention layer of a one-row ``RowsWindow`` (one answer's default steps): the
    row's home is the ``RowsKVCache``'s buffers of that layer (a ``HostKVLayer``'s, taken by
    ``RowsKVCache.holding``); a step runs over the staged copy, as ``HostKVLayer.update`` does."""

    def __init__(self, window: "RowsWindow", layer_idx: int, staging: StagedCopies, device: torch.device):
        super().__init__(window, layer_idx)
        self.staging, self.device = staging, device
        self.filled = window.longest[layer_idx]  # positions the home holds (this step's once written)

    def update(self, key_states, value_states, *args, **kwargs):
        out = _write_staged(self.staging, self.layer_idx, (self.keys, self.values), self.filled,
                            key_states, value_states)
        self.filled += key_states.shape[-2]
        return out

    def stage(self):
        self.staging.stage(self.layer_idx, (self.keys, self.values), self.filled, self.device)

    def release(self):
        self.staging.release(self.layer_idx)


class _StagesHostLayers:
    """For a ``Cache`` with host-homed layers (``staging``: their ``StagedCopies``, or None): every
    update is transformers' ``Cache.update`` (the layer's own update: a host-homed layer's runs on its
    staged copy); after a host-homed layer's, the next such layer is staged (``stage``, on the side
    stream on CUDA) and this one's copy released (``release``): at most two alive."""

    staging: StagedCopies | None = None

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        staging = self.staging
        if staging is not None and layer_idx in staging.homed:
            following = staging.next_after(layer_idx)
            if following is not None:
                self.layers[following].stage()
            self.layers[layer_idx].release()
        return out


# ----- the forms --------------------------------------------------------------------------------


class KVCache(_StagesHostLayers, Cache):
    """The past of one generation, one transformers layer object per decoder layer: a ``KVLayer``
    for an attention layer, a ``LinearLayer`` for a linear-attention one.

    Layers may hold different lengths: after pruning at layer K, layers < K keep
    the full prompt and layers >= K only the kept tokens. Buffers are allocated
    once with room for the whole generation and written in place.

    layers: the model's layer kinds (``VideoLLMAdapter.layer_kinds``), or a number of
        attention layers.
    past: per layer, (key [B, Hkv, S, d], value [B, Hkv, S, d]), or a ``LinearState``, to
        start from; they are copied, never modified, so one state can feed many generations.
    reserve: extra positions to allocate beyond each attention layer's first fill: one number
        for every layer, or one per layer (a chunked prefill fills a layer in several calls, and
        reserves the rest of the prompt at the first).
    host: attention layers whose keys and values live on the host (``HostKVLayer``, staged on the
        device two layers at a time by ``staging``, a ``StagedCopies``); linear-attention layers never.
    """

    def __init__(self, layers, past=(), reserve=0, host=()):
        kinds = ("full_attention",) * layers if isinstance(layers, int) else tuple(layers)
        past = tuple(past)
        if len(past) > len(kinds):
            raise ValueError(f"{len(past)} layers of past for a cache of {len(kinds)} layers")
        reserves = (int(reserve),) * len(kinds) if isinstance(reserve, int) else tuple(int(r) for r in reserve)
        if len(reserves) != len(kinds):
            raise ValueError(f"{len(reserves)} reserves for a cache of {len(kinds)} layers")
        host = tuple(sorted(set(host)))
        if any(not 0 <= i < len(kinds) or kinds[i] == LINEAR_ATTENTION or isinstance(past[i] if i < len(past)
               else None, LinearState) for i in host):
            raise ValueError(f"host-homed layers {host} must be attention layers of these {len(kinds)}")
        self.staging = StagedCopies(host) if host else None
        made = []
        for i, kind in enumerate(kinds):
            entry = past[i] if i < len(past) else None
            if isinstance(entry, LinearState) or (entry is None and kind == LINEAR_ATTENTION):
                made.append(LinearLayer(entry))
            elif i in host:
                made.append(HostKVLayer(self.staging, i, reserves[i], entry))
            else:
                made.append(KVLayer(reserves[i], entry))
        super().__init__(layers=made)
        self.reserve = max(reserves, default=0)

    def layer(self, layer_idx: int):
        """(key, value) views of one attention layer's filled part."""
        layer = self.layers[layer_idx]
        return layer.keys, layer.values

    def entry(self, layer_idx: int):
        """One layer's past: (key, value) views of an attention layer's filled part, or
        a linear-attention layer's ``LinearState`` (its own tensors, which a decode step
        writes in place)."""
        layer = self.layers[layer_idx]
        return layer.state() if isinstance(layer, LinearLayer) else (layer.keys, layer.values)

    def layout(self, layer_idx: int) -> Layout:
        """What fixed buffers for this layer look like: a ``KVLayout`` or a ``LinearLayout``."""
        return self.layers[layer_idx].layout()

    def lengths(self) -> tuple[int, ...]:
        return tuple(int(layer.get_seq_length()) for layer in self.layers)

    def export(self, num_layers: int) -> tuple:
        """``entry`` of layers [0, num_layers), for storing in a state.

        Views, not copies: export only from a cache that is then dropped.
        """
        return tuple(self.entry(i) for i in range(num_layers))


@contextmanager
def linear_states_kept(cache, rows: slice = slice(None), only_on_error: bool = False):
    """Put the linear-attention states of a ``RowsKVCache`` (``cache.linear``, layer -> (conv,
    recurrent), rows first) back as they were on entry, in place (a captured graph reads these very buffers): after the block, or
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


ROWS_MIN_CAPACITY = 64  # the smallest capacity a growing rows buffer takes


class Room(NamedTuple):
    """``RowsKVCache.room``'s answer for one prefilled cache: whether it can have a row now.

    row: a slot is free. needs: per device whose buffers must grow to hold it, (device, bytes the
    growth allocates, bytes free there or None where that is not known: the CPU)."""

    row: bool
    needs: tuple = ()

    @property
    def fits(self) -> bool:
        return self.row and all(free is None or grow <= free for _, grow, free in self.needs)

    def __str__(self) -> str:
        if not self.row:
            return "every row is in use"
        short = [f"{grow / 2**20:.0f} MiB more on {device}, {free / 2**20:.0f} MiB free" for device, grow, free in
                 self.needs if free is not None and grow > free]
        return "; ".join(short) if short else "room"


class RowsKVCache:
    """The rows that decode steps run over (steps.py), one row per clip or answer: captions decoded
    together, or one answer as a batch of one row.

    Not a transformers ``Cache`` itself: a decode step is handed ``window(a, b)``, which is one.

    Layout: per attention layer l, key/value buffers [slots, Hkv_l, C_l, d_l], zero-filled
    (a masked slot must be finite); per linear-attention layer, conv [slots, C, k] and
    recurrent [slots, Hv, dk, dv] buffers (``linear``), one row's state per row. The ``rows`` in
    use sit in rows [0, rows); ``add`` puts a clip's prefilled ``KVCache`` in row ``rows`` and
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

    Capacities grow (to a power of two) when a joining clip needs more; ``room`` answers, before
    ``add``, whether a clip can join (a free row, and the memory that growth takes), so the
    scheduler decides who joins. Two other ways to make one: ``allocated`` (fixed capacities,
    static decoding's kept buckets) and ``holding`` (one answer's prefilled cache itself, no copy).
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
        # [slots, num_layers] long, on the first layer's device; a window copies it to every other
        # device of a split model once per step (``RowsWindow.lengths_on``)
        self._lengths: torch.Tensor | None = None
        self.zeroed = True  # whether what no row has filled is zeros (static windows read it)
        self._signature: tuple | None = None
        # host-homed layers (one answer's, ``holding``): layer -> the device their staged copies go to
        self.homed: dict[int, torch.device] = {}
        self.staging: StagedCopies | None = None

    @classmethod
    def allocated(cls, layouts, capacities, device, slots: int = 1) -> "RowsKVCache":
        """Rows whose buffers are allocated now, zeroed, at fixed ``capacities`` per layer (static
        decoding's kept buckets); ``layouts``: per layer, ``KVCache.layout`` of what will fill it."""
        self = cls(len(layouts), slots)
        for i, (layout, capacity) in enumerate(zip(layouts, capacities)):
            buffers = layout.zeros(slots, capacity, device)
            if isinstance(layout, LinearLayout):
                self.linear[i] = buffers
            else:
                self.keys[i], self.values[i] = buffers
        self._lengths = torch.zeros((slots, len(layouts)), dtype=torch.long, device=device)
        return self

    @classmethod
    def holding(cls, cache: KVCache) -> "RowsKVCache":
        """One row that is ``cache`` itself: each layer's buffers as the prefill allocated them
        (with its ``reserve`` to grow into), no copy. For default steps only: past each layer's
        length nothing was written, and a static window, which reads whole buffers, refuses it.
        A host-homed layer (``HostKVLayer``) stays so: its buffers are its home on the host, and each
        step runs over a staged copy (the cache's ``staging``, shared, so a layer prefetched at the end
        of the prefill or of a step is not copied again)."""
        self = cls(len(cache.layers), 1)
        self.staging = cache.staging
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, LinearLayer):
                state = layer.state()
                self.linear[i] = (state.conv, state.recurrent)
            elif layer._writable(0):
                self.keys[i], self.values[i] = layer._buffers
                if isinstance(layer, HostKVLayer):
                    self.homed[i] = layer.device
            else:  # a layer whose keys are not its buffers' front (never the case after a prefill)
                self._allocate(i, layer.keys, layer.keys.shape[-2] + cache.reserve)
                n = layer.keys.shape[-2]
                self.keys[i][0, :, :n], self.values[i][0, :, :n] = layer.keys[0], layer.values[0]
        lengths = list(cache.lengths())
        self._lengths = torch.tensor([lengths], dtype=torch.long).to(self._first_buffer().device)
        self.lengths, self.rows, self.zeroed = [lengths], 1, False
        return self

    def _first_buffer(self) -> torch.Tensor:
        return next(b for b in (*self.keys, *(c for c, _ in self.linear.values())) if b is not None)

    def capacity(self, layer_idx: int) -> int:
        buf = self.keys[layer_idx]
        return 0 if buf is None else buf.shape[-2]

    def attention_layers(self) -> list[int]:
        """The layers that hold keys and values (not linear-attention states)."""
        return [i for i in range(self.num_layers) if i not in self.linear]

    def row_lengths(self, row: int) -> tuple[int, ...]:
        """The positions row ``row`` holds per layer."""
        return tuple(self.lengths[row])

    def spans(self, rows: int) -> list[int]:
        """Per attention layer, what a default step over rows [0, rows) reads: the longest row's
        filled positions and the step's own."""
        return [max(lengths[i] for lengths in self.lengths[:rows]) + 1 for i in self.attention_layers()]

    def signature(self) -> tuple:
        """Where every buffer is and how large: a captured step reads these very buffers."""
        if self._signature is None:
            self._signature = tuple(
                (self.capacity(i), (self.keys[i] if i not in self.linear else self.linear[i][0]).data_ptr())
                for i in range(self.num_layers))
        return self._signature

    def _allocate(self, layer_idx: int, like: torch.Tensor, capacity: int) -> None:
        """(Re)allocate one layer's buffers with ``capacity`` positions, keeping the rows in use
        (with none in use, the old buffers go first)."""
        if not self.rows:
            self.keys[layer_idx] = self.values[layer_idx] = None
        shape = (self.slots, like.shape[1], capacity, like.shape[-1])
        new_k = like.new_zeros(shape)
        new_v = torch.zeros_like(new_k)
        old = self.capacity(layer_idx)
        if old:
            new_k[:self.rows, :, :old] = self.keys[layer_idx][:self.rows]
            new_v[:self.rows, :, :old] = self.values[layer_idx][:self.rows]
        self.keys[layer_idx], self.values[layer_idx] = new_k, new_v
        self._signature = None

    def room(self, cache: KVCache, room: int) -> Room:
        """Whether a prefilled batch-1 ``cache`` can have a row, with ``room`` positions to grow by
        per layer: a free row, and the memory its buffers must grow by to hold it (while the rows in
        use are copied over, the old and the new buffers are both held). An answer, not an error:
        the scheduler decides what follows."""
        grow: dict = {}
        for i, n in enumerate(cache.lengths()):
            entry = cache.entry(i)
            if isinstance(entry, LinearState):
                if i not in self.linear:
                    size = self.slots * sum(t[0].numel() * t.element_size() for t in (entry.conv, entry.recurrent))
                    grow[entry.conv.device] = grow.get(entry.conv.device, 0) + size
                continue
            k = entry[0]
            if self.capacity(i) < n + room:
                capacity = capacity_bucket(n + room, minimum=ROWS_MIN_CAPACITY)
                size = 2 * self.slots * k.shape[1] * capacity * k.shape[-1] * k.element_size()
                grow[k.device] = grow.get(k.device, 0) + size
        return Room(self.rows < self.slots, tuple((str(d), size, free_bytes(d)) for d, size in grow.items()))

    def add(self, cache: KVCache, room: int) -> int:
        """Put a prefilled batch-1 ``cache`` in the next free row, with ``room`` positions to grow
        by per layer; returns the row. The rest of the row's buffers is zeroed: an earlier row's
        values there may not be finite (an fp16 overflow), and a mask cannot hide a NaN. Raises
        ValueError when every slot is in use (ask ``room`` first)."""
        if self.rows >= self.slots:
            raise ValueError(f"all {self.slots} rows are in use")
        lengths = list(cache.lengths())
        row = self.rows
        for i, n in enumerate(lengths):
            entry = cache.entry(i)
            if isinstance(entry, LinearState):
                if i not in self.linear:
                    self.linear[i] = entry.layout().zeros(self.slots, 0, entry.conv.device)
                    self._signature = None
                self.linear[i][0][row] = entry.conv[0]
                self.linear[i][1][row] = entry.recurrent[0]
                continue
            k, v = entry
            if self.capacity(i) < n + room:
                self._allocate(i, k, capacity_bucket(n + room, minimum=ROWS_MIN_CAPACITY))
            self.keys[i][row, :, :n] = k[0]
            self.values[i][row, :, :n] = v[0]
            self.keys[i][row, :, n:] = 0
            self.values[i][row, :, n:] = 0
        if self._lengths is None:
            self._lengths = torch.zeros((self.slots, self.num_layers), dtype=torch.long,
                                        device=self._first_buffer().device)
        self._lengths[row] = torch.tensor(lengths, dtype=torch.long)
        self.lengths.append(lengths)
        self.rows += 1
        return row

    def remove(self, row: int) -> None:
        """Free ``row``: the last row in use moves into it (its filled part; the rest zeroed)."""
        last = self.rows - 1
        if not 0 <= row <= last:
            raise ValueError(f"row {row} is not in use ({self.rows} rows)")
        if row != last:
            for i, n in enumerate(self.lengths[last]):
                if i in self.linear:
                    for buf in self.linear[i]:
                        buf[row] = buf[last]
                    continue
                for buf in (self.keys[i], self.values[i]):
                    buf[row, :, :n] = buf[last, :, :n]
                    buf[row, :, n:] = 0
            self._lengths[row] = self._lengths[last]
            self.lengths[row] = self.lengths[last]
        self.lengths.pop()
        self.rows -= 1

    def clear(self) -> None:
        """Free every row; the buffers stay for the next ones."""
        self.rows, self.lengths = 0, []

    def window(self, start: int, stop: int, static: bool = False) -> "RowsWindow":
        if self.homed and (static or stop - start > 1):
            raise ValueError("keys and values on the host are stepped one row at a time, in default steps")
        if static and not self.zeroed:
            raise ValueError("these rows hold a prefill's own buffers, which a static step cannot read whole")
        return RowsWindow(self, start, stop, static)

    def advance(self, start: int, stop: int) -> None:
        """A step over rows [start, stop) has run: each holds one more position per layer."""
        self._lengths[start:stop] += 1
        for r in range(start, stop):
            self.lengths[r] = [n + 1 for n in self.lengths[r]]


class RowsWindow(_StagesHostLayers, Cache):
    """One decode step's view of rows [start, stop) of a ``RowsKVCache``: the ``Cache`` that
    transformers' layers update (key/value [stop - start, Hkv, 1, d] through ``RowsKVLayer``;
    a linear-attention layer's conv and recurrent buffers, rows [start, stop), held by a
    ``LinearLayer`` and updated in place; the step counts in ``advance``).

    static: fixed shapes for CUDA graphs. Every layer is read at its whole capacity
    (the mask hides what a row has not filled), the lengths are read on the device
    only, and the window may reach past the rows in use into free slots (a batch
    bucket): those compute on stale but finite keys and are never read back.
    """

    def __init__(self, cache: RowsKVCache, start: int, stop: int, static: bool = False):
        if not 0 <= start < stop <= (cache.slots if static else cache.rows):
            raise ValueError(f"rows [{start}, {stop}) are not in use ({cache.rows} rows)")
        self.cache, self.start, self.stop = cache, start, stop
        self._lengths: dict[torch.device, torch.Tensor] = {}
        rows = cache.lengths[start:stop]  # the rows in use (a static bucket may reach past them)
        # per layer, the window's longest row before this step (what get_seq_length says, both modes)
        self.longest = [max((r[i] for r in rows), default=0) for i in range(cache.num_layers)]
        if static:
            self.spans = [cache.capacity(i) for i in range(cache.num_layers)]
        else:  # per layer, the window's longest row after this step's write
            self.spans = [n + 1 for n in self.longest]
        made = []
        for i in range(cache.num_layers):
            if i in cache.linear:
                conv, recurrent = cache.linear[i]
                made.append(LinearLayer().hold(conv[start:stop], recurrent[start:stop], self.longest[i]))
            elif i in cache.homed:
                made.append(HostRowsKVLayer(self, i, cache.staging, cache.homed[i]))
            else:
                made.append(RowsKVLayer(self, i))
        super().__init__(layers=made)
        self.staging = cache.staging

    def lengths_on(self, device: torch.device) -> torch.Tensor:
        """[stop - start, num_layers] long: the window's rows' lengths on ``device``, where a layer's
        write index and mask must be. The cache's own on its device (no copy: a captured graph reads
        it as ``advance`` changes it); on another device of a split model, a copy made once per step,
        not per layer (split models never capture graphs)."""
        lengths = self._lengths.get(device)
        if lengths is None:
            lengths = self._lengths[device] = self.cache._lengths[self.start:self.stop].to(device)
        return lengths

    def masks(self) -> list:
        """Per layer, [rows, 1, 1, n_l] bool on that layer's device: each row's filled positions and
        this step's token (None for a linear-attention layer)."""
        c = self.cache
        out = []
        for i, n in enumerate(self.spans):
            if i in c.linear:
                out.append(None)
                continue
            lengths = self.lengths_on(c.keys[i].device)
            ar = torch.arange(n, device=lengths.device)
            out.append((ar[None, :] <= lengths[:, i, None])[:, None, None, :])
        return out

    def advance(self) -> None:
        """The step has run: every row of the window holds one more position per layer."""
        self.cache.advance(self.start, self.stop)
