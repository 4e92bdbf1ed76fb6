"""Frame preprocessing in plain torch (no torchvision, which CI cannot import).

It reproduces what transformers' fast video processors do on decoded uint8
frames: resize with antialiasing (torchvision's uint8 path: compute in float,
round and clamp back to 0..255), then rescale and normalise. A test compares it
with the HF video processor whenever torchvision is importable.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import AdaTPInputError
from ..hf.video_processor import processor_class_defaults

# PIL resampling codes used in HF preprocessor configs.
_RESAMPLE = {2: "bilinear", 3: "bicubic"}
# Where a folder keeps its video processor's settings, in transformers' order of
# preference: transformers 5 saves every sub-processor nested in processor_config.json
# (its "video_processor" entry); older folders have the separate files.
PROCESSOR_FILE = "processor_config.json"
PREPROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdaTPInputError(f"{path} cannot be read as JSON ({exc}); download it again.") from exc
    if not isinstance(data, dict):
        raise AdaTPInputError(f"{path} does not hold a JSON object; download it again.")
    return data


def read_video_processor_config(folder: Path) -> tuple[dict, Path]:
    """(settings, the file they came from) of a model folder's video processor.

    The order is transformers 5.24's (``get_video_processor_dict``): the "video_processor"
    entry of processor_config.json, then video_preprocessor_config.json, then
    preprocessor_config.json; last, the "image_processor" entry of processor_config.json
    (a folder saved with only an image processor: the same resize and normalisation).
    """
    folder = Path(folder)
    nested_path = folder / PROCESSOR_FILE
    nested = _read_json(nested_path) if nested_path.is_file() else {}
    if isinstance(nested.get("video_processor"), dict):
        return nested["video_processor"], nested_path
    for name in PREPROCESSOR_FILES:
        path = folder / name
        if path.is_file():
            return _read_json(path), path
    if isinstance(nested.get("image_processor"), dict):
        return nested["image_processor"], nested_path
    raise AdaTPInputError(
        f"{folder} has no video processor settings ({PROCESSOR_FILE} with a video_processor entry, or "
        f"{' or '.join(PREPROCESSOR_FILES)}); copy them from the model's Hugging Face repository into the folder.")


def has_video_processor_config(folder: Path) -> bool:
    """Whether ``read_video_processor_config`` finds settings (without raising)."""
    try:
        read_video_processor_config(folder)
    except AdaTPInputError:
        return False
    return True


@dataclass(frozen=True)
class PreprocessConfig:
    """Resize target and normalisation of a video processor."""

    height: int
    width: int
    mode: str = "bicubic"
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        if self.mode not in ("bilinear", "bicubic"):
            raise AdaTPInputError(f"unsupported resampling {self.mode!r}; use bilinear or bicubic")
        if self.height < 1 or self.width < 1:
            raise AdaTPInputError(f"bad resize target {self.height}x{self.width}")

    @classmethod
    def from_folder(cls, folder: Path) -> "PreprocessConfig":
        """Read the video processor config of a model folder (``read_video_processor_config``)."""
        cfg, path = read_video_processor_config(folder)
        return cls.from_dict(cfg, source=path)

    @classmethod
    def from_dict(cls, cfg: dict, source="config") -> "PreprocessConfig":
        size = cfg.get("size") or {}
        if "height" in size and "width" in size:
            h, w = int(size["height"]), int(size["width"])
        elif "shortest_edge" in size:
            h = w = int(size["shortest_edge"])
        else:
            raise AdaTPInputError(f"{source}: 'size' needs height and width, got {size!r}")
        resample = cfg.get("resample", 3)
        if resample not in _RESAMPLE:
            raise AdaTPInputError(f"{source}: resample={resample} is not supported (2 or 3)")
        return cls(
            height=h, width=w, mode=_RESAMPLE[resample],
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0,
            mean=tuple(cfg.get("image_mean", (0.5, 0.5, 0.5))) if cfg.get("do_normalize", True) else (0.0,) * 3,
            std=tuple(cfg.get("image_std", (0.5, 0.5, 0.5))) if cfg.get("do_normalize", True) else (1.0,) * 3,
        )


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """[T, H, W, 3] uint8, or float in 0..1 (ComfyUI IMAGE) -> uint8.

    Float frames are quantised to 8 bits, as every decoded video frame is.
    """
    if frames.dtype == torch.uint8:
        return frames
    return (frames.float() * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def resize_uint8(x: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """Antialiased resize of uint8 [t, 3, H, W], the way torchvision does it:
    on CPU torch's native uint8 kernel, elsewhere float then clamp and round.
    Returns float32 holding integers 0..255."""
    if x.device.type == "cpu":
        try:
            return F.interpolate(x, size=(height, width), mode=mode, align_corners=False, antialias=True).float()
        except RuntimeError:  # an old torch without the uint8 kernel
            pass
    y = F.interpolate(x.float(), size=(height, width), mode=mode, align_corners=False, antialias=True)
    return y.clamp_(0, 255).round_()


def preprocess_frames(frames: torch.Tensor, cfg: PreprocessConfig, device=None,
                      dtype=torch.float32, chunk: int = 16) -> torch.Tensor:
    """Resize and normalise frames for a vision encoder.

    frames: [T, H, W, 3] uint8, or float 0..1.
    Returns [T, 3, cfg.height, cfg.width] in ``dtype`` on ``device``.
    Works ``chunk`` frames at a time, so large frames never exist in float all at once.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise AdaTPInputError(f"frames must be [T, H, W, 3], got {tuple(frames.shape)}")
    device = torch.device(device) if device is not None else frames.device
    mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1) / cfg.rescale_factor
    std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1) / cfg.rescale_factor
    out = torch.empty((frames.shape[0], 3, cfg.height, cfg.width), dtype=dtype, device=device)
    for i in range(0, frames.shape[0], chunk):
        x = to_uint8(frames[i:i + chunk]).to(device).permute(0, 3, 1, 2)
        if x.shape[-2:] != (cfg.height, cfg.width):
            x = resize_uint8(x, cfg.height, cfg.width, cfg.mode)
        out[i:i + chunk] = x.float().sub_(mean).div_(std).to(dtype)
    return out


# -- Qwen2.5-VL and Qwen3-VL: dynamic resolution and temporal patches ------------------


@dataclass(frozen=True)
class QwenPreprocessConfig:
    """Qwen's video processor settings (Qwen2VLVideoProcessor, Qwen3VLVideoProcessor).

    min_pixels / max_pixels: the resize budget (``size`` shortest_edge / longest_edge).
    whole_video: True when max_pixels bounds all frames together (Qwen3-VL),
        False when it bounds each frame (Qwen2.5-VL).
    cap_pixels_per_frame, max_video_tokens: the processor's per-frame cap (qwen-vl-utils'), applied
        to the model's own budget only, where the installed transformers has the switch and the folder
        or the release turns it on (``qwen_resize_target``).
    sampling: (fps, min_frames, max_frames) of a processor that samples frames itself (Qwen3-VL's),
        else None (Qwen2-VL's processor takes every frame it is given).
    """

    normalise: PreprocessConfig
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    whole_video: bool = False
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 768
    sampling: tuple[float, int, int] | None = None

    @property
    def factor(self) -> int:
        """Frame sides are resized to multiples of this (28 for Qwen2.5-VL, 32 for Qwen3-VL)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_folder(cls, folder: Path, whole_video: bool, defaults: dict,
                    processor_class: str | None = None) -> "QwenPreprocessConfig":
        """Read a Qwen model folder's video processor config (``read_video_processor_config``).

        What the folder leaves unset comes from ``defaults``, then from the installed transformers'
        ``processor_class`` (its fps, frame limits and per-frame cap: hf/video_processor.py)."""
        found, path = read_video_processor_config(folder)
        installed = processor_class_defaults(processor_class) if processor_class else {}
        cfg = {**defaults, **found}
        setting = {**installed, **cfg}.get
        # the cap exists only where the installed release has the switch; None there means off
        cap = bool(setting("cap_pixels_per_frame")) if "cap_pixels_per_frame" in installed else False
        fps, sampling = setting("fps"), None
        if setting("do_sample_frames") and fps:
            sampling = (float(fps), int(setting("min_frames") or 1), int(setting("max_frames") or 1 << 30))
        size = dict(cfg.get("size") or {})
        min_pixels = cfg.get("min_pixels") or size.get("shortest_edge")
        max_pixels = cfg.get("max_pixels") or size.get("longest_edge")
        if not min_pixels or not max_pixels:
            raise AdaTPInputError(f"{path}: 'size' needs shortest_edge and longest_edge, got {size!r}")
        norm = PreprocessConfig.from_dict({**cfg, "size": {"height": 1, "width": 1}}, source=path)
        return cls(normalise=norm, patch_size=int(cfg.get("patch_size", 14)),
                   temporal_patch_size=int(cfg.get("temporal_patch_size", 2)),
                   merge_size=int(cfg.get("merge_size", 2)), min_pixels=int(min_pixels),
                   max_pixels=int(max_pixels), whole_video=whole_video, cap_pixels_per_frame=cap,
                   max_video_tokens=int(setting("max_video_tokens") or 768), sampling=sampling)

    def model_budget(self, num_frames: int) -> int:
        """The pixel budget the installed transformers' processor gives ``num_frames`` frames: all of
        them together (Qwen3-VL) or each (Qwen2-VL), after the per-frame cap where it is on
        (``resize`` of its video processor, 5.25)."""
        if not self.cap_pixels_per_frame:
            return self.max_pixels
        factor, floor = self.factor, int(self.min_pixels * 1.05)
        if self.whole_video:
            per_frame = max(min(self.max_video_tokens * factor * factor, self.max_pixels // num_frames), floor)
            return per_frame * num_frames
        total = int(self.max_video_tokens * factor * factor * 0.9)
        return max(min(self.max_pixels, total * self.temporal_patch_size // num_frames), floor)


def qwen_resize_target(num_frames: int, height: int, width: int, cfg: QwenPreprocessConfig,
                       max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) a frame is resized to: multiples of ``cfg.factor``, aspect
    ratio kept, pixel count within [min_pixels, max_pixels] (transformers' ``smart_resize``
    of the Qwen2-VL and Qwen3-VL video processors).

    max_pixels: the budget per frame; None takes the processor's own (``cfg.model_budget``).
    For Qwen3-VL the budget covers the whole video, as its processor does.
    """
    factor = cfg.factor
    if cfg.whole_video:
        t = max(num_frames, cfg.temporal_patch_size)  # the processor refuses fewer frames than a patch
        budget = cfg.model_budget(num_frames) if max_pixels is None else max_pixels * num_frames
        if height < factor or width < factor:
            scale = max(factor / height, factor / width)
            height, width = int(height * scale), int(width * scale)
        t_bar = round(t / cfg.temporal_patch_size) * cfg.temporal_patch_size
    else:
        t = t_bar = 1
        budget = cfg.model_budget(num_frames) if max_pixels is None else max_pixels
    if max(height, width) / min(height, width) > 200:
        raise AdaTPInputError(f"frames of {width}x{height} are too elongated (aspect ratio above 200); crop them.")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if t_bar * h_bar * w_bar > budget:
        beta = math.sqrt((t * height * width) / budget)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < cfg.min_pixels:
        beta = math.sqrt(cfg.min_pixels / (t * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify_video(pixels: torch.Tensor, cfg: QwenPreprocessConfig) -> torch.Tensor:
    """Qwen's flat patch layout (the video processors' ``patchify``).

    pixels: [T, 3, H, W] normalised frames, H and W multiples of cfg.factor.
    An odd frame count is padded by repeating the last frame, as the processor does.
    Returns [T' * H/p * W/p, 3 * temporal_patch_size * p * p] with T' = ceil(T / temporal_patch_size),
    ordered by temporal patch, then 2x2 merge group, then patch.
    """
    tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    if pad := -pixels.shape[0] % tp:
        pixels = torch.cat([pixels, pixels[-1:].expand(pad, -1, -1, -1)])
    t, c, h, w = pixels.shape
    gt, gh, gw = t // tp, h // p, w // p
    patches = pixels.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(gt * gh * gw, c * tp * p * p)
