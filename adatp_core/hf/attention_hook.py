"""AdaTP's attention hook: a wrapper of a stock attention kernel, registered
through transformers' ``AttentionInterface``.

The wrapper receives the queries and keys already rotated (RoPE or M-RoPE) and
joined with the cache. When a per-call ``AttentionProbe`` asks for it, it scores
the probe's query rows on the visual keys, then runs the stock kernel (sdpa by
default) unchanged. Memory is O(heads * |Q| * L); no full attention matrix is
ever formed. The loader registers it (``register_attention``).
"""

from __future__ import annotations

import logging

import torch

from ..budget import tail_mask_rows
from ..errors import AdaTPInputError, is_out_of_memory

log = logging.getLogger(__name__)
_FLASH_REFUSED: set = set()  # (torch version, device name) where the lower-right flash call failed once

_PREFIX = "adatp_"


def aligns_causal_to_the_end(config) -> bool:
    """Whether the text model's attention aligns its causal mask to the bottom right by itself
    (flash-attn does, and takes no 4-D mask), read from transformers' private
    ``_attn_implementation`` (set by ``from_pretrained``'s ``attn_implementation``)."""
    return "flash" in str(getattr(config, "_attn_implementation", ""))


def causal_tail_mask(past: int, n: int, device) -> torch.Tensor:
    """[1, 1, n, past + n] bool (True: attend): n new tokens after ``past`` cached ones, causal among
    themselves, each seeing every cached key (the causal mask aligned to the bottom right). sdpa
    needs it for a call over a non-empty cache: without a mask it aligns is_causal to the top left
    and would drop the cached keys. Costs n * (past + n) bytes (``TailCausal`` stands in for it)."""
    rows = torch.arange(n, device=device)[:, None] + past
    return (torch.arange(past + n, device=device)[None, :] <= rows)[None, None]


class TailCausal:
    """The attention mask of a call of ``n`` new tokens after ``past`` cached ones (what
    ``causal_tail_mask`` builds), without a [n, past + n] tensor: handed to the decoder layers in
    place of the mask, it reaches AdaTP's attention wrapper, which runs sdpa over the call's
    queries in blocks of ``rows(item)`` (``attend``). Block [j, e) attends to keys [0, past + e)
    through a view of one [rows, past + n] additive mask, zero but for the causal triangle in its
    last ``rows`` columns (any trailing view of it is the next block's mask); grouped-query heads
    share their keys (enable_gqa) instead of being copied per query head. On CUDA, flash attention
    takes the whole call with no mask when it can (``_flash_lower_right``); else the blocks run
    there with the keys copied per head once per call (its mask-taking kernel does not share
    them). A wrapped kernel other than sdpa gets the bool mask (``dense``).

    Each query row sees the same keys as under the dense mask, so the result is the same within
    float tolerance (a softmax over the same scores). The mask costs mask_bytes (budget.TAIL_MASK_BYTES) at most (a block
    keeps at least budget.MIN_TAIL_ROWS rows), made once per dtype and device and shared by the layers;
    the dense mask and sdpa's additive copy of it cost n * (past + n) * (1 + item) bytes, and
    transformers' copy of the keys and values per query head 2 * heads * head_dim * (past + n) * item.
    """

    adatp_tail_causal = True  # what AdaTP's wrapper asks of a mask (``_wrapper``)

    def __init__(self, past: int, n: int, mask_bytes: int | None = None):
        self.past, self.n = past, n
        self.mask_bytes = mask_bytes  # None: budget.TAIL_MASK_BYTES
        self._bias: dict = {}

    @property
    def width(self) -> int:
        return self.past + self.n

    def rows(self, item: int) -> int:
        """Query rows per block for a mask of ``item`` bytes an element (budget.tail_mask_rows)."""
        return tail_mask_rows(self.n, self.width, item, self.mask_bytes)

    def dense(self, device) -> torch.Tensor:
        return causal_tail_mask(self.past, self.n, device)

    def bias(self, dtype: torch.dtype, device) -> torch.Tensor:
        """[rows, past + n] additive mask: 0, and -inf above the diagonal of its last ``rows`` columns."""
        key = (dtype, torch.device(device))
        if key not in self._bias:
            rows = self.rows(torch.empty((), dtype=dtype).element_size())
            bias = torch.zeros((rows, self.width), dtype=dtype, device=device)
            above = torch.ones((rows, rows), dtype=torch.bool, device=device).triu_(1)
            bias[:, self.width - rows:].masked_fill_(above, float("-inf"))
            self._bias[key] = bias
        return self._bias[key]

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None,
               groups: int) -> torch.Tensor:
        """sdpa of query [B, H, n, d] on key, value [B, H / groups, past + n, d] under this mask, block by
        block; returns [B, n, H, dv] as transformers' sdpa_attention_forward does."""
        b, h, n, _ = query.shape
        width = key.shape[2]
        if (n, width) != (self.n, self.width):
            raise ValueError(f"a tail mask of {self.n} queries over {self.width} keys met {n} over {width}")
        gqa = groups > 1
        if query.device.type != "cpu":
            flash = _flash_lower_right(query, key, value, scale, gqa)
            if flash is not None:
                return flash
            if gqa:  # the kernels there that take a mask (memory-efficient) do not share a group's keys:
                # copy them per query head once per call, as transformers' sdpa does under a mask
                key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
                gqa = False
        bias = self.bias(query.dtype, query.device)
        rows = bias.shape[0]
        out = query.new_empty((b, n, h, value.shape[-1]))
        for j in range(0, n, rows):
            e = min(j + rows, n)
            seen = self.past + e  # keys [0, past + e): the cache and the call's tokens up to the block's last
            part = torch.nn.functional.scaled_dot_product_attention(
                query[:, :, j:e], key[:, :, :seen], value[:, :, :seen], attn_mask=bias[rows - (e - j):, width - seen:],
                scale=scale, enable_gqa=gqa)
            out[:, j:e] = part.transpose(1, 2)
        return out


def _flash_lower_right(query, key, value, scale, gqa: bool) -> torch.Tensor | None:
    """On CUDA, where flash attention takes the call: its causal mask aligned to the bottom right by
    the kernel itself (torch's ``causal_lower_right``), no mask tensor at all and grouped keys shared;
    [B, n, H, dv]. None elsewhere (the caller's blocks then run). Checked on a GPU by
    tests/gpu/test_rows_on_host.py."""
    if query.device.type != "cuda" or torch.version.hip:  # ROCm's flash aligns is_causal to the top left
        return None
    return _lower_right_or_none(query, key, value, scale, gqa, torch.cuda.get_device_name(query.device))


def _lower_right_or_none(query, key, value, scale, gqa: bool, device_name: str) -> torch.Tensor | None:
    """``_flash_lower_right`` past its device check. A torch whose flash call refuses what
    can_use_flash_attention accepted (a kernel or signature change in a new release) costs one
    warning and the blocks from then on, never the answer; running out of memory is raised."""
    where = (torch.__version__, device_name)
    if where in _FLASH_REFUSED:
        return None
    try:
        from torch.backends.cuda import SDPAParams, can_use_flash_attention
        from torch.nn.attention.bias import causal_lower_right

        if not can_use_flash_attention(SDPAParams(query, key, value, None, 0.0, False, gqa)):
            return None
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=causal_lower_right(query.shape[2], key.shape[2]), scale=scale,
            enable_gqa=gqa)
    except (ImportError, RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
        if is_out_of_memory(exc):
            raise
        _FLASH_REFUSED.add(where)
        log.warning("flash attention with a bottom-right causal mask failed on %s with torch %s (%s: %s); the "
                    "prefill's calls over the cache run as blocks of sdpa from now on (same result, a little "
                    "slower). Please report it with `python -m adatp_core doctor`.", device_name,
                    torch.__version__, type(exc).__name__, exc)
        return None
    return out.transpose(1, 2).contiguous()


def wrapped_attention_name(base: str) -> str:
    """Name under which AdaTP's wrapper of ``base`` is registered."""
    return _PREFIX + base


def query_attention_scores(query: torch.Tensor, key: torch.Tensor, rows: torch.Tensor,
                           columns: torch.Tensor, scaling: float) -> torch.Tensor:
    """Mean causal softmax attention of some query rows on some key columns.

    query: [1, H, S, d] rotated queries of the S tokens in this forward call.
    key: [1, Hkv, Lk, d] rotated keys, cache included (Lk >= S; the S tokens
        are the last S keys). H must be a multiple of Hkv (GQA).
    rows: [Q] long, indices into the S query tokens.
    columns: [N] long, key positions to report.
    Returns [N] float32: the probability on each column, averaged over heads and rows.
    One KV group at a time: the float32 probabilities of its H / Hkv heads [H / Hkv, Q, Lk], and
    its keys in float32, exist at once, never every head's (at 100k keys those are the prefill's
    largest tensors after the rows).
    """
    h, hkv = query.shape[1], key.shape[1]
    s, lk, d = query.shape[2], key.shape[2], query.shape[3]
    rows = rows.to(query.device)
    q = query[0, :, rows].float()  # [H, Q, d]
    n_q, group = q.shape[1], h // hkv
    q = q.reshape(hkv, group * n_q, d)  # heads of one KV group share its keys
    key_pos = torch.arange(lk, device=query.device)
    future = key_pos[None, :] > (rows + (lk - s))[:, None]  # [Q, Lk]: keys after each row (causal)
    total = torch.zeros(lk, dtype=torch.float32, device=query.device)
    for g in range(hkv):
        logits = torch.matmul(q[g], key[0, g].float().t()).mul_(scaling).view(group, n_q, lk)
        logits.masked_fill_(future, float("-inf"))
        total += torch.softmax(logits, dim=-1).sum(dim=(0, 1))
        del logits
    return total[columns.to(query.device)] / (h * n_q)


def _wrapper(base_fn, sdpa):
    """AdaTP's attention around ``base_fn`` (``sdpa``: transformers' sdpa function, which a
    ``TailCausal`` mask replaces with its own blocked sdpa calls)."""
    def attention(module, query, key, value, attention_mask, adatp_probe=None, **kwargs):
        if adatp_probe is not None:
            adatp_probe.scores = query_attention_scores(
                query, key, adatp_probe.query_positions, adatp_probe.key_positions,
                kwargs.get("scaling") or module.scaling)
        # RoPE is already applied; position ids would only make flash kernels
        # mistake pruned (gapped) positions for packed sequences.
        kwargs.pop("position_ids", None)
        # Asked by attribute, not class: the pack may be imported twice under two names (ComfyUI's
        # custom node and adatp_core), and the wrapper registered first serves both.
        if getattr(attention_mask, "adatp_tail_causal", False):
            if base_fn is sdpa and kwargs.get("sliding_window") is None and not kwargs.get("dropout"):
                return attention_mask.attend(query, key, value, kwargs.get("scaling") or module.scaling,
                                             getattr(module, "num_key_value_groups", 1)), None
            attention_mask = attention_mask.dense(query.device)
        return base_fn(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"adatp_{base_fn.__name__}"
    return attention


def register_attention(base: str = "sdpa") -> str:
    """Register AdaTP's wrapper of ``base`` (idempotent). Returns its name.

    Called by the model loader, never at import.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if "flash" in base:  # transformers sends such names to its hub-kernel loader (loader.attention_kernel)
        raise AdaTPInputError(f"attention {base!r} cannot be wrapped; use sdpa")
    if base not in ALL_ATTENTION_FUNCTIONS:
        raise AdaTPInputError(f"unknown attention {base!r}")
    name = wrapped_attention_name(base)
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _wrapper(ALL_ATTENTION_FUNCTIONS[base],
                                                   ALL_ATTENTION_FUNCTIONS["sdpa"]))  # looked up once, not per call
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name
