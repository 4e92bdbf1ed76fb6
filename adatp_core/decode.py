"""Before decoding, shared by one answer and by captions decoded together.

- ``continue_prefill``: one state's continuation from layer K with its kept tokens
  (batch 1, always: each clip is prefilled on its own), giving its cache and the
  logits of its first generated token.
- ``row_positions``: the position ids of rows' next tokens.
- ``kv_place``: whether one answer's layers >= K keep their keys and values on the host (when the
  device is short), staged on the device two layers at a time (hf/cache.StagedCopies): the check
  before decoding's choice, or places.plan_places' now.

The decode step itself is the step runner's (steps.py: ``decode_step``, ``StepRunner``).
"""

from __future__ import annotations

import torch

from .budget import MemoryEstimate, available_device_bytes, available_host_bytes, continuation_parts
from .fits import place_of
from .flops import LLMShape
from .hf.cache import KVCache
from .places import Place, check_place, plan_places
from .state import AdaTPState


def continue_prefill(state: AdaTPState, reserve: int, kv_on_host: bool = False) -> tuple[KVCache, torch.Tensor]:
    """Run layers [K, num_layers) on the kept tokens (original positions; the state's
    layers < K copied in), in calls of at most ``state.prefill_chunk`` kept tokens (one call
    when they fit), each taking only its own kept rows from the state's layer-K input (which
    may wait on the host). reserve: positions to allocate beyond the prompt per layer.
    kv_on_host: layers >= K's keys and values live on the host (``kv_place``), each attention layer
    staged on the device while it runs, the next one prefetched (hf/cache.HostKVLayer); layers < K
    and linear-attention layers stay on the device.
    Returns (cache of every layer, float32 logits [V] of the first generated token)."""
    adapter = state.model.adapter
    positions = state.kept_positions()  # indices go to each tensor's device (a split model has several)
    rows = positions.to(state.hidden.device)
    position_ids = state.position_ids.index_select(-1, positions.to(state.position_ids.device))
    n = len(positions)
    spans = adapter.chunk_spans(0, n, state.prefill_chunk)
    first = spans[0][1]  # layers >= K take the rest of the kept tokens after their first call
    reserves = [reserve if i < state.layer else reserve + n - first for i in range(adapter.num_layers)]
    host = [i for i in range(state.layer, adapter.num_layers) if not adapter.is_linear_layer(i)] if kv_on_host else ()
    cache = KVCache(adapter.layer_kinds, past=state.past_kv, reserve=reserves, host=host)
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


def kv_place(state: AdaTPState, reserve: int, kv: str = "auto", available=available_device_bytes,
             available_host=available_host_bytes) -> Place:
    """Where one answer's layers >= K keep their keys and values (places.Place: on the host, staged on
    the device STAGED_LAYERS layers at a time, or on the device), with ``reserve`` new tokens to come.

    "device" or "host": as asked (places.plan_places' rules: a model split over devices keeps each
    layer's with it). "auto": the check before decoding's choice when it made one (``state.places.kv``);
    else decided now by the same planner, over what the continuation allocates
    (budget.continuation_parts: the answer's copy of layers < K's keys and values, layers >= K's, one
    call's working memory) against what the device has free now (the state's own tensors are allocated
    already), and what the host has for their homes. Layers < K stay on the device: the prefill held
    them there already (the state keeps them for its next answers), and every decode step reads them
    whole, so their home on the host would move the whole prompt's keys and values to the device at
    every token and lower no peak. Static decoding (CUDA graphs over fixed device buffers) cannot run
    over the host's: such an answer decodes in default steps (generate.py says why in its stats).
    available(device) -> free bytes or None (unknown); available_host() -> the host's, or None."""
    check_place("kv", kv)
    decided = state.places.kv if state.places is not None else None
    if kv == "auto" and decided is not None:
        return decided
    dev = state.model.adapter.device
    return _plan_kv(state, reserve, kv, None if dev.type == "cpu" else available(dev), available_host())


def kv_retry_place(state: AdaTPState, reserve: int, available_host=available_host_bytes) -> Place:
    """Where the keys and values go when the answer ran out of memory with them on the device: the host,
    if it has room for their homes (HOST_MEMORY_SHARE of its free memory), else the device (the same
    planner, told the device has nothing free)."""
    return _plan_kv(state, reserve, "auto", 0, available_host())


def _plan_kv(state: AdaTPState, reserve: int, kv: str, free: int | None, host_free: int | None) -> Place:
    """places.plan_places over what the continuation allocates (budget.continuation_parts), only kv weighed."""
    adapter = state.model.adapter
    llm = LLMShape.from_config(adapter.text_model.config)
    where = place_of(adapter.device)
    kept = len(state.kept_positions())

    def estimate(on_host: frozenset) -> MemoryEstimate:
        return MemoryEstimate(parts=continuation_parts(llm, state.layer, state.prompt.length, kept, reserve,
                                                       state.prefill_chunk, adapter.dtype.itemsize, where,
                                                       kv_on_host="kv" in on_host), frames=1)

    settled = Place(False, "")  # the prefill's placements are behind us: only kv is weighed
    return plan_places(estimate, where, free, split=adapter.is_split, host_free=host_free, encoded=settled,
                       rows=settled, kv=kv, what="the continuation from K").kv
