"""The video prefix cache: the question-independent part of a prefill, frozen, kept per loaded
model and copied into a new cache (``hf.cache.KVCache``) for each question.

- ``FrozenPrefix``: layers < K's keys/values (or linear states), the layer-K input and the encoded
  video for the positions before a question;
- ``PrefixStore``: a few per loaded model, keyed by exactly what was computed, bounded in entries
  and bytes;
- ``weights_fingerprint``: where the weights are and how often they were written (a cached prefix
  and a captured CUDA graph both depend on them).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .hf.cache import KVCache


def weights_fingerprint(model: torch.nn.Module) -> tuple:
    """Where the weights are and how often they were written in place: it changes when the
    model moves (offload, reload) and when a weight is overwritten (load_state_dict, a patch).

    A captured CUDA graph reads the weights at these addresses (static_decode.py), and a
    cached prefix was computed from these values: both are dropped when it changes.
    """
    def version(t: torch.Tensor) -> int:
        try:
            return t._version
        except RuntimeError:  # an inference tensor keeps no version counter (it cannot be written)
            return 0

    return tuple((t.data_ptr(), version(t)) for t in (*model.parameters(), *model.buffers()))


def frames_digest(frames: torch.Tensor) -> str:
    """SHA-256 of a frame tensor's bytes, shape and dtype: the video's part of a prefix key.

    frames: [T, ...] any dtype and device. Each frame is hashed on its own, in threads
    (hashlib releases the GIL), and the frame digests are hashed together. Cost: one
    pass over the bytes (bench/prefix_reuse.py prints it for 32 and 128 frames).
    """
    import hashlib
    import os
    from concurrent.futures import ThreadPoolExecutor

    t = frames.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    flat = t.reshape(t.shape[0], -1) if t.ndim else t.reshape(1, -1)

    def digest(row: torch.Tensor) -> bytes:
        return hashlib.sha256(row.view(torch.uint8).numpy()).digest()

    workers = min(len(flat), os.cpu_count() or 1, 8)
    if workers > 1 and flat.numel() * flat.element_size() > (1 << 22):
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(digest, flat))
    else:
        parts = [digest(row) for row in flat]
    total = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}".encode())
    for part in parts:
        total.update(part)
    return total.hexdigest()


def tensor_bytes(*objs) -> int:
    """Bytes held by the tensors in ``objs`` (nested tuples and lists, and dataclasses such
    as ``Encoded`` one level down), each storage counted once."""
    from torch.utils._pytree import tree_leaves

    leaves = tree_leaves([list(vars(o).values()) if hasattr(o, "__dataclass_fields__") else o for o in objs])
    seen, total = set(), 0
    for t in leaves:
        if not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        ident = (t.device, storage.data_ptr()) if t.device.type != "meta" else id(storage)
        if ident not in seen:
            seen.add(ident)
            total += storage.nbytes()
    return total


class FrozenPrefix:
    """The question-independent part of one prefill: every position before the question's
    text (the chat template's head, the video and its extras), P positions, for layers < K.

    Frozen: nothing here is ever written. A question copies ``key_values`` into a new
    ``KVCache`` (``cache``), appends its own tokens there and attends to all of it.

    encoded: the family's ``Encoded`` (visual tokens [N, D], extras, frame features [T, d_v],
        DeepStack features); the relevance and the preview use it too.
    key_values: per layer < K, (key [1, Hkv, P, d], value [1, Hkv, P, d]), or a linear-attention
        layer's ``LinearState`` after the P positions, each on its layer's device. With linear
        layers P is a whole number of the delta rule's chunks (``VideoLLMAdapter.prefix_length``).
    hidden: [1, P, D] input hidden states of layer K (the input embeddings when K = 0).
    """

    def __init__(self, encoded, key_values: tuple, hidden: torch.Tensor):
        self.encoded = encoded
        self.key_values = tuple(key_values)
        self.hidden = hidden
        self.nbytes = tensor_bytes(encoded, self.key_values, hidden)

    @property
    def length(self) -> int:
        return int(self.hidden.shape[1])

    def cache(self, layer_kinds, reserve: int = 0) -> KVCache:
        """A new KVCache (``KVCache``'s ``layers``: the model's layer kinds) holding a copy of the
        prefix at layers < K, with room for ``reserve`` more."""
        return KVCache(layer_kinds, past=self.key_values, reserve=reserve)

    def masks(self, n: int, devices) -> list[torch.Tensor]:
        """Per layer < K, [1, 1, n, P + n] bool (True: attend): n new tokens after the prefix,
        causal among themselves, each seeing the whole prefix (the causal mask aligned to the
        bottom right). devices: each layer's device. sdpa needs it: without a mask it aligns
        is_causal to the top left and would drop the prefix's keys."""
        p = self.length
        masks = []
        for dev in devices:
            rows = torch.arange(n, device=dev)[:, None] + p
            masks.append((torch.arange(p + n, device=dev)[None, :] <= rows)[None, None])
        return masks


MAX_PREFIXES = 4  # videos kept per model
MAX_PREFIX_BYTES = 1 << 30  # their tensors, all devices together


class PrefixStore:
    """The frozen prefixes of one loaded model, most recently used last, keyed by
    exactly what was computed (the frames' digest, the video plan, K, the pixel budget,
    the prefix's token ids). At most ``max_entries`` and ``max_bytes`` are kept; a prefix
    larger than ``max_bytes`` is not kept at all. Held by the model's ``VideoLLM``;
    cleared when its weights move or change (``weights_fingerprint``), on unload or
    offload, and after running out of memory.
    """

    def __init__(self, max_entries: int = MAX_PREFIXES, max_bytes: int = MAX_PREFIX_BYTES):
        self.max_entries = int(max_entries)
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict = OrderedDict()
        self._fingerprint = None

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self._entries.values())

    def clear(self) -> None:
        self._entries.clear()
        self._fingerprint = None

    def check_weights(self, model: torch.nn.Module) -> None:
        """Drop everything if the model's weights moved or changed since the last call."""
        fingerprint = weights_fingerprint(model)
        if fingerprint != self._fingerprint:
            self.clear()
            self._fingerprint = fingerprint

    def get(self, key) -> FrozenPrefix | None:
        prefix = self._entries.pop(key, None)
        if prefix is not None:
            self._entries[key] = prefix  # most recently used
        return prefix

    def put(self, key, prefix: FrozenPrefix) -> str | None:
        """Keep ``prefix`` under ``key``, evicting the least recently used. Returns why it
        was not kept (None when it was)."""
        if self.max_entries < 1 or prefix.nbytes > self.max_bytes:
            return (f"not kept: {prefix.nbytes / 2**20:.1f} MiB, the budget is "
                    f"{self.max_bytes / 2**20:.0f} MiB and {self.max_entries} entries")
        self._entries.pop(key, None)
        while self._entries and (len(self._entries) >= self.max_entries
                                 or self.nbytes + prefix.nbytes > self.max_bytes):
            self._entries.popitem(last=False)
        self._entries[key] = prefix
        return None
