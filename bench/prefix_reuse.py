#!/usr/bin/env python3
"""A second question about the same video: its time to first token against the first's. Not a test.

    python bench/prefix_reuse.py --shape tiny,tiny-qwen2.5-vl,tiny-qwen3-vl --device cpu     # anywhere
    python bench/prefix_reuse.py --shape 7b,qwen2.5-vl-7b --device cuda --dtype bfloat16 --frames 32

For each shape: the first question about a video (the model's prefix store emptied
first: vision, layers < K over the whole prompt, the prefix kept), a second, different
question about the same frames (the prefix reused: only the question's tokens run
through layers < K), and the one-pass prefill without the store (reuse_prefix=False,
the path before the cache) for reference. TTFT is counted from decoded frames to the
first token, AdaTP at K=2, R=0.25 (global and local debias). Medians of --repeats runs
after one warm-up. Then the cost of hashing the frames (the cache's key) at 32 and 128
frames of each --hash-size, and the key of 64 frames 1280x720 on the CPU: hashed, then
the same tensor again (by identity). Weights are random (bench/shapes.py). Prints a
table, writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shapes import SHAPES, TINY, build  # noqa: E402

from adatp_core.attention import extract_attention  # noqa: E402
from adatp_core.prefix_cache import FrameKeys, frames_digest  # noqa: E402
from adatp_core.debias import global_debias, local_debias  # noqa: E402
from adatp_core.generate import SamplingConfig, generate_answer  # noqa: E402
from adatp_core.prune import prune_tokens  # noqa: E402
from adatp_core.samples import scene_frames  # noqa: E402

FIRST = "What happens in this video? Describe the main events."
SECOND = "What changes between the first and the last frames, and what stays the same?"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def ttft(model, frames, question: str, layer: int, reuse: bool = True) -> dict:
    """One question to its first token; the stats that matter here."""
    state = extract_attention(model, frames, question, layer=layer, reuse_prefix=reuse)
    state = prune_tokens(local_debias(global_debias(state)), 0.25)
    s = generate_answer(state, SamplingConfig(max_new_tokens=1, ignore_eos=True)).stats
    return {"ttft_s": s["time_to_first_token"], "question_s": s.get("time_question"),
            "vision_s": s["time_vision"], "hash_s": s.get("time_prefix_key", 0.0), "prefix": s["prefix_cache"],
            "prompt_tokens": s["prompt_tokens"]}


def bench_shape(shape: str, device: str, dtype, frames_n: int, layer: int, repeats: int) -> dict:
    model = build(shape, device, dtype)
    frames = torch.from_numpy(scene_frames(num_frames=frames_n, width=640, height=360, scenes=3)).float() / 255
    warm = torch.from_numpy(scene_frames(num_frames=frames_n, width=640, height=360, scenes=2)).float() / 255
    ttft(model, warm, FIRST, layer)
    ttft(model, warm, SECOND, layer)
    ttft(model, warm, FIRST, layer, reuse=False)
    runs = {"first": [], "second": [], "one_pass": []}
    for _ in range(repeats):
        model.prefix_cache.clear()
        runs["first"].append(ttft(model, frames, FIRST, layer))
        runs["second"].append(ttft(model, frames, SECOND, layer))
        runs["one_pass"].append(ttft(model, frames, FIRST, layer, reuse=False))
    assert all(r["prefix"] == "hit" for r in runs["second"]), [r["prefix"] for r in runs["second"]]
    med = {k: statistics.median(r["ttft_s"] for r in v) for k, v in runs.items()}
    return {"shape": shape, "frames": frames_n, "layer": layer, "device": device, "dtype": str(dtype),
            "ttft_first_s": med["first"], "ttft_second_s": med["second"], "ttft_one_pass_s": med["one_pass"],
            "ratio_second_to_first": med["second"] / med["first"],
            "question_part_s": statistics.median(r["question_s"] for r in runs["second"]),
            "hash_s": statistics.median(r["hash_s"] for r in runs["second"]),
            "prompt_tokens": runs["first"][0]["prompt_tokens"], "runs": runs}


def bench_hash(sizes: list[tuple[int, int]], counts=(32, 128), repeats: int = 3) -> list[dict]:
    rows = []
    for h, w in sizes:
        for n in counts:
            frames = torch.rand(n, h, w, 3)
            frames_digest(frames[:2])
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                frames_digest(frames)
                times.append(time.perf_counter() - start)
            mb = frames.numel() * frames.element_size() / 1e6
            rows.append({"frames": n, "size": f"{w}x{h}", "dtype": "float32", "megabytes": mb,
                         "hash_s": statistics.median(times), "gb_per_s": mb / 1e3 / statistics.median(times)})
            del frames
    return rows


def bench_key(n: int = 64, h: int = 720, w: int = 1280, repeats: int = 3) -> dict:
    """The prefix key's frames part for n float32 frames on the CPU: the first question (a content
    hash) and the next ones about the same tensor (keyed by identity, prefix_cache.FrameKeys)."""
    frames = torch.rand(n, h, w, 3)
    first, again = [], []
    for _ in range(repeats):
        keys = FrameKeys()
        start = time.perf_counter()
        keys(frames)
        first.append(time.perf_counter() - start)
        start = time.perf_counter()
        keys(frames)
        again.append(time.perf_counter() - start)
    return {"frames": n, "size": f"{w}x{h}", "dtype": "float32", "megabytes": frames.numel() * 4 / 1e6,
            "first_s": statistics.median(first), "same_tensor_s": statistics.median(again)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny,tiny-qwen2.5-vl,tiny-qwen3-vl",
                   help=f"comma-separated, of {', '.join((*TINY, *SHAPES))}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES))
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hash-size", default="448x448,1280x720", help="frame sizes (WxH) for the hashing figures")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    rows = [bench_shape(s, args.device, dtype, args.frames, args.layer, args.repeats) for s in args.shape.split(",")]
    print(f"{'shape':<18}{'frames':>7}{'TTFT 1st':>10}{'TTFT 2nd':>10}{'2nd/1st':>9}{'one pass':>10}"
          f"{'question':>10}{'hash':>8}")
    for r in rows:
        print(f"{r['shape']:<18}{r['frames']:>7}{r['ttft_first_s']:>10.4f}{r['ttft_second_s']:>10.4f}"
              f"{r['ratio_second_to_first']:>9.3f}{r['ttft_one_pass_s']:>10.4f}{r['question_part_s']:>10.4f}"
              f"{r['hash_s']:>8.4f}")
    sizes = [tuple(int(x) for x in s.split("x"))[::-1] for s in args.hash_size.split(",") if s]
    hashes = bench_hash(sizes)
    print("\nHashing the frames (SHA-256 per frame, threads; the prefix cache's key):")
    for r in hashes:
        print(f"  {r['frames']:>4} frames {r['size']:>9} float32: {r['megabytes']:8.1f} MB in {r['hash_s']:.3f} s "
              f"({r['gb_per_s']:.2f} GB/s)")
    key = bench_key()
    print(f"\nThe prefix key for {key['frames']} frames {key['size']} float32 on the CPU "
          f"({key['megabytes']:.0f} MB): {key['first_s']:.3f} s the first time (hashed), "
          f"{key['same_tensor_s'] * 1e6:.0f} us for the same tensor again")
    if args.out:
        args.out.write_text(json.dumps({"machine": platform.platform(), "cpus": torch.get_num_threads(),
                                        "torch": torch.__version__, "rows": rows, "hashing": hashes,
                                        "key": key}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
