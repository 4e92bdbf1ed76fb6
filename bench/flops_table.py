#!/usr/bin/env python3
"""FLOPs of the real model shapes for one video, in both conventions, without weights or a GPU.

    python bench/flops_table.py --frames 32 --size 448x448 --retention 0.25 --layer 2

Models are built on PyTorch's meta device (no memory), so this runs anywhere in seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import SHAPES, build  # noqa: E402

from adatp_core.flops import flops_summary  # noqa: E402

QUESTION = "What happens in this video? Describe the main events."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--size", default="448x448", help="WxH of the decoded frames")
    p.add_argument("--retention", type=float, default=0.25)
    p.add_argument("--layer", type=int, default=2)
    args = p.parse_args(argv)
    width, height = (int(x) for x in args.size.split("x"))
    print("| shape | token grid | video tokens | FastVID conv.: vanilla -> AdaTP | whole prefill: vanilla -> AdaTP "
          "| vision tower |\n|---|---|---|---|---|---|")
    for key, spec in SHAPES.items():
        model = build(key, "meta", torch.bfloat16)
        plan = model.adapter.plan_video(args.frames, height, width)
        prompt = model.adapter.build_prompt(QUESTION, plan)
        n = plan.num_tokens
        s = flops_summary(model, prompt, keep_count=max(1, round(args.retention * n)), layer=args.layer)
        print(f"| {spec.name} | {'x'.join(map(str, plan.grid))} | {n} | {s['flops_video_llm_vanilla_T']:.2f} T -> "
              f"{s['flops_video_llm_T']:.2f} T ({100 * s['flops_ratio']:.1f}%) | {s['flops_total_vanilla_T']:.2f} T -> "
              f"{s['flops_total_T']:.2f} T ({100 * s['flops_total_ratio']:.1f}%) | {s['flops_vision_T']:.2f} T |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
