"""Frame preprocessing in torch, against LLaVA-OneVision's video processor."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from adatp_core.models.preprocess import PreprocessConfig, preprocess_frames

CFG = PreprocessConfig(height=384, width=384, mode="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)


def test_frames_at_target_size_are_only_normalised():
    gen = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (2, 384, 384, 3), dtype=torch.uint8, generator=gen)
    out = preprocess_frames(u8, CFG)
    expected = (u8.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    assert out.shape == (2, 3, 384, 384)
    assert torch.allclose(out, expected, atol=1e-6)


def test_float_image_and_uint8_agree():
    """ComfyUI IMAGE floats are quantised to 8 bits first, like decoded frames."""
    gen = torch.Generator().manual_seed(1)
    u8 = torch.randint(0, 256, (3, 100, 140, 3), dtype=torch.uint8, generator=gen)
    assert torch.equal(preprocess_frames(u8, CFG), preprocess_frames(u8.float() / 255, CFG))


def test_resize_keeps_flat_colour_and_range():
    flat = torch.full((1, 50, 70, 3), 0.6)
    out = preprocess_frames(flat, CFG)
    assert torch.allclose(out, torch.full_like(out, (round(0.6 * 255) / 255 - 0.5) / 0.5), atol=1e-6)
    noisy = preprocess_frames(torch.rand(2, 500, 300, 3), CFG)
    assert noisy.min() >= -1.0 - 1e-6 and noisy.max() <= 1.0 + 1e-6  # clamped to 0..255 before normalising


def test_reads_the_model_folder_config(tiny_dir):
    cfg = PreprocessConfig.from_folder(tiny_dir)
    assert (cfg.height, cfg.width, cfg.mode) == (384, 384, "bicubic")
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (0.5, 0.5, 0.5)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="the HF video processor needs torchvision (not on CI)")
@pytest.mark.parametrize("size", [(240, 320), (384, 384), (720, 1280), (97, 131)])
def test_matches_hf_video_processor(tiny_dir, size):
    from transformers import LlavaOnevisionVideoProcessor

    processor = LlavaOnevisionVideoProcessor.from_pretrained(tiny_dir)
    gen = torch.Generator().manual_seed(2)
    u8 = torch.randint(0, 256, (3, *size, 3), dtype=torch.uint8, generator=gen)
    # smooth content, as in real video, plus noise
    u8 = (u8.float() * 0.2 + torch.linspace(0, 200, size[1]).view(1, 1, -1, 1)).clamp(0, 255).to(torch.uint8)
    hf = processor(videos=[u8.numpy()], return_tensors="pt")["pixel_values_videos"][0]
    ours = preprocess_frames(u8, PreprocessConfig.from_folder(tiny_dir))
    assert hf.shape == ours.shape
    # the same 8-bit values: torchvision's kernel on CPU, float then round elsewhere
    assert (hf - ours).abs().max().item() < 1e-5
