"""Command line: answer a question about a video with AdaTP.

    python -m adatp_core                       # built-in tiny model, sample video
    python -m adatp_core --model models/LLM/llava-onevision-qwen2-7b-ov-hf \\
        --video clip.mp4 --question "What is the person doing?"
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from .errors import AdaTPEnvironmentError, AdaTPInputError
from .report import stats_text

DEFAULT_QUESTION = "What happens in this video?"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adatp_core", description=__doc__.splitlines()[0])
    p.add_argument("--video", help="video file (default: the pack's sample video)")
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--model", help="local model folder (default: the built-in tiny random model)")
    p.add_argument("--frames", type=int, default=32, help="frames sampled uniformly (default 32)")
    p.add_argument("--retention", type=float, default=0.25, help="fraction of visual tokens kept (default 0.25)")
    p.add_argument("--layer", type=int, default=2, help="prune after K LLM layers (0: before the LLM)")
    p.add_argument("--query", choices=("text", "last"), default="text")
    p.add_argument("--vanilla", action="store_true", help="no pruning: the stock model")
    p.add_argument("--no-global-debias", action="store_true", help="leave out GlobalDebias")
    p.add_argument("--no-local-debias", action="store_true", help="leave out LocalDebias")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--decode-mode", choices=("default", "static"), default="default",
                   help="static: fixed-shape decode steps, a CUDA graph on CUDA (greedy)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", action="store_true", help="print every figure as JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def format_report(result, load_seconds: float, wall: float) -> str:
    return (f"Answer: {result.answer.text}\n{stats_text(result.stats)}; "
            f"model load {load_seconds:.2f} s; wall {wall:.2f} s")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    wall_start = time.perf_counter()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # this process's output is the report
        from .generate import SamplingConfig
        from .models.loader import load_video_llm
        from .models.tiny import TINY_MODEL_NAME, ensure_tiny_model
        from .pipeline import PipelineConfig, run_pipeline
        from .samples import sample_video

        load_start = time.perf_counter()
        if args.model:
            model = load_video_llm(args.model, device=args.device, dtype=args.dtype)
        else:
            model = load_video_llm(ensure_tiny_model(), device=args.device, dtype=args.dtype, name=TINY_MODEL_NAME)
        load_seconds = time.perf_counter() - load_start
        cfg = PipelineConfig(
            num_frames=args.frames, layer=args.layer, query=args.query,
            retention=None if args.vanilla else args.retention,
            global_debias=not args.no_global_debias, local_debias=not args.no_local_debias,
            generation=SamplingConfig(max_new_tokens=args.max_new_tokens, decode_mode=args.decode_mode),
        )
        result = run_pipeline(model, args.video or sample_video(), args.question, cfg)
    except (AdaTPInputError, AdaTPEnvironmentError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - wall_start
    if args.json:
        print(json.dumps({"answer": result.answer.text, **result.stats,
                          "time_model_load": load_seconds, "time_wall": wall}, indent=2, default=str))
    else:
        print(format_report(result, load_seconds, wall))
    return 0
