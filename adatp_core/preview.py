"""A picture of what AdaTP kept: every frame, tiled into one image.

Kept tokens show the frame tinted by the attention heatmap; dropped tokens are
darkened and grey; each frame's border has its segment's colour, so segment
boundaries are where the border colour changes. Output is a ComfyUI IMAGE.

Drawn from plain tensors and values (the grid, the scores, the segments, the keep set), so frames in,
pictures out stays below the models and the stages: the Preview Tokens node reads them off its state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import AdaTPInputError

# An inferno-like colour map, 5 stops from cold to hot.
_HEAT = torch.tensor([[0.00, 0.00, 0.02], [0.34, 0.06, 0.43], [0.73, 0.21, 0.33],
                      [0.98, 0.55, 0.04], [0.99, 0.99, 0.64]])
_SEGMENT_COLOURS = torch.tensor([[0.12, 0.62, 1.00], [1.00, 0.40, 0.10], [0.20, 0.85, 0.30],
                                 [0.90, 0.20, 0.70], [1.00, 0.85, 0.10], [0.55, 0.35, 1.00]])


def heat_colours(values: torch.Tensor) -> torch.Tensor:
    """values in [0, 1], any shape -> colours [..., 3]."""
    x = values.clamp(0, 1) * (len(_HEAT) - 1)
    lo = x.floor().long().clamp(max=len(_HEAT) - 2)
    frac = (x - lo).unsqueeze(-1)
    return _HEAT[lo] * (1 - frac) + _HEAT[lo + 1] * frac


def rank_normalise(scores: torch.Tensor) -> torch.Tensor:
    """[N] -> [N] in [0, 1] by rank, so a few large attention scores do not wash out the rest."""
    if scores.numel() == 1:
        return torch.ones(1)
    ranks = torch.empty(scores.numel())
    ranks[torch.argsort(scores.float().cpu(), stable=True)] = torch.arange(scores.numel(), dtype=torch.float32)
    return ranks / (scores.numel() - 1)


def draw_tokens(frames: torch.Tensor, grid: tuple[int, int, int], scores: torch.Tensor,
                segments, keep: torch.Tensor | None = None, *, frames_per_step: int = 1, columns: int = 8,
                max_width: int = 2048, border: int = 3) -> torch.Tensor:
    """The picture of one pruning, from plain values (an ``AdaTPState`` holds them all).

    frames: [F, H, W, 3] float 0..1 (or 0..255): the frames the tokens were made from.
    grid: (T, h, w) the visual token grid; T = F, or F / ``frames_per_step`` rounded up when each
        temporal step covers several frames (Qwen: 2; its first frame is drawn).
    scores: [T*h*w] attention per token, frame-major then row-major (any device).
    segments: ((first, last), ...) inclusive temporal steps, covering 0..T-1.
    keep: indices of the kept tokens (any device), or None: every token kept.

    Returns [1, H', W', 3] float32: the frames tiled ``columns`` per row.
    """
    t, h, w = grid
    step = max(1, int(frames_per_step))
    if frames.ndim == 4 and step > 1 and -(-frames.shape[0] // step) == t:
        frames = frames[::step]  # one picture per temporal step of several frames (Qwen): its first frame
    if frames.ndim != 4 or frames.shape[0] != t:
        raise AdaTPInputError(
            f"Preview Tokens got {frames.shape[0] if frames.ndim == 4 else '?'} frames but the state has {t}; "
            "connect the same frames that went into Extract Attention.")
    frames = frames.float().cpu()
    if frames.max() > 1.0:
        frames = frames / 255.0
    columns = max(1, min(columns, t))
    tile_w = max(w, min(frames.shape[2], max_width // columns - 2 * border))
    tile_h = max(h, round(frames.shape[1] * tile_w / frames.shape[2]))
    tiles = F.interpolate(frames.permute(0, 3, 1, 2), size=(tile_h, tile_w), mode="bilinear",
                          align_corners=False, antialias=True).permute(0, 2, 3, 1).clamp(0, 1)

    heat = rank_normalise(scores).view(t, 1, h, w)
    kept = torch.ones(t * h * w, dtype=torch.bool)
    if keep is not None:
        kept[:] = False
        kept[keep.cpu()] = True
    kept = kept.view(t, 1, h, w).float()
    heat = F.interpolate(heat, size=(tile_h, tile_w), mode="nearest")[:, 0]
    kept = F.interpolate(kept, size=(tile_h, tile_w), mode="nearest")[:, 0, ..., None]
    grey = tiles.mean(dim=-1, keepdim=True).expand_as(tiles)
    shown = kept * (0.6 * tiles + 0.4 * heat_colours(heat)) + (1 - kept) * 0.35 * grey

    rows = math.ceil(t / columns)
    cell_h, cell_w = tile_h + 2 * border, tile_w + 2 * border
    canvas = torch.full((rows * cell_h, columns * cell_w, 3), 0.08)
    for f in range(t):
        seg = next(j for j, (a, b) in enumerate(segments) if a <= f <= b)
        y, x = (f // columns) * cell_h, (f % columns) * cell_w
        canvas[y:y + cell_h, x:x + cell_w] = _SEGMENT_COLOURS[seg % len(_SEGMENT_COLOURS)]
        canvas[y + border:y + border + tile_h, x + border:x + border + tile_w] = shown[f]
    return canvas.unsqueeze(0)
