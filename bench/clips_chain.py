#!/usr/bin/env python3
"""The whole clips chain: long footage -> shots -> clips -> captions -> layouts. Not a test.

    python bench/clips_chain.py                               # 60 s of synthetic footage, tiny model, CPU
    python bench/clips_chain.py --seconds 600 --size 640x360 --out bench/results/cpu_clips_chain.json
    python bench/clips_chain.py --model ComfyUI/models/LLM/llava-onevision-qwen2-7b-ov-hf --device cuda \\
        --dtype bfloat16 --caption-frames 32 --tokens 128          # on a GPU

Footage: synthetic shots of 2 to 7 s (hard cuts, a moving shape in each) at --fps-source,
written once into a temporary folder. The chain runs as ``python -m adatp_core clips`` runs it
(run_clips, layouts txt,jsonl,srt,vtt, Wan's rules by default: 16 fps, 4k+1 frames, 1-5 s),
then once more (the rerun: nothing to do). Figures: source seconds per wall-clock second for
the whole chain and for each stage (detection, cutting, captioning), clips per minute, and the
rerun's wall time. bench/shots.py measures detection and cutting alone, and their accuracy.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adatp_core.cli import load_model  # noqa: E402
from adatp_core.clips.job import plan_sources, run_clips  # noqa: E402
from adatp_core.clips.settings import ClipsJob  # noqa: E402
from adatp_core.clips.plan import ClipRules  # noqa: E402
from adatp_core.generate import SamplingConfig  # noqa: E402
from adatp_core.pipeline import PipelineConfig  # noqa: E402
from adatp_core.samples import write_video  # noqa: E402


def footage(path: Path, seconds: float, fps: float, width: int, height: int, seed: int = 0) -> list[float]:
    """Write ``seconds`` of shots of 2-7 s with hard cuts; the cut times."""
    rng = np.random.default_rng(seed)
    total = int(seconds * fps)
    lengths, n = [], 0
    while n < total:
        lengths.append(min(int(rng.uniform(2, 7) * fps), total - n))
        n += lengths[-1]
    yy, xx = np.mgrid[0:height, 0:width]
    frames = np.empty((total, height, width, 3), np.uint8)
    i = 0
    for shot, length in enumerate(lengths):
        bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        for k in range(length):
            img = frames[i]
            img[:] = bg
            img += (yy[..., None] * 30 // height).astype(np.uint8)
            cx = int(width * (0.2 + 0.6 * k / max(length - 1, 1)))
            cy = int(height * (0.5 + 0.25 * np.sin(k / fps * 3)))
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < (height // 6) ** 2] = fg
            i += 1
    write_video(path, frames, fps=fps)
    return list(np.cumsum(lengths)[:-1] / fps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="footage length (default 60)")
    p.add_argument("--fps-source", type=float, default=24.0)
    p.add_argument("--size", default="320x240", help="footage size WxH (default 320x240)")
    p.add_argument("--model", help="default: the built-in tiny model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--caption-frames", type=int, default=8)
    p.add_argument("--tokens", type=int, default=16, help="caption length in tokens (default 16)")
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args(argv)
    width, height = map(int, args.size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="adatp-clips-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        cuts = footage(tmp / "src" / "footage.mp4", args.seconds, args.fps_source, width, height)
        model_start = time.perf_counter()
        model = load_model(args.model, args.device, args.dtype)
        load_s = time.perf_counter() - model_start
        cfg = PipelineConfig(num_frames=args.caption_frames, generation=SamplingConfig(max_new_tokens=args.tokens))
        job = ClipsJob(sources=(tmp / "src",), out=tmp / "set", rules=ClipRules(), pipeline=cfg,
                       workers=args.workers, batch_size=args.batch_size)
        start = time.perf_counter()
        plan = plan_sources(job)
        detect_s = time.perf_counter() - start
        found = [s.start for p in plan.sources for s in p.shots[1:]]
        tolerance = 2 / args.fps_source  # within 2 frames
        hits = sum(any(abs(f - c) <= tolerance for f in found) for c in cuts)
        summary = run_clips(model, job, plan=plan)
        wall = time.perf_counter() - start
        caption_s = summary.captions().seconds
        cut_s = wall - detect_s - caption_s
        again = time.perf_counter()
        rerun = run_clips(model, job)
        rerun_s = time.perf_counter() - again
    source = summary.source_seconds
    figures = {
        "footage_s": round(source, 2), "size": args.size, "fps_source": args.fps_source, "cuts": len(cuts),
        "cuts_found": hits,
        "false_cuts": sum(not any(abs(f - c) <= tolerance for c in cuts) for f in found),
        "shots": summary.shots, "clips": summary.clips_planned, "captioned": len(summary.captions().done),
        "model": args.model or "adatp-tiny", "device": args.device, "caption_frames": args.caption_frames,
        "tokens": args.tokens, "model_load_s": round(load_s, 2),
        "wall_s": round(wall, 2), "detect_s": round(detect_s, 2), "cut_s": round(cut_s, 2),
        "caption_s": round(caption_s, 2),
        "chain_source_s_per_s": round(source / wall, 3),
        "detect_source_s_per_s": round(source / detect_s, 2),
        "cut_source_s_per_s": round(source / cut_s, 2) if cut_s > 0 else None,
        "caption_source_s_per_s": round(source / caption_s, 3) if caption_s > 0 else None,
        "clips_per_min": round(60 * summary.clips_planned / wall, 1),
        "rerun_s": round(rerun_s, 3), "rerun_did_nothing": rerun.clips_cut == 0 and not rerun.captions().done
        and not rerun.detected and not rerun.outputs,
        "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
    }
    print(f"footage {source:.1f} s ({args.size} at {args.fps_source:g} fps, {len(cuts)} cuts): "
          f"{hits} found within 2 frames, {figures['false_cuts']} false; "
          f"{summary.shots} shots, {summary.clips_planned} clips, {len(summary.captions().done)} captioned")
    print(f"whole chain: {wall:.1f} s wall = {source / wall:.2f} source seconds per second "
          f"({60 * summary.clips_planned / wall:.1f} clips/min); model load {load_s:.1f} s not counted")
    print(f"  detection {detect_s:.1f} s ({source / detect_s:.1f} src s/s), cutting {cut_s:.1f} s, "
          f"captioning {caption_s:.1f} s ({figures['caption_source_s_per_s']} src s/s)")
    print(f"rerun: {rerun_s:.2f} s, did nothing: {figures['rerun_did_nothing']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
