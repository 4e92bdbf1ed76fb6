"""Independent references for the exactness tests.

``masked_logits`` runs the FULL sequence through the stock decoder layers, with
no cache and no gathering: at layers >= K the keys of the dropped visual tokens
are masked out. It shares nothing with adatp_core's continuation path (no
KVCache, no kept-position gather, no position-id handling)."""

from __future__ import annotations

import torch


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


def masked_logits(model, embeds: torch.Tensor, dropped: torch.Tensor, layer: int) -> torch.Tensor:
    """Logits [L, V] of a full-sequence forward where, at layers >= ``layer``, no
    token attends to the ``dropped`` positions (a dropped token still sees itself,
    so its own row stays finite; it is never read)."""
    from adatp_core.models.base import _cache_argument

    tm = model.model.language_model
    length = embeds.shape[1]
    pos = torch.arange(length)[None]
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
    cache_arg = _cache_argument(tm.layers[0])
    for i, block in enumerate(tm.layers):
        out = block(hidden, attention_mask=masks[i >= layer], position_ids=pos, position_embeddings=pe,
                    **{cache_arg: None})
        hidden = out[0] if isinstance(out, tuple) else out
    return model.lm_head(tm.norm(hidden))[0].float()
