"""The prefill in chunks (issue 30, items 3-5): peak memory and time of AdaTP's prefill (layers < K
and the scores, then the kept tokens from K) against the chunk size, with layer K's input rows
on the device or on the host, and layers >= K's keys and values on the device or on the host while
answering (--kv; on the host each layer is staged on the device while it runs), for one model shape
at several frame counts.

Every setting runs in a fresh process (a peak is a high-water mark). Peak: on CUDA the peak
allocated memory minus what the model and frames took before the prefill; on the CPU the growth
of the process's peak resident memory over the same point (the host is the device there, so
"rows on the host" costs nothing and its line only fakes a device). The first greedy tokens are
printed: every setting of one frame count must show the same ones.

    python bench/chunked_prefill.py                                  # tiny Qwen3-VL, CPU
    python bench/chunked_prefill.py --shape 0.5b --layers 3 --frames 64 --size 384x384   # real widths, CPU
    python bench/chunked_prefill.py --shape qwen3-vl-8b --device cuda --dtype bfloat16 \\
        --frames 256,1024,1800 --size 448x448 --chunks 0,8192,2048 --rows device,host --cap-gib 24
    python bench/chunked_prefill.py --shape qwen3-vl-8b --device cuda --dtype bfloat16 \
        --frames 1024,1800 --size 448x448 --chunks 8192 --rows host --kv device,host --cap-gib 24
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import build  # noqa: E402

from adatp_core.attention import extract_attention  # noqa: E402
from adatp_core.generate import SamplingConfig, generate_answer  # noqa: E402
from adatp_core.pipeline import PipelineConfig, select  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def one(args) -> dict:
    """One setting, in this process."""
    device = torch.device(args.device)
    if device.type == "cuda" and args.cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total), device)
    shape = args.shape
    if args.layers:  # a real shape cut to its first layers: what the prefill of layers < K and from K holds
        import shapes

        spec = shapes.SHAPES[shape]
        depth = "num_hidden_layers" if "num_hidden_layers" in spec.vision else "depth"
        shape = f"{shape}-{args.layers}-layers"
        shapes.SHAPES[shape] = replace(spec, text={**spec.text, "num_hidden_layers": args.layers},
                                       vision={**spec.vision, depth: 1})
    model = build(shape, args.device, DTYPES[args.dtype])
    width, height = (int(x) for x in args.size.split("x"))
    gen = torch.Generator().manual_seed(0)
    frames = torch.rand((args.frames, height, width, 3), generator=gen).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _peak_rss()
    start = time.perf_counter()
    state = extract_attention(model, frames, "What happens in this video?", layer=args.layer, reuse_prefix=False,
                              prefill_chunk=args.chunk, rows=args.rows)
    state = select(state, PipelineConfig(retention=args.retention))
    answer = generate_answer(state, SamplingConfig(max_new_tokens=4, ignore_eos=True, decode_mode="default"),
                             kv=args.kv)
    wall = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss()) - base
    s = answer.stats
    return {"frames": args.frames, "chunk": args.chunk, "rows": args.rows, "kv": s["kv_on"],
            "tokens": state.prompt.length, "ms_per_token": s["decode_ms_per_token"],
            "calls": s["prefill_calls"], "rows_on": s["rows_on"], "peak_gib": peak / 2**30,
            "layers_below_k_s": s["time_attention"], "from_k_s": s["time_prefill_continue"],
            "ttft_s": s["time_to_first_token"], "wall_s": wall, "tokens_out": list(answer.token_ids)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny-qwen3-vl")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--frames", default="64,256", help="frame counts, comma-separated")
    p.add_argument("--size", default="224x224", help="frame size WxH")
    p.add_argument("--chunks", default="0,8192,2048,512", help="prefill_chunk values (0: one call)")
    p.add_argument("--rows", default="device,host", help="where layer K's input rows wait")
    p.add_argument("--kv", default="device", help="where layers >= K's keys and values live while answering "
                                                   "(device, host, auto; comma-separated)")
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--retention", type=float, default=0.25)
    p.add_argument("--layers", type=int, default=0,
                   help="cut a real shape to this many LLM layers and one vision layer (CPU figures of real widths)")
    p.add_argument("--cap-gib", type=float, default=0.0, help="CUDA: cap the process at this many GiB")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        args.frames = int(args.frames)
        print(json.dumps(one(args)))
        return
    cut = f", cut to {args.layers} LLM layers and 1 vision layer" if args.layers else ""
    print(f"{args.shape}{cut} on {args.device} ({args.dtype}), frames {args.size}, K={args.layer}, R={args.retention}")
    print(f"{'frames':>6} {'tokens':>7} {'chunk':>6} {'rows':>6} {'kv':>6} {'calls':>5} {'peak GiB':>9} "
          f"{'<K s':>7} {'from K s':>8} {'TTFT s':>7} {'ms/tok':>7}  first tokens")
    for frames in args.frames.split(","):
        for chunk in args.chunks.split(","):
            for rows in args.rows.split(","):
                for kv in args.kv.split(","):
                    cmd = [sys.executable, __file__, "--one", "--shape", args.shape, "--device", args.device,
                           "--dtype", args.dtype, "--frames", frames, "--size", args.size, "--chunk", chunk,
                           "--rows", rows, "--kv", kv, "--layer", str(args.layer), "--retention",
                           str(args.retention), "--cap-gib", str(args.cap_gib), "--layers", str(args.layers)]
                    run = subprocess.run(cmd, capture_output=True, text=True)
                    if run.returncode:
                        tail = (run.stderr.strip().splitlines() or ["?"])[-1][:150]
                        print(f"{frames:>6} {'':>7} {chunk:>6} {rows:>6} {kv:>6} failed: {tail}")
                        continue
                    r = json.loads(run.stdout.strip().splitlines()[-1])
                    print(f"{r['frames']:>6} {r['tokens']:>7} {r['chunk']:>6} {r['rows']:>6} {r['kv']:>6} "
                          f"{r['calls']:>5} {r['peak_gib']:>9.3f} {r['layers_below_k_s']:>7.2f} {r['from_k_s']:>8.2f} "
                          f"{r['ttft_s']:>7.2f} {r['ms_per_token']:>7.1f}  {r['tokens_out']}", flush=True)


if __name__ == "__main__":
    main()
