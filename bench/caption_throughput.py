#!/usr/bin/env python3
"""Caption throughput: clips per minute when clips are decoded together. Not a test.

    python bench/caption_throughput.py --shape tiny --device cpu --tokens 256 --clips 16 \
        --batch-sizes 1,2,4,8,16 --out bench/results/cpu_caption_tiny.json
    python bench/caption_throughput.py --shape 7b --device cuda --dtype bfloat16 --frames 32 \
        --clips 64 --tokens 128 --batch-sizes 4,8,16,32,64 --out bench/results/h100_caption_7b.json
    python bench/caption_throughput.py ... --decode-mode static   (then --decode-mode default: side by side)

Rows, on the same clips (frames already decoded, in memory: this measures the
model, not the video decoder) and the same caption length (EOS ignored):
  stock      transformers' generate() on the full video, one clip at a time
  adatp b1   AdaTP (K=2, R=0.25), one clip at a time (generate_answer, the auto decode mode)
  adatp bN   AdaTP, clips decoded together N at a time (batching.py's continuous batching)
Figures: clips/min, decoded tokens/s (every clip's new tokens over the wall time),
and the device-busy share: on CUDA the GPU's utilisation sampled by NVML while
the row runs (when pynvml is installed), else the share of wall time spent in
synchronised model calls. Weights are random for the real shapes. Prints a table
and writes JSON.

--decode-mode (auto, default or static; auto unless given) goes to every AdaTP row.
The header names it, and a line per AdaTP row says which mode its steps ran in
(auto chooses per batch: steps.static_rows_pay_off) and, for static steps,
the positions per attention layer they read beyond a default step: run static and
default on one card to place its break-even (steps.MEASURED_BREAK_EVEN).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shapes import SHAPES, TINY, build, stock_inputs  # noqa: E402

from adatp_core.batching import decode_together  # noqa: E402
from adatp_core.generate import SamplingConfig, generate_answer  # noqa: E402
from adatp_core.pipeline import PipelineConfig, prefill  # noqa: E402
from adatp_core.samples import scene_frames  # noqa: E402
from adatp_core.timing import synchronize  # noqa: E402

PROMPT = "Describe this video in detail."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Busy:
    """The device-busy share of a stretch of wall time (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device, self.samples, self.model_seconds = device, [], 0.0
        self.nvml = None
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                self.nvml = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            except Exception:  # noqa: BLE001  no NVML: fall back to the model-time share
                self.nvml = None

    def __enter__(self):
        self.start, self.stop_flag = time.perf_counter(), threading.Event()
        if self.nvml is not None:
            import pynvml

            def sample():
                while not self.stop_flag.wait(0.05):
                    self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(self.nvml).gpu / 100)

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_flag.set()
        self.wall = time.perf_counter() - self.start

    def share(self) -> tuple[float, str]:
        if self.samples:
            return sum(self.samples) / len(self.samples), "nvml"
        return min(1.0, self.model_seconds / self.wall) if self.wall else 0.0, "model time"


def make_clips(n: int, frames: int) -> list[torch.Tensor]:
    """n clips of ``frames`` frames, of a few sizes and scene counts (the same every run)."""
    sizes = [(320, 240), (288, 224), (352, 256), (320, 200)]
    return [torch.from_numpy(scene_frames(frames, *sizes[i % 4], scenes=1 + i % 3)).float() / 255
            for i in range(n)]


def run_stock(model, clips, tokens: int, busy: Busy) -> int:
    from transformers import GenerationConfig

    adapter, hf, dev = model.adapter, model.model, model.compute_device
    gen = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0,
                           eos_token_id=None)
    total = 0
    for frames in clips:
        start = time.perf_counter()
        plan = adapter.plan_video(*frames.shape[:3])
        prompt = adapter.build_prompt(PROMPT, plan)
        video = stock_inputs(model, prompt, adapter.preprocess(frames, plan))
        ids = prompt.input_ids[None].to(dev)
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **video, generation_config=gen)
        synchronize(dev)
        busy.model_seconds += time.perf_counter() - start
        total += out.shape[1] - ids.shape[1]
    return total


def run_adatp(model, clips, tokens: int, batch_size: int, busy: Busy, mode: str = "auto", seen=None) -> int:
    """AdaTP's captions of ``clips``; ``seen`` (a list) gets every answer's stats."""
    cfg = PipelineConfig(num_frames=clips[0].shape[0], retention=0.25,
                         generation=SamplingConfig(max_new_tokens=tokens, ignore_eos=True, decode_mode=mode))
    seen = [] if seen is None else seen
    dev = model.compute_device
    if batch_size == 1:
        total = 0
        for frames in clips:
            start = time.perf_counter()
            answer = generate_answer(prefill(model, frames, PROMPT, cfg), cfg.generation)
            synchronize(dev)
            busy.model_seconds += time.perf_counter() - start
            total += len(answer.token_ids)
            seen.append(answer.stats)
        return total
    items = [(i, lambda f=frames: prefill(model, f, PROMPT, cfg)) for i, frames in enumerate(clips)]
    total = 0
    start = time.perf_counter()
    for done in decode_together(model, cfg.generation, items, batch_size):
        if done.error:
            raise RuntimeError(done.error)
        total += len(done.answer.token_ids)
        seen.append(done.answer.stats)
    busy.model_seconds += time.perf_counter() - start  # nothing else runs in between
    return total


def measure(name: str, fn, model, clips, tokens: int, seen=None) -> dict:
    dev = model.compute_device
    fn(clips[:1], 4, Busy(dev))  # warm-up (lazy inits, kernels); not timed
    if seen is not None:
        seen.clear()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with Busy(dev) as busy:
        new_tokens = fn(clips, tokens, busy)
        synchronize(dev)
    if seen is not None:  # what the decode mode did (AdaTP rows)
        row_modes = sorted({s.get("decode_mode", "?") for s in seen})
        static = [s for s in seen if s.get("decode_passes_static")]
        extra = (sum(s["static_extra_positions"] * s["decode_passes_static"] for s in static)
                 / sum(s["decode_passes_static"] for s in static)) if static else None
    share, how = busy.share()
    row = {"method": name, "clips": len(clips), "tokens_per_clip": tokens, "seconds": busy.wall,
           "clips_per_min": 60 * len(clips) / busy.wall, "decoded_tokens_per_s": new_tokens / busy.wall,
           "device_busy_share": share, "busy_measured_by": how}
    if seen is not None:
        row.update({"decode_modes_run": row_modes, "static_extra_positions": extra})
    if dev.type == "cuda":
        row["peak_bytes"] = torch.cuda.max_memory_allocated(dev)
    return row


def print_table(rows: list[dict]) -> None:
    b1 = next((r["clips_per_min"] for r in rows if r["method"] == "adatp b1"), None)
    stock = next((r["clips_per_min"] for r in rows if r["method"] == "stock"), None)
    print(f"{'method':<10} {'clips/min':>10} {'tokens/s':>10} {'busy':>6} {'x adatp b1':>11} {'x stock':>8}")
    for r in rows:
        vs_b1 = f"{r['clips_per_min'] / b1:.2f}" if b1 else "-"
        vs_stock = f"{r['clips_per_min'] / stock:.2f}" if stock else "-"
        print(f"{r['method']:<10} {r['clips_per_min']:>10.1f} {r['decoded_tokens_per_s']:>10.1f} "
              f"{100 * r['device_busy_share']:>5.0f}% {vs_b1:>11} {vs_stock:>8}")
    for r in rows:
        if "decode_modes_run" in r:
            extra = r["static_extra_positions"]
            more = f"; static steps read {extra:.0f} positions per attention layer beyond default" if extra else ""
            print(f"{r['method']}: decode mode ran {'+'.join(r['decode_modes_run'])}{more}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=sorted({*SHAPES, *TINY}))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128, help="new tokens per caption (EOS ignored)")
    p.add_argument("--batch-sizes", default="2,4,8,16", help="AdaTP batch sizes besides 1")
    p.add_argument("--no-stock", action="store_true", help="leave out stock generate()")
    p.add_argument("--decode-mode", default="auto", choices=("auto", "default", "static"),
                   help="AdaTP's decode mode, one answer and rows alike (auto: static where it pays, on CUDA)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    model = build(args.shape, args.device, DTYPES[args.dtype])
    clips = make_clips(args.clips, args.frames)
    rows = []
    if not args.no_stock:
        rows.append(measure("stock", lambda c, t, b: run_stock(model, c, t, b), model, clips, args.tokens))
    for n in [1] + [int(x) for x in args.batch_sizes.split(",") if x.strip()]:
        seen: list = []
        run = lambda c, t, b, n=n, s=seen: run_adatp(model, c, t, n, b, args.decode_mode, s)  # noqa: E731
        rows.append(measure(f"adatp b{n}", run, model, clips, args.tokens, seen))
    print(f"{args.shape}, {args.frames} frames, {args.clips} clips, {args.tokens}-token captions, "
          f"{args.device} {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"decode mode {args.decode_mode}")
    print_table(rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "date": str(date.today()), "machine": platform.platform(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "shape": args.shape, "frames": args.frames,
            "device": args.device, "dtype": args.dtype, "decode_mode": args.decode_mode, "rows": rows},
            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
