"""Command line: answer a question about a video with AdaTP.

    python -m adatp_core                       # built-in tiny model, sample video
    python -m adatp_core --model models/LLM/llava-onevision-qwen2-7b-ov-hf \\
        --video clip.mp4 --question "What is the person doing?"
    python -m adatp_core --question "Who?" --question "Where?"   # one video, several answers
    python -m adatp_core caption DIR           # a caption .txt beside every clip (caption_cli.py)
    python -m adatp_core clips SOURCE --out DIR  # long videos -> shots -> clips -> captions (clips/cli.py)
    python -m adatp_core doctor                # self-check on this machine's device (doctor.py)
    python -m adatp_core models                # the models --model takes (models/names.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

from .attention import DEFAULT_PREFILL_CHUNK
from .errors import AdaTPEnvironmentError, AdaTPInputError
from .generate import DECODE_MODES
from .report import stats_text

DEFAULT_QUESTION = "What happens in this video?"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adatp_core", description=__doc__.splitlines()[0],
                                epilog="Caption a folder of clips: python -m adatp_core caption --help; "
                                       "check this machine: python -m adatp_core doctor")
    p.add_argument("--video", help="video file (default: the pack's sample video)")
    p.add_argument("--question", action="append", default=None,
                   help="the question (default: %r); give it several times to ask several questions: "
                        "the video is decoded and encoded once, and each question gets its answer" % DEFAULT_QUESTION)
    add_model_arguments(p, max_new_tokens=32)
    p.add_argument("--sampling", choices=("uniform", "fps", "model"), default="uniform",
                   help="uniform (default): --frames evenly spaced frames; fps: one frame every 1/--fps seconds, "
                        "at most --frames; model: as the model's video processor samples (Qwen3-VL, Qwen3.5, "
                        "Qwen3.6: 2 frames a second, 4 to 768 frames; --frames not used)")
    p.add_argument("--fps", type=float, default=1.0,
                   help="frames per second for --sampling fps (default 1); with --frames 0, for the whole video "
                        "(--sampling fps --fps 1 --frames 0: one frame a second of all of it)")
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="decode every sampled frame into memory before encoding (default: the video is decoded, "
                        "preprocessed and encoded a chunk of frames at a time, so long videos fit)")
    p.add_argument("--chunk-frames", type=int, default=None,
                   help="frames per vision chunk when streaming (default: the model's, 16)")
    p.add_argument("--json", action="store_true",
                   help="print every figure as JSON (several questions: one object per line, per question)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def add_model_arguments(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The model and AdaTP options, shared with ``caption`` (caption_cli.py)."""
    p.add_argument("--model", help="a model folder, a built-in model (adatp-tiny-qwen3-vl), a folder name under "
                                   "models/LLM, or a catalog repository id (downloaded on first use); "
                                   "'python -m adatp_core models' lists them (default: the built-in tiny model)")
    p.add_argument("--frames", type=int, default=32, help="frames sampled uniformly (default 32); with --sampling fps, the most taken (0: no cap)")
    p.add_argument("--max-pixels", type=pixel_budget, default=0,
                   help="Qwen models: pixel budget per frame (default 0: the pack's 448x448), or 'model': the "
                        "model's own video budget, spread over the frames as transformers' processor spreads it; "
                        "LLaVA-OV ignores it")
    p.add_argument("--retention", type=float, default=0.25, help="fraction of visual tokens kept (default 0.25)")
    p.add_argument("--layer", type=int, default=2, help="prune after K LLM layers (0: before the LLM)")
    p.add_argument("--query", choices=("text", "last"), default="text")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help=f"tokens per forward call of the prefill (default {DEFAULT_PREFILL_CHUNK}; 0: the whole prompt in one call): "
                        "a longer video runs layers < K and the kept tokens from K chunk by chunk, so only one "
                        "chunk's activations exist at a time; a prompt within one chunk runs as with 0")
    p.add_argument("--vanilla", action="store_true", help="no pruning: the stock model")
    p.add_argument("--no-global-debias", action="store_true", help="leave out GlobalDebias")
    p.add_argument("--no-local-debias", action="store_true", help="leave out LocalDebias")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    # Unset (None): the model's generation_config.json, else transformers' default (sampling.py).
    sample = p.add_mutually_exclusive_group()
    sample.add_argument("--do-sample", dest="do_sample", action="store_const", const=True, default=None,
                        help="sample (default: as the model's generation_config.json says; greedy if it says nothing)")
    sample.add_argument("--greedy", dest="do_sample", action="store_const", const=False, help="never sample")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the model's, else 1.0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default: the model's, else 1.0)")
    p.add_argument("--top-k", type=int,
                   help="sample from the k likeliest tokens, 0: off (default: the model's, else 50)")
    p.add_argument("--repetition-penalty", type=float,
                   help="above 1 discourages tokens already in the prompt or answer (default: the model's, else 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--decode-mode", choices=DECODE_MODES, default="auto",
                   help="static: fixed-shape decode steps, CUDA graphs on CUDA reused across answers; "
                        "auto (default): static on CUDA, default elsewhere")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")


def pixel_budget(value: str):
    """--max-pixels: "model", or an integer (checked with the other settings, attention._check_max_pixels)."""
    if value.strip().lower() == "model":
        return "model"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither 'model' nor a number of pixels") from None


def pipeline_config(args):
    """PipelineConfig from the options of ``add_model_arguments``."""
    from .generate import SamplingConfig
    from .pipeline import PipelineConfig

    return PipelineConfig(
        num_frames=args.frames, layer=args.layer, query=args.query, max_pixels=args.max_pixels,
        prefill_chunk=args.prefill_chunk,
        retention=None if args.vanilla else args.retention,
        global_debias=not args.no_global_debias, local_debias=not args.no_local_debias,
        generation=SamplingConfig(max_new_tokens=args.max_new_tokens, decode_mode=args.decode_mode,
                                  do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
                                  top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed),
    )


def format_report(result, load_seconds: float, wall: float) -> str:
    return (f"Answer: {result.answer.text}\n{stats_text(result.stats)}; "
            f"model load {load_seconds:.2f} s; wall {wall:.2f} s")


def load_model(name, device: str = "auto", dtype: str = "auto"):
    """The model ``name`` stands for (models/names.py), the built-in tiny model when None."""
    from transformers.utils import logging as hf_logging

    from .models.loader import load_video_llm
    from .models.names import BUILTIN_TINY, resolve_model_name

    hf_logging.disable_progress_bar()  # this process's output is the report
    resolved = resolve_model_name(name or BUILTIN_TINY, on_progress=_download_progress())
    return load_video_llm(resolved.folder, device=device, dtype=dtype, name=resolved.name)


def _download_progress():
    """A catalog download's progress on stderr, at most once a second (the report stays on stdout)."""
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0 or done == total:
            last[0] = now
            print(f"downloading: {done / 1e9:.2f} of {total / 1e9:.2f} GB", file=sys.stderr, flush=True)

    return report


def main(argv=None) -> int:
    as_program = argv is None  # python -m adatp_core, not a call from Python
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["caption"]:
        from .caption_cli import main as caption_main

        return caption_main(argv[1:], as_program=as_program)
    if argv[:1] == ["clips"]:
        from .clips.cli import main as clips_main

        return clips_main(argv[1:], as_program=as_program)
    if argv[:1] == ["doctor"]:
        from .doctor import main as doctor_main

        return doctor_main(argv[1:])
    if argv[:1] == ["models"]:
        from .models.names import models_main

        return models_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    wall_start = time.perf_counter()
    try:
        from .pipeline import run_pipeline
        from .samples import sample_video

        cfg = pipeline_config(args)  # every setting checked before the model loads
        load_start = time.perf_counter()
        model = load_model(args.model, args.device, args.dtype)
        load_seconds = time.perf_counter() - load_start
        if args.sampling == "model":  # the model's video processor's fps and frame limits
            from .video import ProcessorSampling

            cfg = dataclasses.replace(cfg, sampling=ProcessorSampling(*model.adapter.processor_sampling()))
        elif args.sampling == "fps":
            cfg = dataclasses.replace(cfg, sampling="fps", fps=args.fps)
        cfg = dataclasses.replace(cfg, stream=args.stream, chunk_frames=args.chunk_frames)
        questions = args.question or [DEFAULT_QUESTION]
        video, info, decode_times = args.video or sample_video(), None, {}
        if len(questions) > 1:  # decode once; the model's prefix cache then encodes the video once
            from .pipeline import load_checked, stream_checked
            from .timing import timed

            if cfg.stream:  # encoded once, a chunk at a time; every question takes the encoded video
                from .peak_memory import stage_peak

                with stage_peak(decode_times, "encode", model.adapter.device):
                    video, info, planned = stream_checked(model, video, questions, cfg)
            else:
                with timed(decode_times, "time_video_decode"):
                    video, info, planned = load_checked(model, video, questions, cfg)
            decode_times.update(planned)
        for i, question in enumerate(questions):
            result = run_pipeline(model, video, question, cfg, video_info=info)
            wall = time.perf_counter() - wall_start
            stats = {**result.stats, **(decode_times if i == 0 else {})}
            if args.json:
                figures = {"answer": result.answer.text, **stats, "time_model_load": load_seconds, "time_wall": wall}
                if len(questions) > 1:
                    print(json.dumps({"question": question, **figures}, default=str), flush=True)
                else:
                    print(json.dumps(figures, indent=2, default=str))
            else:
                if len(questions) > 1:
                    print(f"{'' if i == 0 else chr(10)}Question: {question}")
                print(format_report(dataclasses.replace(result, stats=stats), load_seconds, wall), flush=True)
            wall_start = time.perf_counter()
            load_seconds = 0.0
    except (AdaTPInputError, AdaTPEnvironmentError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
