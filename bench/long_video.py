"""Long videos in bounded memory (issue 30): peak memory against frames.

Measured (CPU, the built-in tiny Qwen3-VL, a long synthetic video): each run in a fresh
subprocess, its peak resident memory (ru_maxrss, and across the pipeline's per-stage resets
peak_memory.process_peak), for
  stock     transformers' own generate() on the decoded frames (what users run today)
  one-pass  AdaTP (K=2, R=0.25) with every sampled frame decoded into one IMAGE first
  streamed  AdaTP (K=2, R=0.25) with the video decoded, preprocessed and encoded a chunk at a time
Modelled (no weights, no GPU needed): budget.run_memory's estimate of the peak, on the device and
on the host, for real shapes (Qwen3-VL-8B, Qwen3.5-9B, LLaVA-OV-7B within its 32k context) in bf16
at 448x448, and the most frames each path fits in 24 GB.

    python bench/long_video.py --frames 64,128,256,512,1024 --out bench/results/cpu_long_video.json
    python bench/long_video.py --model-only          # the memory model's table alone
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

QUESTION = "What happens in this video?"
MODES = ("stock", "one-pass", "streamed")
# The memory model's columns: the measured modes, and streamed with what places.plan_places moves to the
# host, in its order: the encoded rows (RunPlan.encoded_on_host), then layer K's input rows too
# (rows_on_host), then layers >= K's keys and values too (kv_on_host: two layers' staged copies on the device).
MOVED = {"streamed-host": ("encoded",), "streamed-host-rows": ("encoded", "rows"),
         "streamed-host-kv": ("encoded", "rows", "kv")}
MODEL_MODES = (*MODES, *MOVED)
GIB = 2 ** 30


def make_video(path: Path, seconds: float, fps: float, width: int = 640, height: int = 360) -> Path:
    """A synthetic video: a new scene every minute, a square moving across it; encoded a frame at a time."""
    import av
    import numpy as np
    from fractions import Fraction

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part.mp4")
    colours = [(30, 60, 160), (40, 140, 60), (25, 25, 30), (150, 90, 40), (120, 40, 120)]
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for i in range(int(seconds * fps)):
            t = i / fps
            img = np.empty((height, width, 3), dtype=np.uint8)
            img[:] = colours[int(t // 60) % len(colours)]
            x = int((t % 60) / 60 * (width - 48))
            img[height // 2 - 24:height // 2 + 24, x:x + 48] = (220, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.rename(path)
    return path


def child(mode: str, frames: int, video: str, new_tokens: int, shape: str = "tiny-qwen3-vl", device: str = "cpu",
          cap_gb: float = 0.0, sampling: str = "uniform", fps: float = 1.0, prefill_chunk: int | None = None,
          keep_prefix: bool = False, encoded: str = "auto", kv: str = "auto") -> dict:
    """One measurement, in this (fresh) process. On CUDA, with cap_gb, torch may allocate at most that
    much of the card (set_per_process_memory_fraction); the peak is then torch's peak allocated.
    AdaTP keeps the video's prefix for a next question only with keep_prefix (the CLI does so for
    several questions; one question, as here, keeps nothing). encoded: where AdaTP's encoded rows wait;
    kv: where layers >= K's keys and values live while answering (auto, device or host: places.py)."""
    import resource

    import torch

    from adatp_core.models.loader import load_video_llm
    from adatp_core.models.tiny_qwen import ensure_tiny_qwen3_vl
    from adatp_core.peak_memory import process_peak

    torch.set_num_threads(2)
    cuda = device.startswith("cuda")
    if cuda and cap_gb:
        torch.cuda.set_per_process_memory_fraction(cap_gb * GIB / torch.cuda.get_device_properties(0).total_memory)
    if shape == "tiny-qwen3-vl":
        folder = ensure_tiny_qwen3_vl()
        llm = load_video_llm(folder, device=device, dtype="float32")
    else:
        from shapes import build

        llm = build(shape, device, torch.bfloat16)
    loaded = process_peak()
    start = time.perf_counter()
    out = {"mode": mode, "frames": frames, "shape": shape, "device": device}
    if mode == "stock":
        from adatp_core.attention import plan_prompt
        from adatp_core.models.stock import stock_video_inputs
        from adatp_core.video import decode_plan, frames_to_image, plan_sampling

        if shape == "tiny-qwen3-vl":
            import transformers

            stock = getattr(transformers, llm.adapter.model_class).from_pretrained(
                folder, local_files_only=True, dtype=torch.float32, attn_implementation="sdpa").eval()
        else:  # the same random weights, driven by transformers' own generate()
            stock = llm.model
        sample = plan_sampling(video, frames, sampling, fps)
        decoded, info = decode_plan(sample)
        image = frames_to_image(decoded)
        del decoded
        prompt = plan_prompt(llm.adapter, QUESTION, len(sample.times), image.shape[1], image.shape[2],
                             info.timestamps)
        with torch.inference_mode():
            kwargs = stock_video_inputs(llm, prompt, llm.adapter.preprocess(image, prompt.plan))
            ids = prompt.input_ids[None].to(llm.adapter.device)
            got = stock.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, **kwargs)
        out.update(prompt_tokens=prompt.length, answer=llm.tokenizer.decode(got[0, ids.shape[1]:]))
    else:
        from dataclasses import replace

        from adatp_core.generate import SamplingConfig
        from adatp_core.pipeline import PipelineConfig, run_pipeline

        cfg = PipelineConfig(num_frames=frames, sampling=sampling, fps=fps, stream=mode == "streamed",
                             generation=SamplingConfig(max_new_tokens=new_tokens, do_sample=False),
                             reuse_prefix=keep_prefix, encoded=encoded, kv=kv)
        if prefill_chunk is not None:
            cfg = replace(cfg, prefill_chunk=prefill_chunk)
        result = run_pipeline(llm, video, QUESTION, cfg)
        s = result.stats
        place = "cuda0" if cuda else "host"
        out.update(prompt_tokens=s.get("prompt_tokens"), answer=result.answer.text, prefix_cache=s.get("prefix_cache"),
                   encoded_on=s.get("encoded_on"), kv_on=s.get("kv_on"),
                   planned_mb=s.get(f"memory_planned_peak_{place}_mb"), ttft=s.get("time_to_first_token"),
                   stages_mb={k[len("memory_peak_"):-len(f"_{place}_mb")]: v for k, v in s.items()
                              if k.startswith("memory_peak_") and k.endswith(f"_{place}_mb")
                              and k != f"memory_peak_{place}_mb"})
    out.update(seconds=round(time.perf_counter() - start, 2), loaded_gib=round(loaded / GIB, 3),
               peak_gib=round(max(process_peak(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / GIB, 3))
    if cuda:
        out["cuda_peak_gib"] = round(max(torch.cuda.max_memory_allocated(),
                                         *(v * 1e6 for v in out.get("stages_mb", {}).values())) / GIB, 3)
    return out


def measure(frames_list, modes, video: Path, new_tokens: int, timeout: float, extra=()) -> list[dict]:
    rows = []
    for n in frames_list:
        for mode in modes:
            cmd = [sys.executable, __file__, "--child", mode, "--frames", str(n), "--video", str(video),
                   "--new-tokens", str(new_tokens), *extra]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
                row = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {
                    "mode": mode, "frames": n, "error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
            except subprocess.TimeoutExpired:
                row = {"mode": mode, "frames": n, "error": f"over {timeout:.0f} s"}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


# -- the memory model for real shapes -------------------------------------------------------------

REAL = {"qwen3-vl-8b": "Qwen3-VL-8B", "qwen3.5-9b": "Qwen3.5-9B", "7b": "LLaVA-OV-7B"}


def _real_shape(key: str):
    """(adapter of the tiny model of the family: its prompt layout; LLMShape; VisionShape-maker; weights bytes bf16)."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from adatp_core.flops import LLMShape
    from adatp_core.models.loader import ADAPTERS, load_video_llm
    from shapes import SHAPES, TINY_OF, _config

    spec = SHAPES[key]
    folder = TINY_OF[spec.family]()
    tiny = load_video_llm(folder, device="cpu", dtype="float32")
    config = _config(spec, AutoTokenizer.from_pretrained(folder, local_files_only=True))
    with torch.device("meta"):
        model = getattr(transformers, ADAPTERS[config.model_type].model_class)._from_config(config)
    weights = sum(p.numel() for p in model.parameters()) * 2
    fake = SimpleNamespace(model=SimpleNamespace(config=config), patch_grid=tiny.adapter.__dict__.get("patch_grid"))
    vision = (lambda plan: type(tiny.adapter).vision_shape(fake, plan))
    injections = len(getattr(config.vision_config, "deepstack_visual_indexes", None) or ())
    limit = int(config.get_text_config().max_position_embeddings)
    return tiny.adapter, LLMShape.from_config(config.get_text_config()), vision, weights, injections, limit


def _estimator(adapter, llm, vision, weights, injections, prefill_chunk: int = 8192):
    """estimate(frames, mode, retention=0.25, max_pixels=None) -> (device GB, host GB, prompt tokens, positions)
    by budget.run_memory, at 448x448 decoded frames, 64 new tokens, K = 2."""
    from adatp_core.budget import RunPlan, run_memory
    from adatp_core.fits import placed

    def estimate(n, mode, retention=0.25, max_pixels=None):
        plan = adapter.plan_video(n, 448, 448, times=[i * 1.0 for i in range(n)], max_pixels=max_pixels)
        prompt = adapter.build_prompt(QUESTION, plan)
        run = RunPlan(llm=llm, vision=vision(plan), frames=n, decoded=(448, 448), pixels=plan.size,
                      prompt_tokens=prompt.length, visual_tokens=len(prompt.visual_positions), layer=2,
                      retention=None if mode == "stock" else retention, streamed=mode.startswith("streamed"),
                      chunk_frames=n if mode == "stock" else 16, frames_per_step=plan.frames_per_step,
                      prefill_chunk=prefill_chunk if mode.startswith("streamed") else 0, injections=injections,
                      max_new_tokens=64, item=2, where="cuda:0", weights=weights)
        est = run_memory(placed(run, frozenset(MOVED.get(mode, ()))))
        extent = adapter.position_extent(prompt) if adapter.mrope else prompt.length
        return est.peak_on("cuda:0") / 1e9, est.peak_on("host") / 1e9, prompt.length, extent
    return estimate


def what_fits(frames: int = 1800, cap_gb: float = 24.0) -> list[dict]:
    """Qwen3-VL-8B at ``frames`` (1 fps: 30 minutes), streamed: the device's peak by the memory model at
    several retentions and pixel budgets, with the encoded rows and layer K's rows on the host, and with
    the keys and values >= K there too; whether each fits ``cap_gb`` as the check before decoding judges
    it: what the run still allocates within DEVICE_MEMORY_SHARE of what the cap leaves beside the weights."""
    from adatp_core.budget import DEVICE_MEMORY_SHARE

    adapter, llm, vision, weights, injections, _ = _real_shape("qwen3-vl-8b")
    room = DEVICE_MEMORY_SHARE * (cap_gb - weights / 1e9)
    estimate = _estimator(adapter, llm, vision, weights, injections)
    rows = []
    for max_pixels in (None, 384 * 384, 336 * 336):
        for retention in (0.25, 0.2, 0.15, 0.1):
            row = {"frames": frames, "max_pixels": max_pixels or 448 * 448, "retention": retention}
            for mode in ("streamed-host-rows", "streamed-host-kv"):
                dev, host, length, _ = estimate(frames, mode, retention, max_pixels)
                row[mode] = {"device_gb": round(dev, 2), "host_gb": round(host, 2),
                             "fits": dev - weights / 1e9 <= room}
            row["prompt_tokens"] = length
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def model_table(frames_list, cap_gb: float = 24.0, prefill_chunk: int = 8192) -> list[dict]:
    rows = []
    for key, name in REAL.items():
        adapter, llm, vision, weights, injections, limit = _real_shape(key)
        estimate = _estimator(adapter, llm, vision, weights, injections, prefill_chunk)

        def most(mode):
            lo, hi = 0, 16384
            while lo < hi:
                mid = (lo + hi + 1) // 2
                dev, _, _, extent = estimate(mid, mode)
                lo, hi = (mid, hi) if dev <= cap_gb and extent <= limit else (lo, mid - 1)
            return lo

        fits = {mode: most(mode) for mode in MODEL_MODES}
        for n in frames_list:
            row = {"model": name, "frames": n, "weights_gb": round(weights / 1e9, 2)}
            for mode in MODEL_MODES:
                dev, host, length, extent = estimate(n, mode)
                row[mode] = {"device_gb": round(dev, 2), "host_gb": round(host, 2)}
            row.update(prompt_tokens=length, positions=extent, context=limit, fits=extent <= limit)
            rows.append(row)
        rows.append({"model": name, "most_frames_in_gb": cap_gb, **fits})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def print_tables(measured, modelled) -> None:
    if measured:
        print("\n| frames | " + " | ".join(f"{m} peak GiB" for m in MODES) + " | streamed stages (MB) | prompt tokens |")
        print("|---:|" + "---:|" * len(MODES) + "---|---:|")
        for n in sorted({r["frames"] for r in measured}):
            by = {r["mode"]: r for r in measured if r["frames"] == n}
            cells = [str(by[m].get("peak_gib", by[m].get("error", "-"))) if m in by else "-" for m in MODES]
            stages = by.get("streamed", {}).get("stages_mb", {})
            print(f"| {n} | " + " | ".join(cells) + f" | {stages} | {by.get('streamed', {}).get('prompt_tokens')} |")
    if modelled:
        print("\n| model | frames | prompt tokens | positions | stock GB (device / host) | one-pass | streamed | "
              "streamed, encoded rows on the host | and layer K's rows too | and keys and values >= K too |")
        print("|---|---:|---:|---:|---|---|---|---|---|---|")
        for r in modelled:
            if "most_frames_in_gb" in r:
                continue
            cells = [f"{r[m]['device_gb']} / {r[m]['host_gb']}" for m in MODEL_MODES]
            ctx = "" if r["fits"] else " (over context)"
            print(f"| {r['model']} | {r['frames']} | {r['prompt_tokens']} | {r['positions']}{ctx} | " + " | ".join(cells) + " |")
        for r in modelled:
            if "most_frames_in_gb" in r:
                print(f"most frames in {r['most_frames_in_gb']} GB, {r['model']}: " +
                      ", ".join(f"{m} {r[m]}" for m in MODEL_MODES))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", default="64,128,256,512,1024")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--video", default=str(ROOT / "bench" / "results" / "long_video.mp4"),
                   help="made if missing: --seconds long at 2 fps, 640x360")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--model-frames", default="64,128,256,512,1024,1800,3600")
    p.add_argument("--model-only", action="store_true")
    p.add_argument("--out")
    p.add_argument("--shape", default="tiny-qwen3-vl", help="tiny-qwen3-vl, or a real shape of bench/shapes.py "
                                                            "(random weights in bf16), e.g. qwen3-vl-8b on a GPU")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cap-gb", type=float, default=0.0, help="CUDA: allocate at most this much of the card")
    p.add_argument("--sampling", default="uniform", choices=("uniform", "fps"))
    p.add_argument("--fps", type=float, default=1.0, help="with --sampling fps (--frames 0: the whole video)")
    p.add_argument("--seconds", type=float, default=1200, help="length of the synthetic video made if missing")
    p.add_argument("--prefill-chunk", type=int, default=None, help="AdaTP's prefill chunk (default: the pipeline's)")
    p.add_argument("--keep-prefix", action="store_true",
                   help="AdaTP keeps the video's prefix for a next question (the CLI's several questions); "
                        "default: one question, as the CLI asks it, keeps nothing")
    p.add_argument("--encoded", default="auto", choices=("auto", "device", "host"),
                   help="where AdaTP's encoded visual rows and DeepStack's wait (auto: the host when the device is short)")
    p.add_argument("--kv", default="auto", choices=("auto", "device", "host"),
                   help="AdaTP: where layers >= K keep their keys and values while answering (places.py)")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    extra = ("--shape", args.shape, "--device", args.device, "--cap-gb", str(args.cap_gb), "--sampling",
             args.sampling, "--fps", str(args.fps),
             *(("--prefill-chunk", str(args.prefill_chunk)) if args.prefill_chunk is not None else ()),
             *(("--keep-prefix",) if args.keep_prefix else ()), "--encoded", args.encoded, "--kv", args.kv)
    if args.child:
        print(json.dumps(child(args.child, int(args.frames), args.video, args.new_tokens, args.shape, args.device,
                               args.cap_gb, args.sampling, args.fps, args.prefill_chunk, args.keep_prefix,
                               args.encoded, args.kv)),
              flush=True)
        return 0
    measured = []
    if not args.model_only:
        video = make_video(Path(args.video), seconds=args.seconds, fps=2.0)
        measured = measure([int(x) for x in args.frames.split(",")], args.modes.split(","), video, args.new_tokens,
                           args.timeout, extra)
    modelled = model_table([int(x) for x in args.model_frames.split(",")])
    fitting = what_fits()
    print_tables(measured, modelled)
    print("\nQwen3-VL-8B, 1800 frames streamed, device GB by the memory model (over: the check before decoding "
          "refuses it under a 24 GB cap): pixels per frame, R, prompt tokens, encoded and layer K's rows on the host, "
          "and keys and values >= K too")
    for r in fitting:
        print(f"| {r['max_pixels']} | {r['retention']} | {r['prompt_tokens']} | "
              + " | ".join(f"{r[m]['device_gb']}{'' if r[m]['fits'] else ' (over)'}"
                           for m in ("streamed-host-rows", "streamed-host-kv")) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"measured": measured, "modelled": modelled, "what_fits": fitting},
                                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
