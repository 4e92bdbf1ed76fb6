"""Before decoding, shared by one answer and by captions decoded together.

- ``continue_prefill``: one state's continuation from layer K with its kept tokens
  (batch 1, always: each clip is prefilled on its own), giving its cache and the
  logits of its first generated token.
- ``row_positions``: the position ids of rows' next tokens.

The decode step itself is the step runner's (steps.py: ``decode_step``, ``StepRunner``).
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


def row_positions(first: list[int], steps: list[int], template: torch.Tensor, device) -> torch.Tensor:
    """Position ids [B, 1] (or [3, B, 1] like ``template`` [3, 1, L]) of rows whose next
    position is first[r] + steps[r] on every axis."""
    values = torch.tensor([f + s for f, s in zip(first, steps)], dtype=template.dtype).view(-1, 1)
    if template.dim() == 3:
        values = values.unsqueeze(0).expand(template.shape[0], -1, -1)
    return values.to(device)
