"""What a run's frames will take in memory, against what this machine has, known before decoding.

A video's sampling plan (video.SamplePlan: frame count and decoded size, from the
probe alone) says what its frames will take: the decoded uint8 frames
[T, H, W, 3], the IMAGE that nodes return ([T, H, W, 3] float32, 4 bytes a
channel) and, with a model, the model's pixel input and prompt embeddings on
its device. ``check_memory`` refuses a run whose estimate is above a share of
the memory available now, with the estimate and the number of frames that
would fit, before anything is decoded (docs: README, "What frames cost").

The estimate is a floor: the model's own working memory (activations, the KV
cache) comes on top of it; the shares leave room for that.

Torch-free at import: decode workers import video.py, which uses this module.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .errors import AdaTPInputError

# A run may plan to take at most this share of the memory available when it starts
# (the rest: the model's working memory, ComfyUI and other nodes' outputs, the OS).
HOST_MEMORY_SHARE = 0.75
DEVICE_MEMORY_SHARE = 0.9
IMAGE_BYTES_PER_CHANNEL = 4  # ComfyUI's IMAGE is float32
GB = 1e9


def frames_bytes(count: int, width: int, height: int) -> tuple[int, int]:
    """(decoded uint8 frames, IMAGE float32 frames) bytes of ``count`` frames of width x height."""
    pixels = int(count) * int(width) * int(height) * 3
    return pixels, pixels * IMAGE_BYTES_PER_CHANNEL


def available_host_bytes() -> int | None:
    """Memory this machine can give a new allocation now without swapping: psutil's
    ``available`` when psutil is installed (ComfyUI ships it), else Linux's MemAvailable,
    else free pages from ``os.sysconf``; None when none of these answers."""
    try:
        import psutil  # optional
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return int(psutil.virtual_memory().available)
        except (OSError, RuntimeError, AttributeError):
            pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def available_device_bytes(device) -> int | None:
    """Free memory on a CUDA ``device`` (a torch.device) now, plus what torch's caching
    allocator holds unused; None for other devices (the host's memory is counted instead)."""
    if getattr(device, "type", None) != "cuda":
        return None
    import torch  # a torch device was given, so torch is loaded; workers never get here

    try:
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    except (RuntimeError, AssertionError):
        return None
    return int(free) + max(int(cached), 0)


@dataclass(frozen=True)
class MemoryEstimate:
    """What a run's frames will take, in bytes, before anything is decoded.

    parts: (what, bytes, where) with where "host" or a device name.
    frames: the frame count the parts are for (to say how many would fit).
    """

    parts: tuple[tuple[str, int, str], ...]
    frames: int

    def bytes_on(self, where: str) -> int:
        return sum(b for _, b, w in self.parts if w == where)

    def places(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(w for _, _, w in self.parts))

    def describe(self, where: str) -> str:
        return ", ".join(f"{what} {size_text(b)}" for what, b, w in self.parts if w == where)

    def figures(self) -> dict:
        """For stats: planned bytes per place, in MB."""
        return {f"memory_planned_{w.replace(':', '')}_mb": round(self.bytes_on(w) / 1e6, 1) for w in self.places()}


def check_memory(estimate: MemoryEstimate, name: str, available=None,
                 advice: str = " (num_frames, --frames)") -> None:
    """Refuse (AdaTPInputError) a run whose estimate on any place is above that place's share
    of the memory available now. available(where) -> bytes or None (unknown: not checked);
    by default the host's (``available_host_bytes``) and, for a CUDA place, that device's.
    advice: what else to change, after "Sample fewer frames"."""
    for where in estimate.places():
        need = estimate.bytes_on(where)
        if available is not None:
            have = available(where)
        elif where == "host":
            have = available_host_bytes()
        else:
            have = _device_available(where)
        if have is None or need == 0:
            continue
        share = HOST_MEMORY_SHARE if where == "host" else DEVICE_MEMORY_SHARE
        limit = int(have * share)
        if need <= limit:
            continue
        per_frame = need / max(estimate.frames, 1)
        fit = max(int(math.floor(limit / per_frame)), 0) if per_frame else estimate.frames
        memory = "host memory" if where == "host" else f"memory on {where}"
        fits = (f"about {fit} frame(s) would fit" if fit else "not even one frame fits")
        raise AdaTPInputError(
            f"{name}: {estimate.frames} frame(s) would need about {size_text(need)} of {memory} "
            f"({estimate.describe(where)}), more than the {100 * share:.0f}% of the {size_text(have)} "
            f"available now that a run may take; {fits}. Sample fewer frames{advice}, or free memory; "
            "nothing was decoded.")


def size_text(num_bytes: float) -> str:
    """'2.36 MB', '16.11 GB'."""
    return f"{num_bytes / GB:.2f} GB" if num_bytes >= GB else f"{num_bytes / 1e6:.2f} MB"


def _device_available(where: str) -> int | None:
    import torch  # a device place comes only from a model, so torch is loaded

    try:
        device = torch.device(where)
    except (RuntimeError, TypeError):
        return None
    return available_device_bytes(device)
