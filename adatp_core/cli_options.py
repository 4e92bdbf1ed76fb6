"""The options both command lines take (``python -m adatp_core`` and its ``caption`` and ``clips``
commands): the model and AdaTP settings, and what they build, a PipelineConfig and the loaded model.
"""

from __future__ import annotations

import argparse
import sys
import time

from transformers.utils import logging as hf_logging

from .attention import DEFAULT_PREFILL_CHUNK
from .caption.stream import DEFAULT_PROMPT
from .places import PLACES
from .models.loader import load_video_llm
from .models.names import BUILTIN_TINY, resolve_model_name
from .pipeline import PipelineConfig
from .sampling import DECODE_MODES, SamplingConfig


def add_model_arguments(p: argparse.ArgumentParser, max_new_tokens: int, one_answer: bool = True) -> None:
    """The model and AdaTP options, shared with ``caption`` (caption/cli.py) and ``clips``.
    one_answer: the command answers one question at a time (not captions decoded together, whose rows
    stay on the device): it takes --kv too."""
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
    p.add_argument("--encoded", choices=PLACES, default="auto",
                   help="where the encoded visual rows wait for the prefill: auto (default: the device, or the host "
                        "when the device is short; moved first), device, or host")
    p.add_argument("--rows", choices=PLACES, default="auto",
                   help="where layer K's input rows wait for the selection: auto (default: the device, or the host "
                        "when the device is short, after the encoded rows), device, or host")
    if one_answer:
        p.add_argument("--kv", choices=PLACES, default="auto",
                       help="where layers >= K keep their keys and values while answering: auto (default: the "
                            "device, or the host when the device is short, after the encoded rows and layer K's), "
                            "device, or host (each layer staged on the device while it runs; slower, and decoding "
                            "runs in default steps)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")


def add_caption_arguments(p, decode_only: bool = False) -> None:
    """The caption text options (--prompt, --prefix, --suffix, --overwrite), shared by ``caption`` and
    ``clips``; with decode_only, the decoding options instead (--workers, --batch-size). ``p``: a parser
    or an argument group."""
    if not decode_only:
        p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the captioning instruction")
        p.add_argument("--prefix", default="", help="text put before every caption (a trigger word)")
        p.add_argument("--suffix", default="", help="text put after every caption")
        p.add_argument("--overwrite", action="store_true", help="caption clips that already have a .txt again")
        return
    p.add_argument("--workers", type=int, default=2, help="decoding processes that run ahead of the model "
                                                          "(default 2; 0 decodes in this process)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="clips decoded together (default 0: auto, from the device's free memory and each clip's "
                        "cache after pruning; on the CPU the fastest measured); 1 decodes one clip at a time")


def pixel_budget(value: str):
    """--max-pixels: "model", or an integer (checked with the other settings, fits.check_max_pixels)."""
    if value.strip().lower() == "model":
        return "model"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither 'model' nor a number of pixels") from None


def pipeline_config(args):
    """PipelineConfig from the options of ``add_model_arguments``."""
    return PipelineConfig(
        num_frames=args.frames, layer=args.layer, query=args.query, max_pixels=args.max_pixels,
        prefill_chunk=args.prefill_chunk, kv=getattr(args, "kv", "auto"), encoded=args.encoded, rows=args.rows,
        retention=None if args.vanilla else args.retention,
        global_debias=not args.no_global_debias, local_debias=not args.no_local_debias,
        generation=SamplingConfig(max_new_tokens=args.max_new_tokens, decode_mode=args.decode_mode,
                                  do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
                                  top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed),
    )


def load_model(name, device: str = "auto", dtype: str = "auto"):
    """The model ``name`` stands for (models/names.py), the built-in tiny model when None."""
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
