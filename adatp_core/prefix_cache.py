"""The video prefix cache: the question-independent part of a prefill, frozen, kept per loaded
model and copied into a new cache (``hf.cache.KVCache``) for each question.

- ``FrozenPrefix``: layers < K's keys/values (or linear states), the layer-K input and the encoded
  video for the positions before a question;
- ``PrefixStore``: a few per loaded model, keyed by exactly what was computed, bounded in entries
  and bytes;
- ``FrameKeys``: the frames' part of that key, reused for the same unwritten tensor, else
  ``frames_digest`` (SHA-256 on the CPU, ``device_digest`` where the frames are on a GPU);
- ``weights_fingerprint``: where the weights are and how often they were written (a cached prefix
  and a captured CUDA graph both depend on them).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch

from .hf.cache import KVCache
from .memory import release_pinned


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


def frames_digest(frames: torch.Tensor, weights=None) -> str:
    """The frames' content digest: the video's part of a prefix key, over every byte, the
    shape and the dtype. frames: [T, ...] any dtype and device.

    On the CPU, SHA-256 (``host_digest``). Elsewhere (a GPU), ``device_digest`` reads the
    bytes where they are and copies only its row sums to the host; ``weights``
    (``digest_weights``) are its random weights, made on that device (one call's worth
    when None). The two kinds never equal each other: a CPU copy of GPU frames misses.
    """
    if frames.device.type == "cpu":
        return "sha256:" + host_digest(frames)
    if weights is None:
        weights = digest_weights(frames.device)
    return "device:" + device_digest(frames, weights)


def host_digest(frames: torch.Tensor) -> str:
    """SHA-256 of a frame tensor's bytes, shape and dtype, on the host (a device tensor is
    copied there first).

    Each frame is hashed on its own, in threads (hashlib releases the GIL), and the frame
    digests are hashed together. Cost: one pass over the bytes (bench/prefix_reuse.py
    prints it).
    """
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


DIGEST_BLOCK = 1 << 20  # bytes per row sum of device_digest
DIGEST_LANES = 2  # independent weight rows: a changed block goes unseen with probability <= 2**-31 per lane
DIGEST_CHUNK = 8  # blocks per pass (64 MiB of int64 temporaries per lane)


def digest_weights(device, seed: int | None = None) -> torch.Tensor:
    """[DIGEST_LANES, DIGEST_BLOCK] int64, uniform in [0, 2**31), on ``device``: the weights of
    ``device_digest``. seed: None draws one from the OS (the digests then compare only within
    this process, which is all a PrefixStore needs)."""
    gen = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else int(seed))
    return torch.randint(0, 1 << 31, (DIGEST_LANES, DIGEST_BLOCK), generator=gen, dtype=torch.int64).to(device)


def device_digest(frames: torch.Tensor, weights: torch.Tensor) -> str:
    """A digest of every byte of ``frames`` computed where they are: only 16 bytes per MiB
    reach the host.

    The bytes (b_0 .. b_n-1, each 0..255) are cut into blocks of DIGEST_BLOCK; per block and
    lane, s = sum_j w_j * b_j in int64, exactly (each term < 2**39, the sum < 2**59: no
    overflow, so the result does not depend on the device's summation order). The row sums,
    the byte count, the shape and the dtype are then hashed with SHA-256 on the host.

    Why this is safe as a cache key: two byte strings of equal length that differ in a block
    give the same s in one lane only if sum_j w_j * d_j = 0 for their nonzero difference d,
    which for weights drawn uniformly and independently of the frames has probability at most
    2**-31 (fix every weight but one where d_j != 0: at most one value of it solves the
    equation). The lanes draw independently: at most 2**-62 per changed block. That is a
    universal hash, not a cryptographic one: it assumes the frames were not chosen after
    seeing ``weights``, which never leave the process.
    """
    t = frames.detach().contiguous().reshape(-1).view(torch.uint8)  # a copy on the device only if strided
    n = t.numel()
    sums = []
    step = DIGEST_BLOCK * DIGEST_CHUNK
    for start in range(0, n, step):
        chunk = t[start:start + step].to(torch.int64)
        pad = -chunk.numel() % DIGEST_BLOCK
        if pad:
            chunk = torch.nn.functional.pad(chunk, (0, pad))
        chunk = chunk.view(-1, DIGEST_BLOCK)
        sums.append(torch.stack([(chunk * w).sum(dim=1) for w in weights]))
    rows = torch.cat(sums, dim=1).cpu() if sums else torch.zeros(0, dtype=torch.int64)
    total = hashlib.sha256(f"{tuple(frames.shape)}|{frames.dtype}|{n}".encode())
    total.update(rows.contiguous().numpy().tobytes())
    return total.hexdigest()


def _stamp(frames: torch.Tensor) -> tuple | None:
    """What a tensor object must still show for its digest to be reused: where its bytes are,
    its layout, and its version counter (bumped by every in-place write through it or a view of
    it, inference mode included). None for an inference tensor, which keeps no version counter
    and so can never vouch for its bytes."""
    if frames.is_inference():
        return None
    try:
        version = frames._version
    except RuntimeError:
        return None
    return (frames.data_ptr(), tuple(frames.shape), frames.stride(), frames.dtype, frames.device, version)


class FrameKeys:
    """The frames' part of a prefix key, computed only where that is needed.

    The common case is the same IMAGE tensor again: ComfyUI hands a cached node output back
    unchanged on every Run, and the CLI asks all its questions of one tensor. Such a tensor
    gets the digest it had, without a pass over its bytes, when it is the same object (a weak
    reference: a freed tensor whose id or address is reused is another object), at the same
    address with the same shape, strides, dtype and device, and its version counter has not
    moved since (no in-place write through it or any view of it).

    Everything else is hashed (``frames_digest``): a copy (it hits through the content), an
    inference tensor (it has no version counter; frames made in inference mode, as ComfyUI
    runs every node, by a loader other than the pack's), and a tensor that was written. The
    version counter is autograd's own record of writes; writes that bypass it (through
    ``.data``, a NumPy view or DLPack) are not seen, as autograd does not see them.
    """

    MAX_SEEN = 8

    def __init__(self, seed: int | None = None):
        self._seed = secrets.randbits(63) if seed is None else int(seed)
        self._seen: list[tuple] = []  # (weakref to the tensor, its _stamp, its digest), newest last
        self._weights: dict = {}  # device -> digest_weights

    def __call__(self, frames: torch.Tensor) -> str:
        stamp = _stamp(frames)
        self._seen = [e for e in self._seen if e[0]() is not None]
        if stamp is not None:
            for ref, seen_stamp, digest in self._seen:
                if ref() is frames and seen_stamp == stamp:
                    return digest
        weights = None
        if frames.device.type != "cpu":
            weights = self._weights.get(frames.device)
            if weights is None:
                weights = self._weights[frames.device] = digest_weights(frames.device, self._seed)
        digest = frames_digest(frames, weights)
        if stamp is not None:
            self._seen = [e for e in self._seen if e[0]() is not frames][-(self.MAX_SEEN - 1):]
            self._seen.append((weakref.ref(frames), stamp, digest))
        return digest

    def drop_weights(self) -> None:
        """Free the device weights (they are made again, the same, from the seed when needed)."""
        self._weights.clear()


def tensor_bytes_by_place(*objs) -> dict[str, int]:
    """Bytes held by the tensors in ``objs`` (nested tuples and lists, and dataclasses such
    as ``Encoded`` one level down), each storage counted once, by place: "host" for the host's
    memory (rows waiting there for a GPU's model included), else the device's name."""
    from torch.utils._pytree import tree_leaves

    leaves = tree_leaves([list(vars(o).values()) if hasattr(o, "__dataclass_fields__") else o for o in objs])
    seen, places = set(), {}
    for t in leaves:
        if not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        ident = (t.device, storage.data_ptr()) if t.device.type != "meta" else id(storage)
        if ident not in seen:
            seen.add(ident)
            place = "host" if t.device.type == "cpu" else str(t.device)
            places[place] = places.get(place, 0) + storage.nbytes()
    return places


def tensor_bytes(*objs) -> int:
    """Bytes held by the tensors in ``objs``, all places together (``tensor_bytes_by_place``)."""
    return sum(tensor_bytes_by_place(*objs).values())


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
        self.places = tensor_bytes_by_place(encoded, self.key_values, hidden)
        self.nbytes = sum(self.places.values())
        # what a question over it allocates none of again (its keys and values and rows it copies)
        self.reused = tensor_bytes_by_place(encoded)

    @property
    def length(self) -> int:
        return int(self.hidden.shape[1])

    def cache(self, layer_kinds, reserve=0) -> KVCache:
        """A new KVCache (``KVCache``'s ``layers``: the model's layer kinds) holding a copy of the
        prefix at layers < K, with room for ``reserve`` more."""
        return KVCache(layer_kinds, past=self.key_values, reserve=reserve)


MAX_PREFIXES = 4  # videos kept per model
MAX_PREFIX_BYTES = 1 << 30  # their tensors on each place (the host, each device), at least
# ... or this share of the place's whole memory where that is more: a long video's prefix (issue 30: the
# most valuable one to keep) is several GB, and with its rows on the host most of it waits there.
PREFIX_MEMORY_SHARE = 0.1


def place_total_bytes(place: str) -> int | None:
    """The whole memory of a place ("host" or a device name), None where unknown."""
    try:
        if place == "host":
            import os

            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        device = torch.device(place)
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
    except (ValueError, OSError, RuntimeError, AttributeError, AssertionError):
        pass
    return None


def place_budget(place: str) -> int:
    """What kept prefixes may hold on ``place``: MAX_PREFIX_BYTES, or PREFIX_MEMORY_SHARE of its memory."""
    total = place_total_bytes(place)
    return max(MAX_PREFIX_BYTES, int(PREFIX_MEMORY_SHARE * total) if total else 0)


class PrefixStore:
    """The frozen prefixes of one loaded model, most recently used last, keyed by
    exactly what was computed (the frames' digest from ``frame_keys``, the video plan, K,
    the pixel budget, the prefix's token ids). At most ``max_entries`` are kept, and on each place (the
    host, each device) at most ``max_bytes`` (default: ``place_budget``, MAX_PREFIX_BYTES or a share of
    that place's memory); a prefix larger than that on any place is not kept at all. Held by the model's ``VideoLLM``;
    cleared when its weights move or change (``weights_fingerprint``), on unload or
    offload, and after running out of memory.
    """

    def __init__(self, max_entries: int = MAX_PREFIXES, max_bytes: int | None = None):
        self.max_entries = int(max_entries)
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self._entries: OrderedDict = OrderedDict()
        self._fingerprint = None
        self.frame_keys = FrameKeys()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self._entries.values())

    def reused_bytes_on(self, place: str) -> int:
        """Bytes the kept prefixes hold on ``place`` ("host" or a device's name) that a question over one
        allocates none of again: their encoded rows (layers < K's keys and values and layer K's rows it
        copies: FrozenPrefix.cache, attention._prefill_with_prefix)."""
        return sum(p.reused.get(place, 0) for p in self._entries.values())

    def budget(self, place: str) -> int:
        return place_budget(place) if self.max_bytes is None else self.max_bytes

    def _over(self, prefix: FrozenPrefix) -> bool:
        """Whether keeping ``prefix`` beside the entries goes over a place's budget."""
        for place, size in prefix.places.items():
            held = sum(p.places.get(place, 0) for p in self._entries.values())
            if held + size > self.budget(place):
                return True
        return False

    def clear(self) -> None:
        dropped = bool(self._entries)
        self._entries.clear()
        self._fingerprint = None
        self.frame_keys.drop_weights()
        if dropped:
            release_pinned()  # the prefixes' encoded rows on the host: their pinned blocks go back

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
        over = [(place, size) for place, size in prefix.places.items() if size > self.budget(place)]
        if self.max_entries < 1 or over:
            what = ", ".join(f"{size / 2**20:.1f} MiB on {place} of a budget of {self.budget(place) / 2**20:.0f} MiB"
                             for place, size in over) or f"{prefix.nbytes / 2**20:.1f} MiB"
            return f"not kept: {what}, {self.max_entries} entries"
        self._entries.pop(key, None)
        evicted = False
        while self._entries and (len(self._entries) >= self.max_entries or self._over(prefix)):
            self._entries.popitem(last=False)
            evicted = True
        self._entries[key] = prefix
        if evicted:
            release_pinned()  # an evicted prefix's encoded rows on the host: their pinned blocks go back
        return None
