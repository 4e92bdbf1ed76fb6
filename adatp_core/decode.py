"""The two model calls of decoding, shared by one answer and by captions decoded together.

- ``continue_prefill``: one state's continuation from layer K with its kept tokens
  (batch 1, always: each clip is prefilled on its own), giving its cache and the
  logits of its first generated token.
- ``decode_step``: one decode step for B rows at once (B = 1 for a single answer):
  each row's token at each row's position, over a cache that holds every row.

generate.py's loop calls both with B = 1; batching.py's scheduler calls
``decode_step`` over the rows of a ``RowsKVCache``.
"""

from __future__ import annotations

import torch

from .hf.cache import KVCache
from .state import AdaTPState


def continue_prefill(state: AdaTPState, reserve: int) -> tuple[KVCache, torch.Tensor]:
    """Run layers [K, num_layers) on the kept tokens (original positions; the state's
    layers < K copied in), in calls of at most ``state.prefill_chunk`` kept tokens (one call
    when they fit), each taking only its own kept rows from the state's layer-K input (which
    may wait on the host). reserve: positions to allocate beyond the prompt per layer.
    Returns (cache of every layer, float32 logits [V] of the first generated token)."""
    adapter = state.model.adapter
    positions = state.kept_positions()  # indices go to each tensor's device (a split model has several)
    rows = positions.to(state.hidden.device)
    position_ids = state.position_ids.index_select(-1, positions.to(state.position_ids.device))
    n = len(positions)
    spans = adapter.chunk_spans(0, n, state.prefill_chunk)
    first = spans[0][1]  # layers >= K take the rest of the kept tokens after their first call
    reserves = [reserve if i < state.layer else reserve + n - first for i in range(adapter.num_layers)]
    cache = KVCache(adapter.layer_kinds, past=state.past_kv, reserve=reserves)
    hidden = adapter.run_chunks(spans, lambda a, b: state.hidden.index_select(1, rows[a:b]), position_ids, cache,
                                state.layer, adapter.num_layers, inject=state.kept_injection())
    return cache, adapter.last_logits(hidden)[0]


def decode_step(adapter, tokens: torch.Tensor, positions: torch.Tensor, cache, masks=None) -> torch.Tensor:
    """One decode step of B rows.

    tokens: [B] long, each row's last chosen token.
    positions: [B, 1] long position ids (M-RoPE: [3, B, 1]).
    cache: what the layers read and write (a ``KVCache`` for B = 1, a ``RowsWindow``).
    masks: per layer, [B, 1, 1, n] bool of the positions each row attends to (None: all).
    Returns float32 logits [B, V].
    """
    hidden = adapter.embed_tokens(tokens.view(-1, 1))
    hidden = adapter.run_layers(hidden, positions, cache, 0, adapter.num_layers, masks=masks)
    return adapter.last_logits(hidden)


def row_positions(first: list[int], steps: list[int], template: torch.Tensor, device) -> torch.Tensor:
    """Position ids [B, 1] (or [3, B, 1] like ``template`` [3, 1, L]) of rows whose next
    position is first[r] + steps[r] on every axis."""
    values = torch.tensor([f + s for f, s in zip(first, steps)], dtype=template.dtype).view(-1, 1)
    if template.dim() == 3:
        values = values.unsqueeze(0).expand(template.shape[0], -1, -1)
    return values.to(device)
