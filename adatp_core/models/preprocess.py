"""Frame preprocessing in plain torch (no torchvision, which CI cannot import).

It reproduces what transformers' fast video processors do on decoded uint8
frames: resize with antialiasing (torchvision's uint8 path: compute in float,
round and clamp back to 0..255), then rescale and normalise. A test compares it
with the HF video processor whenever torchvision is importable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import AdaTPInputError

# PIL resampling codes used in HF preprocessor configs.
_RESAMPLE = {2: "bilinear", 3: "bicubic"}
PREPROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")


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
        """Read the video processor config of a model folder (the video one first)."""
        for name in PREPROCESSOR_FILES:
            path = Path(folder) / name
            if path.is_file():
                return cls.from_dict(json.loads(path.read_text()), source=path)
        raise AdaTPInputError(
            f"{folder} has no {' or '.join(PREPROCESSOR_FILES)}; copy it from the model's "
            "Hugging Face repository into the folder."
        )

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
