"""Command line: answer a question about a video with AdaTP.

    python -m adatp_core                       # built-in tiny model, sample video
    python -m adatp_core --model models/LLM/llava-onevision-qwen2-7b-ov-hf \\
        --video clip.mp4 --question "What is the person doing?"
    python -m adatp_core --question "Who?" --question "Where?"   # one video, several answers
    python -m adatp_core caption DIR           # a caption .txt beside every clip (caption/cli.py)
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

from .caption.cli import main as caption_main
from .cli_options import add_model_arguments, load_model, pipeline_config
from .clips.cli import main as clips_main
from .doctor import main as doctor_main
from .errors import AdaTPEnvironmentError, AdaTPInputError
from .memory import release_pinned
from .models.names import models_main
from .peak_memory import stage_peak
from .pipeline import load_checked, run_pipeline, stream_checked
from .report import stats_text
from .samples import sample_video
from .timing import timed
from .video import ProcessorSampling

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


def format_report(result, load_seconds: float, wall: float) -> str:
    return (f"Answer: {result.answer.text}\n{stats_text(result.stats)}; "
            f"model load {load_seconds:.2f} s; wall {wall:.2f} s")


def main(argv=None) -> int:
    as_program = argv is None  # python -m adatp_core, not a call from Python
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["caption"]:
        return caption_main(argv[1:], as_program=as_program)
    if argv[:1] == ["clips"]:
        return clips_main(argv[1:], as_program=as_program)
    if argv[:1] == ["doctor"]:
        return doctor_main(argv[1:])
    if argv[:1] == ["models"]:
        return models_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    wall_start = time.perf_counter()
    try:
        cfg = pipeline_config(args)  # every setting checked before the model loads
        load_start = time.perf_counter()
        model = load_model(args.model, args.device, args.dtype)
        load_seconds = time.perf_counter() - load_start
        if args.sampling == "model":  # the model's video processor's fps and frame limits
            cfg = dataclasses.replace(cfg, sampling=ProcessorSampling(*model.adapter.processor_sampling()))
        elif args.sampling == "fps":
            cfg = dataclasses.replace(cfg, sampling="fps", fps=args.fps)
        questions = args.question or [DEFAULT_QUESTION]
        # The video's prefix is kept for the next question: with one question there is none in this process.
        # Over prefill_chunk tokens the prefill runs the same calls either way; a shorter prompt is one call
        # instead of two (video, then question): scores within float tolerance.
        cfg = dataclasses.replace(cfg, stream=args.stream, chunk_frames=args.chunk_frames,
                                  reuse_prefix=len(questions) > 1)
        video, info, decode_times, places = args.video or sample_video(), None, {}, None
        if len(questions) > 1:  # decode once; the model's prefix cache then encodes the video once
            if cfg.stream:  # encoded once, a chunk at a time; every question takes the encoded video
                with stage_peak(decode_times, "encode", model.adapter.device):
                    video, info, planned = stream_checked(model, video, questions, cfg)
            else:  # the frames keep no placements: the check's go to every question's run
                with timed(decode_times, "time_video_decode"):
                    video, info, fit = load_checked(model, video, questions, cfg)
                planned, places = fit.figures, fit.places
            decode_times.update(planned)
        for i, question in enumerate(questions):
            result = run_pipeline(model, video, question, cfg, video_info=info, places=places)
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
            del result  # its state's rows on the host, pinned for a GPU: given back before the next question
            release_pinned()
        del video  # an encoded video's rows on the host
        release_pinned()
    except (AdaTPInputError, AdaTPEnvironmentError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
