#!/usr/bin/env python3
"""Qwen vision tower: transformers' forward beside adatp_core's batched attention. Not a test.

    python bench/vision_attention.py --shape 7b --device cuda --dtype bfloat16 --frames 32
    python bench/vision_attention.py --shape tiny,7b --device cpu --frames 32,4

Stock is ``visual(pixel_values, grid_thw=grid_thw)`` with sdpa, which calls attention
once per window (Qwen2.5-VL) or frame, in a Python loop; batched is
``adatp_core.hf.vision.vision_forward`` (one attention call per layer).
Random weights of real shapes; a square video of --size pixels. One warm-up run
each, then the median of --repeats rounds (stock and batched alternate). Prints one line per (shape, frames):
``vision_attention shape=... attention_calls=STOCK/BATCHED stock_s=... batched_s=... speedup=...x
max_abs_err=...`` (max_abs_err: between the two pooler outputs).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers.vision_utils import get_vision_window_index  # noqa: E402

from adatp_core.hf.vision import vision_forward  # noqa: E402
from adatp_core.timing import synchronize  # noqa: E402

QWEN2_5_VL_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                     window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                     fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")
QWEN3_VL_8B = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                   patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                   deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh")
SHAPES = {  # name: (family, vision config)
    "tiny": ("qwen2_5_vl", dict(QWEN2_5_VL_7B, depth=8, hidden_size=64, intermediate_size=128, num_heads=4,
                                out_hidden_size=64, fullatt_block_indexes=[3, 7])),
    "7b": ("qwen2_5_vl", QWEN2_5_VL_7B),
    "qwen3-tiny": ("qwen3_vl", dict(QWEN3_VL_8B, depth=8, hidden_size=64, intermediate_size=128, num_heads=4,
                                    out_hidden_size=64, deepstack_visual_indexes=[1, 3, 5])),
    "qwen3-8b": ("qwen3_vl", QWEN3_VL_8B),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build(shape: str, device: torch.device, dtype: torch.dtype):
    family, cfg = SHAPES[shape]
    if family == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig as Config
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel as Model,
        )
    else:
        from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig as Config
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel as Model
    torch.manual_seed(0)
    with torch.device(device):
        model = Model(Config(**cfg))
    model.set_attn_implementation("sdpa")
    return model.to(dtype).eval()


def inputs(model, frames: int, size: int, device: torch.device, dtype: torch.dtype):
    """Random patches of a ``frames`` x size x size video: pixel_values [P, C*t*p*p], grid_thw [1, 3]."""
    cfg = model.config
    unit = cfg.patch_size * cfg.spatial_merge_size
    if size % unit:
        raise ValueError(f"--size must be a multiple of {unit} for this shape, got {size}")
    grid = [math.ceil(frames / cfg.temporal_patch_size), size // cfg.patch_size, size // cfg.patch_size]
    patch = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(grid[0] * grid[1] * grid[2], patch, generator=g).to(device, dtype)
    return pixels, torch.tensor([grid], device=device)


def stock_attention_calls(model, grid_thw: torch.Tensor) -> int:
    """How many attention calls transformers' sdpa path makes: one per frame in full-attention
    layers, one per window in the others (Qwen2.5-VL)."""
    frames = int(grid_thw[:, 0].sum())
    full = getattr(model, "fullatt_block_indexes", None)
    if full is None:
        return frames * len(model.blocks)
    _, cu_windows = get_vision_window_index(grid_thw, model.spatial_merge_size, model.window_size, model.patch_size)
    return len(full) * frames + (len(model.blocks) - len(full)) * (len(cu_windows) - 1)


def timed_pair(fns: dict, device: torch.device, repeats: int) -> tuple[dict, dict]:
    """Median wall time of each ``fns[name]()`` over ``repeats`` rounds after one warm-up each, and
    each one's last result. The callables alternate within a round, so that load from other
    processes falls on both alike."""
    outs = {name: fn() for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            outs[name] = fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outs


def run(shape: str, frames: int, size: int, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    model = build(shape, device, dtype)
    pixels, grid_thw = inputs(model, frames, size, device, dtype)
    with torch.inference_mode():
        secs, outs = timed_pair({"stock": lambda: model(pixels, grid_thw=grid_thw),
                                 "batched": lambda: vision_forward(model, pixels, grid_thw)}, device, repeats)
    stock, batched = outs["stock"].pooler_output.float(), outs["batched"].pooler_output.float()
    return dict(shape=shape, family=SHAPES[shape][0], device=str(device), dtype=str(dtype).removeprefix("torch."),
                threads=torch.get_num_threads(), frames=frames, size=f"{size}x{size}",
                grid_thw=",".join(map(str, grid_thw[0].tolist())), patches=int(pixels.shape[0]),
                tokens=int(batched.shape[0]), attention_calls=f"{stock_attention_calls(model, grid_thw)}/{len(model.blocks)}",
                stock_s=f"{secs['stock']:.4f}", batched_s=f"{secs['batched']:.4f}",
                speedup=f"{secs['stock'] / secs['batched']:.2f}x",
                max_abs_err=f"{(stock - batched).abs().max().item():.2e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny,7b", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--frames", default="32", help="comma-separated frame counts (each run for every shape)")
    p.add_argument("--size", type=int, default=448, help="frame height and width in pixels")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default: bfloat16 on CUDA, else float32")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (median) after one warm-up")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shape.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    for shape in shapes:
        for frames in (int(f) for f in args.frames.split(",")):
            row = run(shape, frames, args.size, device, dtype, args.repeats)
            print("vision_attention " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
