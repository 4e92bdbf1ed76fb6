"""Qwen2.5-VL (transformers' Qwen2_5_VLForConditionalGeneration); also the base of Qwen3-VL.

Token layout: each frame is resized to multiples of 28 px within a pixel budget;
two consecutive frames form one temporal patch (an odd count is padded with the
last frame), and the vision tower's 2x2 merger gives (H/28)*(W/28) tokens per
temporal patch, so the token grid is (ceil(T/2), H/28, W/28). The prompt is
``<|vision_start|>`` + one ``<|video_pad|>`` per token + ``<|vision_end|>``.
Position ids are 3-D M-RoPE from transformers' own ``get_rope_index``; temporal
ids advance by ``tokens_per_second`` x seconds per temporal patch, which comes
from the sampled frames' times.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import AdaTPInputError
from ..flops import VisionShape, vision_flops
from ..memory import fallback_allowed
from .base import FALLBACK_BATCHED_VISION, MODEL_BUDGET, Encoded, Prompt, VideoLLMAdapter, VideoPlan, frame_times
from .chat import question_tokens, read_chat_template, split_template, tokenize_question, video_prefix_refusal
from .preprocess import PreprocessConfig, QwenPreprocessConfig, patchify_video, preprocess_frames, qwen_resize_target
from ..hf.versions import transformers_boundary
from ..hf.vision import vision_forward

# AdaTP's default pixel budget per frame: 448x448. With 32 frames that is 4,096
# video tokens for Qwen2.5-VL (3,136 for Qwen3-VL), which fits a 7B/8B model in
# bf16 on a 24 GB card with room for the vision tower's activations.
DEFAULT_MAX_PIXELS = 448 * 448
VIDEO_PAD = "<|video_pad|>"
log = logging.getLogger(__name__)


def _vision_outputs(out):
    """(merged tokens, pre-merger patches, DeepStack features) of a vision tower's output."""
    return out.pooler_output, out.last_hidden_state, tuple(getattr(out, "deepstack_features", None) or ())


class Qwen2_5_VLAdapter(VideoLLMAdapter):
    model_types = ("qwen2_5_vl",)
    model_class = "Qwen2_5_VLForConditionalGeneration"
    unquantized_modules = ("model.visual", "lm_head")
    input_modules = ("model.visual", "model.language_model.embed_tokens")
    whole_video_budget = False  # Qwen2.5-VL's max_pixels bounds each frame
    mrope = True  # the context bounds the largest position id (check_context)
    video_processor_class = "Qwen2VLVideoProcessor"  # transformers' class, whose unset settings apply
    processor_defaults = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
                          "image_mean": [0.48145466, 0.4578275, 0.40821073],
                          "image_std": [0.26862954, 0.26130258, 0.27577711]}

    def __init__(self, model, tokenizer, folder: Path):
        super().__init__(model, tokenizer)
        self.folder = Path(folder)
        self.preprocess_config = QwenPreprocessConfig.from_folder(
            self.folder, self.whole_video_budget, self.processor_defaults, self.video_processor_class)
        vc = model.config.vision_config
        cfg = self.preprocess_config
        if (cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size) != (
                vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size):
            raise AdaTPInputError(
                f"{self.folder}: the video processor's patch sizes do not match the model's vision config; "
                "download the model's preprocessor files again.")
        self.chat_template = read_chat_template(self.folder, tokenizer)
        self.video_token_id = int(model.config.video_token_id)
        self._template_parts = split_template(tokenizer, self.chat_template, VIDEO_PAD)
        self.always_thinks = self._template_parts.thinks
        self.prefix_refusal = video_prefix_refusal(tokenizer, self.chat_template, VIDEO_PAD)

    # -- model parts ----------------------------------------------------------------
    @property
    def text_model(self):
        return self.model.model.language_model

    @property
    def visual(self):
        return self.model.model.visual

    # -- vision ---------------------------------------------------------------------
    def plan_video(self, num_frames: int, height: int, width: int, times=None,
                   max_pixels: int | None = None) -> VideoPlan:
        cfg = self.preprocess_config
        budget = None if max_pixels == MODEL_BUDGET else (max_pixels or DEFAULT_MAX_PIXELS)
        h, w = qwen_resize_target(num_frames, height, width, cfg, budget)
        steps = -(-num_frames // cfg.temporal_patch_size)
        times, assumed = frame_times(num_frames, times)
        return VideoPlan(num_frames=num_frames, size=(h, w), grid=(steps, h // cfg.factor, w // cfg.factor),
                         frame_times=times, times_assumed=assumed, frames_per_step=cfg.temporal_patch_size)

    def budget_text(self, plan: VideoPlan, max_pixels) -> str:
        cfg = self.preprocess_config
        if max_pixels != MODEL_BUDGET:
            pixels = max_pixels or DEFAULT_MAX_PIXELS
            whose = "set" if max_pixels else "the pack's default, 448x448"
            return f"{pixels:,} px per frame ({whose})"
        budget = cfg.model_budget(plan.num_frames)
        spread = (f"{budget:,} px over the {plan.num_frames} frames" if cfg.whole_video
                  else f"{budget:,} px per frame")
        cap = "per-frame cap on" if cfg.cap_pixels_per_frame else "no per-frame cap"
        return f"the model's: {spread} (its video processor, {cap})"

    def processor_sampling(self) -> tuple[float, int, int]:
        if self.preprocess_config.sampling is None:
            return super().processor_sampling()
        return self.preprocess_config.sampling

    def _plan_for(self, frames: torch.Tensor, plan: VideoPlan | None) -> VideoPlan:
        return plan if plan is not None else self.plan_video(*(int(x) for x in frames.shape[:3]))

    def preprocess(self, frames: torch.Tensor, plan: VideoPlan | None = None) -> torch.Tensor:
        """frames [T, H, W, 3] (uint8 or float 0..1) -> flat patches
        [T' * (h/14) * (w/14), 3 * 2 * 14 * 14] (the HF video processor's pixel_values_videos)."""
        plan = self._plan_for(frames, plan)
        cfg = self.preprocess_config
        norm = PreprocessConfig(height=plan.size[0], width=plan.size[1], mode=cfg.normalise.mode,
                                rescale_factor=cfg.normalise.rescale_factor, mean=cfg.normalise.mean,
                                std=cfg.normalise.std)
        pixels = preprocess_frames(frames, norm, device=self.device, dtype=torch.float32)
        return patchify_video(pixels, cfg).to(self.dtype)

    def grid_thw(self, plan: VideoPlan) -> torch.Tensor:
        """[1, 3] long: the vision tower's (T', h/14, w/14) patch grid (video_grid_thw)."""
        m = self.preprocess_config.merge_size
        t, h, w = plan.grid
        return torch.tensor([[t, h * m, w * m]], dtype=torch.long, device=self.device)

    def _vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        """The vision tower, its attention batched (hf/vision.py, the stock output):
        (merged tokens [N, D], pre-merger patches [P, d_v], deepstack features, one
        [N, D] per DeepStack layer; empty for Qwen2.5-VL).

        If the batched path raises (a kernel this device lacks, a transformers change), the
        stock tower recomputes the whole output, and this model keeps the stock tower until
        it is reloaded (``fallbacks``; the stats say so). Running out of memory and
        interrupts are not retried (memory.fallback_allowed)."""
        pixel_values = pixel_values.type(self.visual.dtype)
        if FALLBACK_BATCHED_VISION not in self.fallbacks:
            try:
                return _vision_outputs(vision_forward(self.visual, pixel_values, grid_thw))
            except Exception as exc:
                if not fallback_allowed(exc):
                    raise
                self.fallbacks[FALLBACK_BATCHED_VISION] = (
                    f"batched vision attention failed ({type(exc).__name__}: {str(exc)[:200]}); "
                    "the stock vision tower runs until the model is reloaded")
                log.warning("%s", self.fallbacks[FALLBACK_BATCHED_VISION], exc_info=True)
        return _vision_outputs(self.visual(pixel_values, grid_thw=grid_thw))

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, plan: VideoPlan | None = None) -> Encoded:
        """pixels [P, patch_dim] -> visual tokens [T'*H'*W', D] and per-step features [T', d_v].

        A step's feature is the mean of its pre-merger patches (the window order of
        Qwen2.5-VL's tower keeps each temporal patch's rows together)."""
        if plan is None:
            raise AdaTPInputError("Qwen models need the video plan to encode; call plan_video first")
        with transformers_boundary(self.family, "the vision tower"):
            merged, patches, deepstack = self._vision(pixels, self.grid_thw(plan))
        steps = plan.grid[0]
        frame_features = F.normalize(patches.float().reshape(steps, -1, patches.shape[-1]).mean(dim=1), dim=-1)
        return Encoded(visual=merged, extras=merged.new_zeros((0, merged.shape[-1])),
                       frame_features=frame_features, grid=plan.grid,
                       injections=tuple(f.to(self.dtype) for f in deepstack))

    def vision_shape(self, plan: VideoPlan):
        """The vision side's shape per temporal patch, for FLOPs accounting."""
        vc = self.model.config.vision_config
        m = vc.spatial_merge_size
        patches = plan.tokens_per_step * m * m
        window = (vc.window_size // vc.patch_size) ** 2
        return VisionShape(layers=vc.depth, hidden=vc.hidden_size, intermediate=vc.intermediate_size,
                           patches=patches, patch_dim=3 * vc.temporal_patch_size * vc.patch_size ** 2,
                           projector_out=vc.out_hidden_size, mlp_matrices=3, window=window,
                           full_layers=len(vc.fullatt_block_indexes), projector_tokens=patches // (m * m),
                           projector_in=vc.hidden_size * m * m)

    def vision_flops(self, prompt: Prompt) -> float:
        return vision_flops(self.vision_shape(prompt.plan), prompt.plan.grid[0])

    # -- prompt ---------------------------------------------------------------------
    def tokenize_question(self, question: str) -> list[int]:
        return tokenize_question(self.tokenizer, question)

    def video_tokens(self, plan: VideoPlan) -> list[int]:
        """The ids that replace the template's ``<|video_pad|>``: one per visual token."""
        return [self.video_token_id] * plan.num_tokens

    def build_prompt(self, question: str, video) -> Prompt:
        """[before] [video] [middle] [question] [after], the video as ``video_tokens``."""
        if not isinstance(video, VideoPlan):
            raise AdaTPInputError("Qwen prompts need a video plan (plan_video), not a token count")
        before, middle, after = self._template_parts[:3]
        q, q_from, q_to = question_tokens(self.tokenizer, self._template_parts, question)
        vid = self.video_tokens(video)
        ids = torch.tensor(before + vid + middle + q + after, dtype=torch.long)
        in_video = torch.zeros(len(ids), dtype=torch.bool)
        in_video[len(before):len(before) + len(vid)] = True
        visual_positions = ((ids == self.video_token_id) & in_video).nonzero().squeeze(1)
        q_start = len(before) + len(vid) + len(middle)
        return Prompt(input_ids=ids, visual_positions=visual_positions,
                      extra_positions=torch.zeros(0, dtype=torch.long), question=(q_start + q_from, q_start + q_to),
                      after_video=int(visual_positions[-1]) + 1, plan=video)

    def _rope_kwargs(self, plan: VideoPlan) -> dict:
        """Qwen2.5-VL: temporal ids scale with the seconds per temporal patch."""
        return {"second_per_grid_ts": torch.tensor([plan.seconds_per_step()], device=self.device)}

    def position_ids(self, prompt: Prompt) -> torch.Tensor:
        """[3, 1, L] M-RoPE position ids from transformers' own ``get_rope_index``."""
        ids = prompt.input_ids[None].to(self.device)
        token_types = torch.zeros_like(ids, dtype=torch.int)
        token_types[0, prompt.visual_positions.to(self.device)] = 2  # video
        with transformers_boundary(self.family, "the position ids (get_rope_index)"):
            position_ids, _ = self.model.model.get_rope_index(
                ids, mm_token_type_ids=token_types, video_grid_thw=self.grid_thw(prompt.plan),
                attention_mask=torch.ones_like(ids), **self._rope_kwargs(prompt.plan))
        return position_ids
