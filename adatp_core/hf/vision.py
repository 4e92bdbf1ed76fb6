"""The Qwen2.5-VL and Qwen3-VL vision towers with their attention batched.

transformers' vision attention splits q/k/v by ``cu_seqlens`` and, unless flash
attention is configured, calls attention once per window (Qwen2.5-VL) or per frame
(both families) in a Python loop, after a ``lengths.tolist()`` host sync. For a
32-frame video at 448x448 that is about a thousand kernel calls per layer.

``vision_forward`` runs the same tower with the module's own weights and
submodules, but lays the packed tokens out once per forward as a padded batch of
segments [B, L] and makes one ``scaled_dot_product_attention`` call per layer over
[B, heads, L, head_dim], with a key-padding mask only where segments are unequal.
When every segment has the same length (the usual case for windows and frames)
the layout is a plain reshape and no mask is passed, so sdpa can pick its flash
kernel on CUDA in half precision. The layouts are built once per forward (one small
host copy each) and reused by every layer: nothing syncs inside the layer loop.

It returns exactly what the stock module's forward returns for the same inputs:
a ``BaseModelOutputWithPooling`` (Qwen2.5-VL: ``last_hidden_state`` in window
order, ``pooler_output`` merged and put back in raster order) or, for Qwen3-VL,
``BaseModelOutputWithDeepstackFeatures`` with the DeepStack features.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.vision_utils import (
    get_vision_cu_seqlens,
    get_vision_interpolation_indices_and_weights,
    get_vision_position_ids,
    get_vision_window_index,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PaddedSegments:
    """Where packed tokens go in a padded batch of attention segments.

    batch, length: B segments, padded to L tokens each.
    slots: [N] long, token i sits at flat position ``slots[i]`` of [B*L]; None when
        every segment has length L (the layout is then a plain reshape).
    key_mask: [B, 1, 1, L] bool, True on real keys; None when there is no padding.
    """

    batch: int
    length: int
    slots: torch.Tensor | None
    key_mask: torch.Tensor | None


def padded_segments(cu_seqlens: torch.Tensor, device: torch.device) -> PaddedSegments:
    """Padded layout of the segments that ``cu_seqlens`` [S+1] delimits over N tokens.

    Runs once per forward (one small host copy); empty segments are dropped.
    """
    cu = cu_seqlens.detach().to("cpu", torch.long)
    lengths = cu[1:] - cu[:-1]
    starts = cu[:-1][lengths > 0]
    lengths = lengths[lengths > 0]
    batch, length = int(lengths.numel()), int(lengths.max())
    if bool((lengths == length).all()):
        return PaddedSegments(batch, length, None, None)
    segment = torch.repeat_interleave(torch.arange(batch), lengths)
    slots = torch.arange(int(lengths.sum())) - starts[segment] + segment * length
    key_mask = (torch.arange(length)[None, :] < lengths[:, None]).view(batch, 1, 1, length)
    return PaddedSegments(batch, length, slots.to(device), key_mask.to(device))


def segment_attention(attn, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      segments: PaddedSegments) -> torch.Tensor:
    """One vision attention module (``attn``: its qkv, proj, heads, scaling) over all segments at once.

    hidden: [N, dim] normed input; cos, sin: [N, head_dim] rotary tables; returns [N, dim].
    """
    n = hidden.shape[0]
    heads = attn.num_heads
    q, k, v = attn.qkv(hidden).reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    # The family's own rotary function, from the module that defines this attention class.
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    q, k = rotary(q, k, cos, sin)
    b, L = segments.batch, segments.length
    if segments.slots is None:
        q, k, v = (t.reshape(b, L, heads, -1).transpose(1, 2) for t in (q, k, v))
    else:
        q, k, v = (t.new_zeros(b * L, heads, t.shape[-1]).index_copy_(0, segments.slots, t)
                   .view(b, L, heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=segments.key_mask, scale=attn.scaling)
    out = out.transpose(1, 2).reshape(b * L, -1)
    if segments.slots is not None:
        out = out.index_select(0, segments.slots)
    return attn.proj(out)


def _block(blk, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: PaddedSegments):
    """A stock vision block (pre-norm attention, then pre-norm MLP) with ``segment_attention``."""
    hidden = hidden + segment_attention(blk.attn, blk.norm1(hidden), cos, sin, segments)
    return hidden + blk.mlp(blk.norm2(hidden))


def _qwen2_5_forward(visual, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
    merge = visual.spatial_merge_size
    position_ids = get_vision_position_ids(grid_thw, merge)
    window_index, cu_window_seqlens = get_vision_window_index(
        grid_thw, spatial_merge_size=merge, window_size=visual.window_size, patch_size=visual.patch_size)

    hidden = visual.patch_embed(pixel_values)
    n = hidden.shape[0]
    hidden = visual.permute_input_for_window_attn(hidden, window_index, seq_len=n)
    cos, sin = (visual.permute_input_for_window_attn(t, window_index, seq_len=n)
                for t in visual.rotary_pos_emb(hidden, position_ids))

    frames = padded_segments(get_vision_cu_seqlens(grid_thw), hidden.device)
    windows = padded_segments(cu_window_seqlens, hidden.device)
    for layer, blk in enumerate(visual.blocks):
        hidden = _block(blk, hidden, cos, sin, frames if layer in visual.fullatt_block_indexes else windows)

    merged = visual.merger(hidden)[torch.argsort(window_index)]
    return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=merged)


def _qwen3_forward(visual, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    interp_indices, interp_weights = get_vision_interpolation_indices_and_weights(
        grid_thw, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
        align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.config.spatial_merge_size)
    position_ids = get_vision_position_ids(grid_thw, visual.spatial_merge_size)

    hidden = visual.patch_embed(pixel_values)
    pos_embeds = (visual.pos_embed(interp_indices) * interp_weights[:, :, None]).sum(1)
    hidden = hidden + pos_embeds.to(hidden.dtype)
    cos, sin = visual.rotary_pos_emb(hidden, position_ids)

    frames = padded_segments(get_vision_cu_seqlens(grid_thw), hidden.device)
    deepstack = []
    deepstack_layers = getattr(visual, "deepstack_visual_indexes", ())  # none in Qwen3.5's tower
    for layer, blk in enumerate(visual.blocks):
        hidden = _block(blk, hidden, cos, sin, frames)
        if layer in deepstack_layers:
            deepstack.append(visual.deepstack_merger_list[visual.deepstack_visual_indexes.index(layer)](hidden))

    return BaseModelOutputWithDeepstackFeatures(
        last_hidden_state=hidden, pooler_output=visual.merger(hidden), deepstack_features=deepstack)


def vision_forward(visual, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
    """``visual(pixel_values, grid_thw=grid_thw)`` with one attention call per layer.

    visual: transformers' Qwen2.5-VL (``Qwen2_5_VisionTransformerPretrainedModel``) or
        Qwen3-VL (``Qwen3VLVisionModel``) vision tower, e.g. ``model.model.visual``.
    pixel_values: [P, C*t*p*p] flattened patches, as the HF processor makes them.
    grid_thw: [M, 3] long, (t, h, w) patches per image or video.
    Returns what the stock forward returns (see the module docstring). A tower dispatched by
    accelerate (``_hf_hook`` on a module: weights offloaded or split over devices) runs its own
    forward, since calling its submodules directly would skip the hooks that move the weights.
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeVisionModel
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

    qwen3_towers = (Qwen3VLVisionModel, Qwen3VLMoeVisionModel, Qwen3_5VisionModel, Qwen3_5MoeVisionModel)
    if not isinstance(visual, (Qwen2_5_VisionTransformerPretrainedModel, *qwen3_towers)):
        raise TypeError(f"vision_forward supports the Qwen2.5-VL, Qwen3-VL and Qwen3.5 vision towers, "
                        f"not {type(visual).__name__}; call the module itself instead.")
    if any(hasattr(module, "_hf_hook") for module in visual.modules()):
        log.info("Vision tower has accelerate hooks (device_map offload): using transformers' own forward.")
        return visual(pixel_values, grid_thw=grid_thw)
    if isinstance(visual, Qwen2_5_VisionTransformerPretrainedModel):
        return _qwen2_5_forward(visual, pixel_values, grid_thw)
    return _qwen3_forward(visual, pixel_values, grid_thw)
