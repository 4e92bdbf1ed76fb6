"""The token picture (preview.py) drawn from plain tensors and values: no model, no state."""

from __future__ import annotations

import pytest
import torch

from adatp_core.errors import AdaTPInputError
from adatp_core.preview import _SEGMENT_COLOURS, draw_tokens

T, H, W = 4, 2, 3  # token grid
SIZE, BORDER = 12, 3  # frame pixels (square), border of the drawing


def draw(frames, keep=None, segments=((0, 1), (2, 3)), **kwargs):
    scores = torch.arange(T * H * W, dtype=torch.float32)
    return draw_tokens(frames, (T, H, W), scores, segments, keep, columns=2, border=BORDER, **kwargs)[0]


def tile(image, f):
    """Frame f's tile (inside its border) in a 2-column drawing."""
    tile_h, tile_w = SIZE, SIZE
    cell_h, cell_w = tile_h + 2 * BORDER, tile_w + 2 * BORDER
    y, x = (f // 2) * cell_h, (f % 2) * cell_w
    return image[y + BORDER:y + BORDER + tile_h, x + BORDER:x + BORDER + tile_w]


def test_kept_tokens_are_bright_dropped_ones_dark_and_segments_coloured():
    frames = torch.full((T, SIZE, SIZE, 3), 0.8)
    keep = torch.arange(0, H * W)  # every token of frame 0, none elsewhere
    image = draw(frames, keep)
    assert image.shape == (2 * (SIZE + 2 * BORDER), 2 * (SIZE + 2 * BORDER), 3) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    assert tile(image, 0).min() >= 0.6 * 0.8 > tile(image, 1).max()  # kept (frame, tinted) against dropped
    assert not torch.equal(tile(image, 0)[0, 0], tile(image, 0)[-1, -1])  # tinted by each token's score
    assert torch.allclose(tile(image, 1), torch.full_like(tile(image, 1), 0.35 * 0.8))
    assert torch.equal(image[0, 0], _SEGMENT_COLOURS[0]) and torch.equal(image[-1, -1], _SEGMENT_COLOURS[1])
    everything = draw(frames)  # keep None: the vanilla model keeps every token
    assert everything.mean() > image.mean() and tile(everything, 1).min() >= 0.6 * 0.8


def test_several_frames_a_step_draw_each_steps_first_frame_and_a_mismatch_is_refused():
    frames = torch.rand(2 * T - 1, SIZE, SIZE, 3)  # odd: the last step is padded, as Qwen's processors do
    frames[1::2] = 0  # the second frame of each step must not be drawn
    image = draw(frames, frames_per_step=2)
    assert tile(image, 1).max() > 0.1
    assert torch.equal(image, draw(frames[::2]))
    with pytest.raises(AdaTPInputError, match="got 3 frames but the state has 4; connect the same frames"):
        draw(frames[:3])
