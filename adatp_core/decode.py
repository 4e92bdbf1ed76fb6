"""Before decoding, shared by one answer and by captions decoded together.

- ``continue_prefill``: one state's continuation from layer K with its kept tokens
  (batch 1, always: each clip is prefilled on its own), giving its cache and the
  logits of its first generated token.
- ``row_positions``: the position ids of rows' next tokens.
- ``kv_place``: whether one answer's layers >= K keep their keys and values on the host (when the
  device is short), staged on the device two layers at a time (hf/cache.StagedCopies).

The decode step itself is the step runner's (steps.py: ``decode_step``, ``StepRunner``).
"""

from __future__ import annotations

import torch

from .budget import (DEVICE_MEMORY_SHARE, HOST_MEMORY_SHARE, available_device_bytes, available_host_bytes,
                     continuation_parts, size_text)
from .fits import PLACES, check_place
from .flops import LLMShape
from .hf.cache import KVCache
from .state import AdaTPState

# Where one answer's layers >= K keep their keys and values: auto (the device, or the host when the
# device is short: ``kv_place``), device, or host (the places of the run's other rows).
KV_PLACES = PLACES


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
             available_host=available_host_bytes) -> tuple[bool, str]:
    """(whether one answer's layers >= K keep their keys and values on the host, why), decided when
    the answer continues from K, with ``reserve`` new tokens to come.

    auto: the device, unless what the continuation allocates (budget.continuation_parts: the answer's
    copy of layers < K's keys and values, layers >= K's, one call's working memory) is above
    DEVICE_MEMORY_SHARE of what the device has free now; then the host, and two layers' staged copies
    on the device (unless the host has not HOST_MEMORY_SHARE of its free memory for them either: then
    the device, which may run out). A CPU model's are on the host anyway; a model split over devices keeps each
    layer's with it. Layers < K stay on the device: the prefill held them there already (the state
    keeps them for its next answers), and every decode step reads them whole, so their home on the
    host would move the whole prompt's keys and values to the device at every token and lower no peak.
    Static decoding (CUDA graphs over fixed device buffers) cannot run over the host's: such an
    answer decodes in default steps (generate.py says why in its stats).
    available(device) -> free bytes or None (unknown: the device); available_host() -> the host's free
    bytes or None (unknown: not checked)."""
    check_place("kv", kv)
    adapter = state.model.adapter
    dev = adapter.device
    if adapter.is_split:
        return False, "the model is split over devices: each layer's keys and values stay with it"
    if kv != "auto":
        return kv == "host", "asked for"
    if dev.type == "cpu":
        return False, "the model runs on the host"
    have = available(dev)
    if have is None:
        return False, "the device's free memory is unknown"
    llm = LLMShape.from_config(adapter.text_model.config)
    where = str(dev)
    kept = len(state.kept_positions())

    def parts(on_host: bool) -> tuple:
        return continuation_parts(llm, state.layer, state.prompt.length, kept, reserve,
                                  state.prefill_chunk, adapter.dtype.itemsize, where, kv_on_host=on_host)

    need = sum(b for _, b, w in parts(False) if w == where)
    limit = int(have * DEVICE_MEMORY_SHARE)
    if need <= limit:
        return False, f"the continuation from K needs about {size_text(need)} of {size_text(have)} free"
    host = parts(True)
    host_free = available_host()
    if host_free is not None and host[1][1] > host_free * HOST_MEMORY_SHARE:
        return False, (f"the device is short (the continuation from K needs about {size_text(need)} of "
                       f"{size_text(have)} free), but the host is too: layers >= K's keys and values "
                       f"({size_text(host[1][1])}) against {size_text(host_free)} free there")
    why = (f"the device is short: the continuation from K needs about {size_text(need)} of {size_text(have)} free; "
           f"layers >= K's keys and values ({size_text(host[1][1])}) live on the host and two layers' copies "
           f"({size_text(host[2][1])}) come to the device at a time")
    rest = sum(b for _, b, w in host if w == where)
    if rest > limit:
        why += (f"; the rest may still not fit: about {size_text(rest)}, one call of "
                f"{min(state.prefill_chunk or kept, kept)} tokens taking "
                f"{size_text(host[-1][1])} (a smaller prefill_chunk takes less)")
    return True, why
