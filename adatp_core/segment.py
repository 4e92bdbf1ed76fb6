"""Step 1: split the video into segments of similar consecutive frames (paper)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import AdaTPInputError


def check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if math.isnan(threshold) or not -1.0 <= threshold <= 1.0:
        raise AdaTPInputError(
            f"segment threshold {threshold} is outside [-1, 1]: it is a cosine similarity "
            "(0.95 is the paper's value; 1.0 makes every frame its own segment, -1.0 one segment).")
    return threshold


def frame_cuts(features: torch.Tensor, threshold: float = 0.95) -> torch.Tensor:
    """Where a new segment starts: cos(g_t, g_{t+1}) < threshold.

    features: [T, d] global frame features (normalised here, so any scale works).
    Returns [T-1] bool on the features' device (no host transfer).
    """
    threshold = check_threshold(threshold)
    if features.ndim != 2 or features.shape[0] < 1:
        raise AdaTPInputError(f"frame features must be [T, d] with T >= 1, got {tuple(features.shape)}")
    g = F.normalize(features.float(), dim=-1)
    similarity = (g[:-1] * g[1:]).sum(dim=-1)  # s_t = cos(g_t, g_{t+1}), [T-1]
    return similarity < threshold


def segments_from_cuts(cuts: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """cuts: [T-1] bool or 0/1 (on the host, ideally) -> ((first, last), ...)
    inclusive frame ranges covering 0..T-1 in order."""
    at = cuts.bool().nonzero().squeeze(1).tolist()
    starts = [0] + [c + 1 for c in at]
    ends = at + [cuts.shape[0]]
    return tuple(zip(starts, ends))


def segment_frames(features: torch.Tensor, threshold: float = 0.95) -> tuple[tuple[int, int], ...]:
    """Segments of consecutive frames whose neighbours stay similar.

    features: [T, d] global frame features (normalised here, so any scale works).
    A new segment starts after frame t when cos(g_t, g_{t+1}) < threshold.
    Returns ((first, last), ...) inclusive frame ranges covering 0..T-1 in order.
    T = 1 gives one segment.
    """
    return segments_from_cuts(frame_cuts(features, threshold).cpu())
