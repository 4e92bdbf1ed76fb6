"""Qwen frame preprocessing in torch: resize targets, temporal patches, and the HF video processors."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hybrid_fixtures import HYBRID_BUILDERS
from qwen_fixtures import BUILDERS, qwen_cache  # noqa: F401

from adatp_core.models.preprocess import PreprocessConfig, QwenPreprocessConfig, patchify_video, qwen_resize_target
from adatp_core.models.tiny_qwen import QWEN2_5_VL_VIDEO_PREPROCESSOR, QWEN3_VL_VIDEO_PREPROCESSOR

NORM = PreprocessConfig(height=1, width=1)
QWEN25 = QwenPreprocessConfig(NORM, patch_size=14, min_pixels=3136, max_pixels=12845056)
QWEN3 = QwenPreprocessConfig(NORM, patch_size=16, min_pixels=4096, max_pixels=25165824, whole_video=True)


@pytest.mark.parametrize("cfg", [QWEN25, QWEN3], ids=["qwen2.5-vl", "qwen3-vl"])
@pytest.mark.parametrize("size", [(1080, 1920), (480, 640), (97, 131), (2000, 60)])
@pytest.mark.parametrize("budget", [448 * 448, 256 * 28 * 28, 64 * 64])
def test_resize_targets_are_multiples_within_the_budget(cfg, size, budget):
    h, w = qwen_resize_target(8, *size, cfg, budget)
    assert h % cfg.factor == 0 and w % cfg.factor == 0 and h >= cfg.factor and w >= cfg.factor
    assert h * w <= budget or min(h, w) == cfg.factor  # a side never goes below one token
    if size[0] > cfg.factor * 4 and size[1] > cfg.factor * 4 and budget >= 256 * 28 * 28:
        assert abs(h / w - size[0] / size[1]) / (size[0] / size[1]) < 0.2  # aspect ratio kept


def test_resize_target_grows_with_the_budget_and_respects_min_pixels():
    small = qwen_resize_target(8, 720, 1280, QWEN25, 224 * 224)
    large = qwen_resize_target(8, 720, 1280, QWEN25, 672 * 672)
    assert small[0] * small[1] < large[0] * large[1]
    tiny = qwen_resize_target(8, 30, 40, QWEN25, 448 * 448)
    assert tiny[0] * tiny[1] >= QWEN25.min_pixels


def test_patchify_layout_and_odd_frame_padding():
    """Row r of the flat layout is one 14x14 patch of two consecutive frames, in
    (temporal patch, 2x2 merge group, patch in group) order; an odd last frame is repeated."""
    cfg = QWEN25
    pixels = torch.randn(3, 3, 56, 84)
    flat = patchify_video(pixels, cfg)
    gt, gh, gw = 2, 56 // 14, 84 // 14
    assert flat.shape == (gt * gh * gw, 3 * 2 * 14 * 14)
    padded = torch.cat([pixels, pixels[-1:]])
    row = 0
    for t in range(gt):
        for bh in range(gh // 2):
            for bw in range(gw // 2):
                for mh in range(2):
                    for mw in range(2):
                        y, x = (2 * bh + mh) * 14, (2 * bw + mw) * 14
                        block = padded[2 * t:2 * t + 2, :, y:y + 14, x:x + 14]  # [tp, c, p, p]
                        assert torch.equal(flat[row], block.permute(1, 0, 2, 3).reshape(-1))
                        row += 1


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="the HF video processors need torchvision (not on CI)")
@pytest.mark.parametrize("family", sorted({**BUILDERS, **HYBRID_BUILDERS}))
@pytest.mark.parametrize("frames, size, budget", [(4, (240, 320), 448 * 448), (5, (720, 1280), 448 * 448),
                                                  (3, (97, 131), 256 * 28 * 28), (6, (1080, 1920), 640 * 360)])
def test_matches_hf_video_processor(family, qwen_cache, frames, size, budget):  # noqa: F811
    import transformers

    from adatp_core.models.loader import load_video_llm

    llm = load_video_llm({**BUILDERS, **HYBRID_BUILDERS}[family](qwen_cache), device="cpu", dtype="float32")
    qwen2 = family == "qwen2_5_vl"  # the others (Qwen3-VL, its MoE, Qwen3.5/3.6) take Qwen3-VL's processor
    processor_cls = getattr(transformers, "Qwen2VLVideoProcessor" if qwen2 else "Qwen3VLVideoProcessor")
    cfg = QWEN2_5_VL_VIDEO_PREPROCESSOR if qwen2 else QWEN3_VL_VIDEO_PREPROCESSOR
    processor = processor_cls(**{k: v for k, v in cfg.items() if k not in ("video_processor_type", "processor_class")})
    gen = torch.Generator().manual_seed(frames)
    u8 = torch.randint(0, 256, (frames, *size, 3), dtype=torch.uint8, generator=gen)
    u8 = (u8.float() * 0.2 + torch.linspace(0, 200, size[1]).view(1, 1, -1, 1)).clamp(0, 255).to(torch.uint8)
    total = budget if qwen2 else budget * frames
    hf = processor(videos=[u8.numpy()], size={"shortest_edge": cfg["size"]["shortest_edge"], "longest_edge": total},
                   do_sample_frames=False, cap_pixels_per_frame=False, return_tensors="pt")
    plan = llm.adapter.plan_video(frames, *size, max_pixels=budget)
    ours = llm.adapter.preprocess(u8, plan)
    assert hf["video_grid_thw"][0].tolist() == llm.adapter.grid_thw(plan)[0].tolist()
    assert hf["pixel_values_videos"].shape == ours.shape
    assert (hf["pixel_values_videos"] - ours).abs().max().item() < 1e-5
