"""LLaVA-OneVision (transformers' LlavaOnevisionForConditionalGeneration).

Token layout: SigLIP at 384 px with patch 14 gives 27x27 patches per frame; the
projector maps them into the LLM space and bilinear pooling brings them to
14x14 = 196 tokens per frame. ONE ``image_newline`` token follows the whole video,
so the video occupies T*196 + 1 positions, all marked with the video token id.
The newline is always kept.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import AdaTPInputError
from ..flops import VisionShape, vision_flops
from ..hf.versions import transformers_boundary
from .base import Encoded, Prompt, VideoLLMAdapter, VideoPlan, frame_times
from .chat import question_tokens, read_chat_template, split_template, tokenize_question, video_prefix_refusal
from .preprocess import PreprocessConfig, preprocess_frames


def bilinear_pool_matrix(in_size: tuple[int, int], out_size: tuple[int, int]) -> torch.Tensor:
    """The bilinear resize ``in_size -> out_size`` (align_corners False, no
    antialias: transformers' ``apply_pooling``) as a matrix.

    Resizing is linear, so resizing every channel of an [h, w] map is one product
    ``P @ x`` with x: [h*w, C] row-major. P is built by resizing the identity basis
    with the same ``F.interpolate`` call, in float64. Returns P: [h'*w', h*w] float64.
    """
    h, w = in_size
    basis = torch.eye(h * w, dtype=torch.float64).view(h * w, 1, h, w)
    resized = F.interpolate(basis, size=tuple(out_size), mode="bilinear", align_corners=False)
    return resized.reshape(h * w, -1).t().contiguous()


def pool_with_matrix(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Apply a pooling matrix to every frame in one batched matmul.

    features: [T, P, C]. weights, as from ``pool_weights``: [P', P] of the
    features' dtype or of float32 (the features are then multiplied in float32
    and rounded back once), or [P', 2P] (high | low parts of the features' dtype:
    weights with ~16 significant bits, accumulated in float32, rounded once).
    Returns [T, P', C] in the features' dtype.
    """
    if weights.shape[1] == 2 * features.shape[1]:
        return torch.matmul(weights, torch.cat([features, features], dim=1))
    if weights.dtype != features.dtype:
        return torch.matmul(weights, features.to(weights.dtype)).to(features.dtype)
    return torch.matmul(weights, features)


def pool_weights(matrix: torch.Tensor, device, dtype: torch.dtype, split: bool | None = None) -> torch.Tensor:
    """``matrix`` [P', P] float64 as the weights ``pool_with_matrix`` takes for
    features of ``dtype`` on ``device``. For dtypes with fewer than 24 significant
    bits: with ``split`` a [P', 2P] high | low split in ``dtype`` (a tensor-core GEMM),
    else float32 weights. ``split`` None: split on CUDA only (CPUs multiply bf16 far
    slower than float32)."""
    device = torch.device(device)
    if torch.finfo(dtype).bits >= 32:
        return matrix.to(device=device, dtype=dtype)
    if not (device.type == "cuda" if split is None else split):
        return matrix.to(device=device, dtype=torch.float32)
    high = matrix.to(dtype)
    low = (matrix - high.double()).to(dtype)
    return torch.cat([high, low], dim=1).to(device)


class LlavaOnevisionAdapter(VideoLLMAdapter):
    model_types = ("llava_onevision",)
    model_class = "LlavaOnevisionForConditionalGeneration"
    unquantized_modules = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
    input_modules = ("model.vision_tower", "model.multi_modal_projector", "model.image_newline",
                     "model.language_model.embed_tokens")

    def __init__(self, model, tokenizer, folder: Path, vision_chunk: int = 16):
        super().__init__(model, tokenizer)
        self.folder = Path(folder)
        self.preprocess_config = PreprocessConfig.from_folder(self.folder)
        self.chat_template = read_chat_template(self.folder, tokenizer)
        self.video_token_id = int(model.config.video_token_id)
        self.vision_chunk = vision_chunk
        vc = model.config.vision_config
        self.patch_grid = vc.image_size // vc.patch_size  # 27
        self.pooled_grid = -(-self.patch_grid // 2)  # ceil(27 / 2) = 14
        self._template_parts = split_template(tokenizer, self.chat_template, "<video>")
        self.always_thinks = self._template_parts.thinks
        self.prefix_refusal = video_prefix_refusal(tokenizer, self.chat_template, "<video>")
        self._pool_cache: dict = {}  # (grid, device, dtype) -> pooling weights

    # -- model parts ----------------------------------------------------------------
    @property
    def text_model(self):
        return self.model.model.language_model

    @property
    def tokens_per_frame(self) -> int:
        return self.pooled_grid * self.pooled_grid

    # -- vision ---------------------------------------------------------------------
    def plan_video(self, num_frames: int, height: int, width: int, times=None,
                   max_pixels: int | None = None) -> VideoPlan:
        """Every frame is resized to 384x384 (max_pixels does not apply)."""
        cfg = self.preprocess_config
        times, assumed = frame_times(num_frames, times)
        return VideoPlan(num_frames=num_frames, size=(cfg.height, cfg.width),
                         grid=(num_frames, self.pooled_grid, self.pooled_grid),
                         frame_times=times, times_assumed=assumed)

    def preprocess(self, frames: torch.Tensor, plan: VideoPlan | None = None) -> torch.Tensor:
        """frames [T, H, W, 3] (uint8 or float 0..1) -> pixels [T, 3, 384, 384]."""
        return preprocess_frames(frames, self.preprocess_config, device=self.device, dtype=self.dtype)

    def _selected_vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """SigLIP hidden state at ``vision_feature_layer`` (no post-layernorm), [t, P, d_v].

        Runs only the encoder layers that the selected layer needs.
        """
        cfg = self.model.config
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise AdaTPInputError("vision_feature_layer lists several layers; only one is supported")
        tower = self.model.model.vision_tower
        layers = tower.encoder.layers
        stop = layer % (len(layers) + 1)  # hidden_states[0] is the embeddings' output
        hidden = tower.embeddings(pixels)
        for block in layers[:stop]:
            out = block(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out
        if cfg.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        return hidden

    def vision_shape(self, plan: VideoPlan | None = None):
        """The vision side's shape per frame, for FLOPs and memory accounting (every frame is 384x384:
        ``plan`` changes nothing)."""
        vc = self.model.config.vision_config
        layers = self.model.config.vision_feature_layer % (vc.num_hidden_layers + 1)
        return VisionShape(layers=layers, hidden=vc.hidden_size, intermediate=vc.intermediate_size,
                           patches=self.patch_grid ** 2, patch_dim=3 * vc.patch_size ** 2,
                           projector_out=self.model.config.text_config.hidden_size)

    def vision_flops(self, prompt: Prompt) -> float:
        return vision_flops(self.vision_shape(), len(prompt.visual_positions) // self.tokens_per_frame)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """transformers' ``apply_pooling`` (bilinear 27x27 -> 14x14) as one matmul.

        features: [t, 27*27, D] projected patches -> [t, 14*14, D]. A resize kernel
        over thousands of channels is memory-bound and slow on GPUs; the same
        linear map as a [196, 729] matrix is a small GEMM. The matrix is built
        once per (grid, device, dtype) and kept on this adapter.
        """
        key = (self.patch_grid, self.pooled_grid, features.device, features.dtype)
        weights = self._pool_cache.get(key)
        if weights is None:
            matrix = bilinear_pool_matrix((self.patch_grid,) * 2, (self.pooled_grid,) * 2)
            weights = self._pool_cache[key] = pool_weights(matrix, features.device, features.dtype)
        return pool_with_matrix(features, weights)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, plan: VideoPlan | None = None) -> Encoded:
        """pixels [T, 3, 384, 384] -> visual tokens [T*196, D] and per-frame features."""
        mm = self.model.model
        visual, frame_features = [], []
        with transformers_boundary(self.family, "the vision tower"):
            for i in range(0, pixels.shape[0], self.vision_chunk):
                feats = self._selected_vision_features(pixels[i:i + self.vision_chunk])
                frame_features.append(F.normalize(feats.float().mean(dim=1), dim=-1))
                projected = self.pool(mm.multi_modal_projector(feats))
                visual.append(projected.reshape(-1, projected.shape[-1]))
        t = pixels.shape[0]
        return Encoded(
            visual=torch.cat(visual),
            extras=mm.image_newline.detach()[None].to(self.dtype),
            frame_features=torch.cat(frame_features),
            grid=(t, self.pooled_grid, self.pooled_grid),
        )

    # -- prompt ---------------------------------------------------------------------
    def tokenize_question(self, question: str) -> list[int]:
        return tokenize_question(self.tokenizer, question)

    def build_prompt(self, question: str, video) -> Prompt:
        """[before] [video x N] [newline] [middle] [question] [after].

        video: a VideoPlan, or the number of visual tokens N."""
        plan = video if isinstance(video, VideoPlan) else None
        num_video_tokens = plan.num_tokens if plan is not None else int(video)
        before, middle, after = self._template_parts[:3]
        q, q_from, q_to = question_tokens(self.tokenizer, self._template_parts, question)
        n_total = num_video_tokens + 1  # + the newline
        ids = before + [self.video_token_id] * n_total + middle + q + after
        start = len(before)
        q_start = start + n_total + len(middle)
        return Prompt(
            input_ids=torch.tensor(ids, dtype=torch.long),
            visual_positions=torch.arange(start, start + num_video_tokens),
            extra_positions=torch.tensor([start + num_video_tokens]),
            question=(q_start + q_from, q_start + q_to),
            after_video=start + n_total,
            plan=plan,
        )
