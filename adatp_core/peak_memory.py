"""Peak memory of a run's stages, measured (the estimate before the run is budget.run_memory).

Host: the process's peak resident set (Linux VmHWM), reset at the start of each stage through
/proc/self/clear_refs, so each stage's peak is its own; the process's peak since it started is
kept across those resets (``process_peak``). Elsewhere, ru_maxrss (the process's peak so far).
CUDA: torch's peak allocated bytes on the model's device, reset the same way.
"""

from __future__ import annotations

import resource
import sys
from contextlib import contextmanager

import torch

_KIB = 1024
_seen = {"host": 0}  # the process's peak resident bytes before the last reset


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * _KIB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * _KIB  # bytes on macOS, KiB on Linux


def host_peak() -> int:
    """The host peak since the last reset (or since the process started)."""
    hwm = _hwm_bytes()
    return _maxrss_bytes() if hwm is None else hwm


def process_peak() -> int:
    """The process's peak resident bytes since it started, across stage resets."""
    return max(_seen["host"], host_peak(), _maxrss_bytes() if _hwm_bytes() is None else 0)


def reset_host_peak() -> bool:
    """Start a new host peak (Linux); False where it cannot be reset."""
    _seen["host"] = process_peak()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextmanager
def stage_peak(stats: dict, stage: str, device=None):
    """Record the stage's peak: stats["memory_peak_<stage>_host_mb"] (and, on a CUDA device,
    "memory_peak_<stage>_<device>_mb"), and keep "memory_peak_host_mb" (and the device's) the
    largest of the stages recorded in ``stats``."""
    cuda = device is not None and torch.device(device).type == "cuda"
    reset_host_peak()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield
    finally:
        figures = {"host": host_peak()}
        if cuda:
            figures[str(torch.device(device)).replace(":", "")] = torch.cuda.max_memory_allocated(device)
        for place, peak in figures.items():
            mb = round(peak / 1e6, 1)
            stats[f"memory_peak_{stage}_{place}_mb"] = mb
            stats[f"memory_peak_{place}_mb"] = max(stats.get(f"memory_peak_{place}_mb", 0.0), mb)
