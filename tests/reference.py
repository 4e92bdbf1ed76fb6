"""Independent references for the exactness tests.

``masked_logits`` runs the FULL sequence through the stock decoder layers, with
no cache and no gathering: at layers >= K the keys of the dropped visual tokens
are masked out. It shares nothing with adatp_core's continuation path (no
KVCache, no kept-position gather, no position-id handling)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from shapes import stock_inputs as bench_stock_inputs  # noqa: E402


def stock_video_kwargs(llm, prompt, frames) -> dict:
    """What the stock model's forward/generate takes for this prompt's video: the
    pixels and, for Qwen, the grid, the token types and the seconds per temporal patch
    (the benchmark's stock baseline builds the same, bench/shapes.py)."""
    return bench_stock_inputs(llm, prompt, llm.adapter.preprocess(frames, prompt.plan))


def stock_inputs(model, prompt, kwargs, new_tokens: int = 0):
    """(inputs_embeds [1, L, D], position ids [1, L'] or [3, 1, L'], deepstack features)
    the way the stock model's forward builds them; the position ids go on for
    ``new_tokens`` generated tokens the way stock generate() continues them."""
    ids = prompt.input_ids
    if "video_grid_thw" not in kwargs:
        return stock_inputs_embeds(model, ids, kwargs["pixel_values_videos"][0]), \
            torch.arange(len(ids) + new_tokens)[None], ()
    mm = model.model
    out = mm.get_video_features(kwargs["pixel_values_videos"], kwargs["video_grid_thw"], return_dict=True)
    feats = torch.cat(out.pooler_output)
    embeds = mm.get_input_embeddings()(ids[None])
    mask = (ids == model.config.video_token_id)[None, :, None].expand_as(embeds)
    embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
    rope = {k: v for k, v in kwargs.items() if k != "pixel_values_videos"}
    pos, deltas = mm.get_rope_index(ids[None], attention_mask=torch.ones_like(ids[None]), **rope)
    later = (torch.arange(len(ids), len(ids) + new_tokens) + deltas[0]).view(1, 1, -1).expand(3, 1, -1)
    deepstack = tuple(torch.cat(f) if isinstance(f, (tuple, list)) else f  # split per video, as pooler_output
                      for f in getattr(out, "deepstack_features", None) or ())
    return embeds, torch.cat([pos, later], dim=-1), deepstack


def stock_inputs_embeds(model, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """inputs_embeds [1, L, D] built the way LlavaOnevisionModel.forward builds them."""
    mm = model.model
    feats = mm.get_video_features(pixel_values[None], return_dict=True).pooler_output  # positional: renamed in 5.2x
    feats = feats.reshape(-1, feats.shape[-1])
    n_video = int((input_ids == model.config.video_token_id).sum())
    if feats.shape[0] == n_video - 1:  # older transformers append the newline in forward()
        feats = torch.cat([feats, mm.image_newline[None].to(feats)])
    embeds = mm.get_input_embeddings()(input_ids[None])
    mask = (input_ids == model.config.video_token_id)[None, :, None].expand_as(embeds)
    return embeds.masked_scatter(mask, feats.to(embeds.dtype))


def masked_logits(model, embeds: torch.Tensor, dropped: torch.Tensor, layer: int, pos=None,
                  deepstack=(), visual_positions=None) -> torch.Tensor:
    """Logits [L, V] of a full-sequence forward where, at layers >= ``layer``, no
    token attends to the ``dropped`` positions (a dropped token still sees itself,
    so its own row stays finite; it is never read).

    pos: position ids (default 0..L-1). deepstack: Qwen3-VL's features, added at
    ``visual_positions`` after the first layers by the stock text model's own code."""
    from adatp_core.hf.layers import cache_argument

    tm = model.model.language_model
    length = embeds.shape[1]
    pos = torch.arange(length)[None] if pos is None else pos
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    pruned = causal.clone()
    pruned[:, dropped] = False
    pruned[dropped, dropped] = True
    neg = torch.finfo(embeds.dtype).min

    def additive(allowed):
        return torch.zeros(1, 1, length, length, dtype=embeds.dtype).masked_fill(~allowed, neg)

    masks = (additive(causal), additive(pruned))
    hidden = embeds
    pe = tm.rotary_emb(hidden, pos)
    cache_arg = cache_argument(tm.layers[0])
    for i, block in enumerate(tm.layers):
        out = block(hidden, attention_mask=masks[i >= layer], position_ids=pos, position_embeddings=pe,
                    **{cache_arg: None})
        hidden = out[0] if isinstance(out, tuple) else out
        if i < len(deepstack):
            visual = torch.zeros(1, length, dtype=torch.bool)
            visual[0, visual_positions] = True
            hidden = tm._deepstack_process(hidden, visual, deepstack[i])
    return model.lm_head(tm.norm(hidden))[0].float()


def masked_reference(stock, llm, state, frames, token_ids, keep: torch.Tensor):
    """(masked, vanilla): logits [L + n, V] of the state's prompt followed by ``token_ids``
    through the stock model, with the visual tokens outside ``keep`` masked as keys at
    layers >= the state's K (masked), and with nothing masked (vanilla)."""
    prompt = state.prompt
    dropped_visual = torch.ones(state.num_visual, dtype=torch.bool)
    dropped_visual[keep] = False
    with torch.inference_mode():
        tokens = torch.tensor(token_ids, dtype=torch.long)
        embeds, pos, deepstack = stock_inputs(stock, prompt, stock_video_kwargs(llm, prompt, frames),
                                              new_tokens=len(tokens))
        full = torch.cat([embeds, stock.model.get_input_embeddings()(tokens)[None]], dim=1)
        extra = dict(pos=pos, deepstack=deepstack, visual_positions=prompt.visual_positions)
        masked = masked_logits(stock, full, prompt.visual_positions[dropped_visual], state.layer, **extra)
        vanilla = masked_logits(stock, full, torch.tensor([], dtype=torch.long), state.layer, **extra)
    return masked, vanilla



def subsequence_generation(model, embeds: torch.Tensor, kept: torch.Tensor, layer: int, pos, new_embeds,
                           new_pos, deepstack=(), visual_positions=None, visual_kept=None) -> torch.Tensor:
    """Logits [1 + n, V]: transformers' own decoder layers and own cache (``DynamicCache``, which
    holds a linear-attention layer's conv and recurrent states) doing what the spec defines as
    pruning at layer K, then n decode steps the way stock ``generate()`` takes them:
    - prefill: layers < K over the FULL prompt, layers >= K over its ``kept`` rows only, in
      order, at their original position ids (a linear layer's convolution and recurrence run
      over the kept subsequence; a full-attention layer holds the kept keys);
    - each decode step: one token through every layer, with that cache.
    Row 0 is the prompt's last position, row j the step after feeding ``new_embeds[:, j - 1]``.
    It shares nothing with adatp_core's caches, gathers or masks.

    embeds: [1, L, D]; kept: [m] long, sorted rows of ``embeds``; pos: position ids [3, 1, L].
    new_embeds: [1, n, D]; new_pos: [3, 1, n]. deepstack: Qwen3-VL's features, added at
    ``visual_positions`` (all of them below K, the ``visual_kept`` ones from K on)."""
    from transformers import DynamicCache

    from adatp_core.hf.layers import cache_argument

    tm = model.model.language_model
    cache_arg = cache_argument(tm.layers[0])
    cache = DynamicCache(config=tm.config)

    def visual_mask(rows, length):
        mask = torch.zeros(1, length, dtype=torch.bool)
        mask[0, rows] = True
        return mask

    def run(hidden, positions, layers, prefill: bool):
        pe = tm.rotary_emb(hidden, positions)
        for i in layers:
            if prefill and i == layer:  # from K on: the kept rows only
                hidden, positions = hidden[:, kept], positions[..., kept]
                pe = tm.rotary_emb(hidden, positions)
            out = tm.layers[i](hidden, attention_mask=None, position_ids=positions, position_embeddings=pe,
                               use_cache=True, **{cache_arg: cache})
            hidden = out[0] if isinstance(out, tuple) else out
            if prefill and i < len(deepstack):
                if i < layer:
                    hidden = tm._deepstack_process(hidden, visual_mask(visual_positions, hidden.shape[1]),
                                                   deepstack[i])
                else:
                    rows = torch.searchsorted(kept, visual_positions[visual_kept])
                    hidden = tm._deepstack_process(hidden, visual_mask(rows, hidden.shape[1]),
                                                   deepstack[i][visual_kept])
        if prefill and layer >= len(tm.layers):
            hidden = hidden[:, kept]
        return model.lm_head(tm.norm(hidden[:, -1:]))[0].float()

    logits = [run(embeds, pos, range(len(tm.layers)), prefill=True)]
    for j in range(new_embeds.shape[1]):
        logits.append(run(new_embeds[:, j:j + 1], new_pos[..., j:j + 1], range(len(tm.layers)), prefill=False))
    return torch.cat(logits)


def subsequence_reference(stock, llm, state, frames, token_ids, keep: torch.Tensor) -> torch.Tensor:
    """``subsequence_generation`` for the state's prompt pruned to ``keep`` at the state's K,
    feeding ``token_ids`` but the last: logits [len(token_ids), V], one per generated token."""
    prompt = state.prompt
    with torch.inference_mode():
        tokens = torch.tensor(token_ids[:-1], dtype=torch.long)
        embeds, pos, deepstack = stock_inputs(stock, prompt, stock_video_kwargs(llm, prompt, frames),
                                              new_tokens=len(tokens))
        length = embeds.shape[1]
        visual = torch.zeros(length, dtype=torch.bool)
        visual[prompt.visual_positions] = True
        visual[prompt.visual_positions[keep]] = False
        kept = (~visual).nonzero().squeeze(1)
        return subsequence_generation(stock, embeds, kept, state.layer, pos[..., :length],
                                      stock.model.get_input_embeddings()(tokens)[None], pos[..., length:],
                                      deepstack, visual_positions=prompt.visual_positions, visual_kept=keep)
