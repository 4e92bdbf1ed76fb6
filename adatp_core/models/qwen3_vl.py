"""Qwen3-VL (transformers' Qwen3VLForConditionalGeneration).

As Qwen2.5-VL (qwen2_5_vl.py), with these differences, each read from transformers:
- 16 px patches, so 32 px per token side, and the pixel budget covers the whole
  video (Qwen3VLVideoProcessor's smart_resize); AdaTP's budget stays per frame.
- The prompt gives each temporal patch its time: ``<{t:.1f} seconds>`` then
  ``<|vision_start|>`` + its tokens + ``<|vision_end|>``, where t is the mean time
  of the patch's two frames (Qwen3VLProcessor). That text is always kept.
- Interleaved M-RoPE; every temporal patch is its own grid in ``get_rope_index``.
- DeepStack: the vision tower also returns features that the text model adds to
  the visual tokens' hidden states after decoder layers 0..2. Layers below K get
  all of them; layers >= K only the kept tokens' (``Encoded.injections``).
"""

from __future__ import annotations

from ..flops import VisionShape
from .base import VideoPlan
from .qwen2_5_vl import Qwen2_5_VLAdapter


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    model_types = ("qwen3_vl",)
    model_class = "Qwen3VLForConditionalGeneration"
    whole_video_budget = True
    video_processor_class = "Qwen3VLVideoProcessor"
    processor_defaults = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
                          "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}

    def __init__(self, model, tokenizer, folder):
        super().__init__(model, tokenizer, folder)
        cfg = model.config
        self._vision_start = [int(cfg.vision_start_token_id)]
        self._vision_end = [int(cfg.vision_end_token_id)]

    def video_tokens(self, plan: VideoPlan) -> list[int]:
        """Per temporal patch: its timestamp text, <|vision_start|>, its tokens, <|vision_end|>."""
        ids: list[int] = []
        for t in plan.step_times():
            ids += self.tokenizer(f"<{t:.1f} seconds>", add_special_tokens=False)["input_ids"]
            ids += self._vision_start + [self.video_token_id] * plan.tokens_per_step + self._vision_end
        return ids

    def _rope_kwargs(self, plan: VideoPlan) -> dict:
        return {}  # time is in the prompt's text, not in the position ids

    def vision_shape(self, plan: VideoPlan):
        """Full attention in every block; the merger and one DeepStack merger per feature."""
        vc = self.model.config.vision_config
        m = vc.spatial_merge_size
        patches = plan.tokens_per_step * m * m
        return VisionShape(layers=vc.depth, hidden=vc.hidden_size, intermediate=vc.intermediate_size,
                           patches=patches, patch_dim=3 * vc.temporal_patch_size * vc.patch_size ** 2,
                           projector_out=vc.out_hidden_size, projector_tokens=patches // (m * m),
                           projector_in=vc.hidden_size * m * m,
                           projectors=1 + len(getattr(vc, "deepstack_visual_indexes", None) or ()))
