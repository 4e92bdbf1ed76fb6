#!/usr/bin/env python3
"""FLOPs of the real model shapes for one video, in both conventions, without weights or a GPU.

    python bench/flops_table.py --frames 32 --size 448x448 --retention 0.25 --layer 2
    python bench/flops_table.py --compare-layers 2,4 --memory

Models are built on PyTorch's meta device (no memory), so this runs anywhere in seconds.
On hybrid models (Qwen3.5/3.6) layer K-1 must be full attention, so the requested K moves up to
the next K that qualifies (as AdaTP does); --compare-layers shows each K as given, also where a
hybrid model could only score there with a proxy at a linear-attention layer.
--memory adds the prefill's cache: keys and values of the full-attention layers, and the
linear-attention layers' fixed conv and recurrent states.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import types  # noqa: E402

from shapes import SHAPES, TINY, build  # noqa: E402

from adatp_core.errors import AdaTPInputError  # noqa: E402
from adatp_core.flops import FULL_ATTENTION, LLMShape, cache_bytes, flops_summary  # noqa: E402

QUESTION = "What happens in this video? Describe the main events."
MIB = 2 ** 20


def _layers(text: str) -> list[int]:
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give layers as integers separated by commas, e.g. 2,4")
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more layers >= 0, e.g. 2,4")
    return layers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--size", default="448x448", help="WxH of the decoded frames")
    p.add_argument("--retention", type=float, default=0.25)
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--compare-layers", type=_layers, default=None, metavar="K,K",
                   help="also a table of the FLOPs ratios at each K given (e.g. 2,4)")
    p.add_argument("--memory", action="store_true",
                   help="also a table of the KV cache plus linear-attention states, stock against AdaTP")
    p.add_argument("--shapes", default=",".join(SHAPES), metavar="NAME,NAME",
                   help=f"which shapes (default: every real shape); also the built-in tiny ones: {', '.join(TINY)}")
    args = p.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES and s not in TINY]
    if unknown or not shapes:
        p.error(f"--shapes: unknown {unknown}; choose from {', '.join((*SHAPES, *TINY))}")
    width, height = (int(x) for x in args.size.split("x"))
    print("| shape | token grid | video tokens | FastVID conv.: vanilla -> AdaTP | whole prefill: vanilla -> AdaTP "
          "| vision tower |\n|---|---|---|---|---|---|")
    rows, moved = [], []
    for key in shapes:  # real shapes on the meta device, the tiny ones as they are (float32, CPU)
        spec = SHAPES[key] if key in SHAPES else types.SimpleNamespace(name=key)
        model = build(key, "meta", torch.bfloat16) if key in SHAPES else build(key, "cpu", torch.float32)
        plan = model.adapter.plan_video(args.frames, height, width)
        prompt = model.adapter.build_prompt(QUESTION, plan)
        llm = LLMShape.from_config(model.adapter.text_model.config)
        n = plan.num_tokens
        keep = max(1, round(args.retention * n))
        try:
            layer = model.adapter.resolve_layer(args.layer)[0]
        except AdaTPInputError as e:
            p.error(f"--layer {args.layer} on {spec.name}: {e}")
        if args.compare_layers and max(args.compare_layers) > llm.layers:
            p.error(f"--compare-layers {max(args.compare_layers)} is past {spec.name}'s {llm.layers} layers")
        if layer != args.layer:
            moved.append(f"{spec.name} K = {layer}")
        s = flops_summary(model, prompt, keep_count=keep, layer=layer)
        print(f"| {spec.name} | {'x'.join(map(str, plan.grid))} | {n} | {s['flops_video_llm_vanilla_T']:.2f} T -> "
              f"{s['flops_video_llm_T']:.2f} T ({100 * s['flops_ratio']:.1f}%) | {s['flops_total_vanilla_T']:.2f} T -> "
              f"{s['flops_total_T']:.2f} T ({100 * s['flops_total_ratio']:.1f}%) | {s['flops_vision_T']:.2f} T |")
        rows.append((spec, model, prompt, llm, keep, layer))
    if moved:
        print(f"\nK = {args.layer} asks for scores from a linear-attention layer on the hybrid shapes; "
              f"they use the next full-attention layer: {', '.join(moved)}.")
    if args.compare_layers:
        _compare(rows, args.compare_layers)
    if args.memory:
        _memory(rows)
    return 0


def _compare(rows, layers: list[int]) -> None:
    """FLOPs ratios (AdaTP / vanilla) at each K, and what each K costs over the first."""
    print("\nFLOPs at each K (AdaTP / vanilla; * = layer K-1 is linear attention: a proxy score would be "
          "needed)\n")
    print("| shape | " + " | ".join(f"K = {k}: FastVID / whole" for k in layers)
          + f" | K = {layers[-1]} over K = {layers[0]}: FastVID / whole |")
    print("|---|" + "---|" * (len(layers) + 1))
    for spec, model, prompt, llm, keep, _ in rows:
        stats = [flops_summary(model, prompt, keep_count=keep, layer=k) for k in layers]
        cells = [f"{100 * s['flops_ratio']:.1f}% / {100 * s['flops_total_ratio']:.1f}%"
                 + ("*" if k > 0 and llm.kind(k - 1) != FULL_ATTENTION else "") for k, s in zip(layers, stats)]
        first, last = stats[0], stats[-1]
        extra = (f"{last['flops_video_llm_T'] - first['flops_video_llm_T']:+.2f} T "
                 f"({100 * (last['flops_video_llm_T'] / first['flops_video_llm_T'] - 1):+.1f}%) / "
                 f"{last['flops_total_T'] - first['flops_total_T']:+.2f} T "
                 f"({100 * (last['flops_total_T'] / first['flops_total_T'] - 1):+.1f}%)")
        print(f"| {spec.name} | " + " | ".join(cells) + f" | {extra} |")


def _memory(rows) -> None:
    """The cache the prefill leaves (batch 1; bf16 keys, values and conv states, float32 recurrent states)."""
    print("\nCache after the prefill (bf16 KV and conv states, float32 recurrent states; batch 1)\n")
    print("| shape | K | stock: KV + states | AdaTP: KV + states | AdaTP / stock |\n|---|---|---|---|---|")
    for spec, _, prompt, llm, keep, layer in rows:
        n_text = prompt.length - len(prompt.visual_positions)
        stock = cache_bytes(llm, prompt.length, prompt.length, 0)
        ours = cache_bytes(llm, prompt.length, n_text + keep, layer)
        print(f"| {spec.name} | {layer} | {stock['kv'] / MIB:.1f} + {stock['state'] / MIB:.1f} MiB | "
              f"{ours['kv'] / MIB:.1f} + {ours['state'] / MIB:.1f} MiB | {100 * ours['total'] / stock['total']:.1f}% |")


if __name__ == "__main__":
    sys.exit(main())
