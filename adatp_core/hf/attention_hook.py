"""AdaTP's attention hook: a wrapper of a stock attention kernel, registered
through transformers' ``AttentionInterface``.

The wrapper receives the queries and keys already rotated (RoPE or M-RoPE) and
joined with the cache. When a per-call ``AttentionProbe`` asks for it, it scores
the probe's query rows on the visual keys, then runs the stock kernel (sdpa by
default) unchanged. Memory is O(heads * |Q| * L); no full attention matrix is
ever formed. The loader registers it (``register_attention``).
"""

from __future__ import annotations

import torch

from ..errors import AdaTPInputError

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
    and would drop the cached keys. Costs n * (past + n) bytes."""
    rows = torch.arange(n, device=device)[:, None] + past
    return (torch.arange(past + n, device=device)[None, :] <= rows)[None, None]


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
    """
    h, hkv = query.shape[1], key.shape[1]
    s, lk, d = query.shape[2], key.shape[2], query.shape[3]
    rows = rows.to(query.device)
    q = query[0, :, rows].float()  # [H, Q, d]
    k = key[0].float()  # [Hkv, Lk, d]
    n_q = q.shape[1]
    q = q.reshape(hkv, (h // hkv) * n_q, d)  # heads of one KV group share its keys
    logits = torch.matmul(q, k.transpose(1, 2)).mul_(scaling).view(h, n_q, lk)
    key_pos = torch.arange(lk, device=query.device)
    row_pos = rows + (lk - s)
    logits.masked_fill_(key_pos[None, None, :] > row_pos[None, :, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return probs[:, :, columns.to(query.device)].mean(dim=(0, 1))


def _wrapper(base_fn):
    def attention(module, query, key, value, attention_mask, adatp_probe=None, **kwargs):
        if adatp_probe is not None:
            adatp_probe.scores = query_attention_scores(
                query, key, adatp_probe.query_positions, adatp_probe.key_positions,
                kwargs.get("scaling") or module.scaling)
        # RoPE is already applied; position ids would only make flash kernels
        # mistake pruned (gapped) positions for packed sequences.
        kwargs.pop("position_ids", None)
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
        AttentionInterface.register(name, _wrapper(ALL_ATTENTION_FUNCTIONS[base]))  # looked up once, not per call
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name
