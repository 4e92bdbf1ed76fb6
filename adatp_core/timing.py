"""Wall-clock timing of stages that is honest on GPUs (synchronises first)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(times: dict, key: str, device="cpu"):
    """Add the seconds spent in the block to ``times[key]``."""
    synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        synchronize(device)
        times[key] = times.get(key, 0.0) + time.perf_counter() - start
