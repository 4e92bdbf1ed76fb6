"""The decoder-layer loop: AdaTP runs transformers' own decoder layers one by one, with the
pack's caches (``cache.py``), so that layers < K and layers >= K can hold different tokens.

This is the one place that calls a transformers decoder layer. What differs between releases is
asked of the installed code, never assumed from a version number (the releases each branch serves
are named beside it; versions.py holds the tested range):
- the cache argument's name: ``past_key_values`` (5.17) became ``cache`` (5.24, 5.25; the old name
  warns until 5.40), read from the layer's signature (``cache_argument``);
- the layer's return value: the hidden states (5.17 through 5.25, every family), or a tuple
  (transformers 4, below the minimum; the check costs nothing).
The loop is the text model's own (``Qwen2Model.forward``, ``Qwen3VLTextModel.forward``), less the
parts AdaTP replaces: the mask (none at batch 1; per-layer masks for fixed buffers and rows) and
DeepStack's injection, which is given per call (``Injection``), as ``_deepstack_process`` does it.
An unexpected error that transformers raises in the loop leaves as versions.py's clear error
(``transformers_boundary``), naming the family and the versions.
"""

from __future__ import annotations

import inspect

import torch

from ..errors import AdaTPInputError
from .versions import transformers_boundary


def cache_argument(layer: torch.nn.Module) -> str:
    """transformers renamed the decoder layers' cache argument: past_key_values
    (5.17) became cache (5.24, 5.25). Ask the signature instead of the version."""
    params = inspect.signature(layer.forward).parameters
    return "cache" if "cache" in params else "past_key_values"  # cache: 5.24, 5.25; past_key_values: 5.17


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: accelerate's execution device when a device map
    dispatched it (its weights may then wait on the CPU or disk), else the device
    of its first parameter or buffer. A model split over several GPUs has one per layer."""
    hook = getattr(module, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return torch.device(execution)
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    raise AdaTPInputError(f"{type(module).__name__} has no weights to tell its device")


def run_decoder_layers(text_model, hidden, position_ids, cache, start: int, stop: int, cache_arg: str,
                       linear_layers=frozenset(), probe=None, masks=None, inject=None,
                       family: str = "") -> torch.Tensor:
    """Run ``text_model``'s decoder layers [start, stop) on hidden [B, S, D] at position_ids.

    The tokens in ``hidden`` are in sequence order and attend causally to each
    other and to everything already in ``cache`` for that layer (which is
    how a prompt prefill with an empty cache and a one-token decode step both
    behave). No attention mask is built: batch 1 needs none. ``masks``, one
    per layer, is for caches that return fixed-size buffers (static decoding, rows).
    ``linear_layers``: the indices of linear-attention layers (they take no 4-D mask).
    ``probe``: the AttentionProbe that AdaTP's attention function fills at its layer.
    ``inject`` adds per-layer features to some rows after the first layers
    (Qwen3-VL's DeepStack), the way the stock text model does.
    ``family``: the model_type that errors raised inside transformers name (default: the text
    model's own).
    """
    with transformers_boundary(family or text_model.config.model_type, "the decoder layers"):
        return _run(text_model, hidden, position_ids, cache, start, stop, cache_arg, linear_layers, probe, masks,
                    inject)


def _run(tm, hidden, position_ids, cache, start, stop, cache_arg, linear_layers, probe, masks, inject):
    """run_decoder_layers' loop."""
    position_embeddings = tm.rotary_emb(hidden, position_ids)
    for i in range(start, stop):
        dev = module_device(tm.layers[i])  # a split model changes device between layers
        if hidden.device != dev:
            hidden = hidden.to(dev)
            position_ids = position_ids.to(dev)
            position_embeddings = tuple(t.to(dev) for t in position_embeddings)
        kwargs = {cache_arg: cache}
        if probe is not None and probe.layer == i:
            kwargs["adatp_probe"] = probe
        # A linear-attention layer takes a 2-D padding mask only; rows here carry no padding.
        mask = None if masks is None or i in linear_layers else masks[i]
        out = tm.layers[i](hidden, attention_mask=mask,
                           position_ids=position_ids, position_embeddings=position_embeddings,
                           use_cache=True, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out  # a tensor in 5.17-5.25; a tuple in transformers 4
        if inject is not None and i < len(inject.features) and inject.features[i] is not None:
            hidden = hidden.clone()
            hidden[0, inject.rows] = hidden[0, inject.rows] + inject.features[i].to(hidden.device, hidden.dtype)
    return hidden
