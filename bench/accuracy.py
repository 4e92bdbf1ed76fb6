#!/usr/bin/env python3
"""Accuracy of AdaTP against the vanilla model on a multiple-choice video QA set.

Needs real weights (llava-hf/llava-onevision-qwen2-*-ov-hf in a local folder) and,
for a useful number of questions, a GPU. The data set is a JSONL file, one
question per line, in the layout of MVBench / Video-MME style exports:

    {"video": "videos/abc.mp4", "question": "What is the man holding?",
     "options": ["A. a cup", "B. a phone", "C. a book", "D. nothing"], "answer": "B"}

Video paths are relative to the JSONL file. Each configuration answers every
question from one shared Extract Attention per (video, question) and K:

    python bench/accuracy.py --model models/LLM/llava-onevision-qwen2-7b-ov-hf \
        --data mvbench.jsonl --retentions 1.0,0.25,0.15 --frames 32 --out bench/results/acc.json

The prompt is LLaVA-OneVision's multiple-choice prompt; the prediction is the
first option letter in the answer. Nothing here is run by the tests with real
weights: with the tiny model the figures are noise, and are never reported.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adatp_core.attention import extract_attention  # noqa: E402
from adatp_core.generate import SamplingConfig, generate_answer  # noqa: E402
from adatp_core.models.loader import load_video_llm  # noqa: E402
from adatp_core.pipeline import PipelineConfig, select  # noqa: E402
from adatp_core.video import load_video  # noqa: E402

MC_SUFFIX = "Answer with the option's letter from the given choices directly."


def read_items(path: Path) -> list[dict]:
    items = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        item = json.loads(line)
        for key in ("video", "question", "answer"):
            if key not in item:
                raise ValueError(f"{path}:{n}: missing {key!r}")
        item["video"] = str((path.parent / item["video"]).resolve())
        items.append(item)
    return items


def prompt_of(item: dict) -> str:
    options = item.get("options") or []
    return "\n".join([item["question"], *options, MC_SUFFIX]) if options else item["question"]


def predicted_letter(text: str) -> str | None:
    match = re.search(r"\b([A-J])\b", text.strip().upper())
    return match.group(1) if match else None


def configurations(retentions: list[float], layer: int) -> dict[str, PipelineConfig]:
    configs = {}
    for r in retentions:
        if r >= 1.0:
            configs["vanilla"] = PipelineConfig(layer=layer, retention=None)
        else:
            configs[f"adatp_R{r:g}"] = PipelineConfig(layer=layer, retention=r)
            configs[f"fastv_R{r:g}"] = PipelineConfig(layer=layer, retention=r, global_debias=False,
                                                     local_debias=False, query="last")
    return configs


def evaluate(model, items: list[dict], configs: dict[str, PipelineConfig], frames: int,
             max_new_tokens: int = 8) -> dict:
    totals = {name: {"correct": 0, "answered": 0, "seconds": 0.0} for name in configs}
    for item in items:
        clip, _ = load_video(item["video"], frames)
        question = prompt_of(item)
        by_query = {}
        for name, cfg in configs.items():
            start = time.perf_counter()
            key = (cfg.layer, cfg.query)
            if key not in by_query:
                by_query[key] = extract_attention(model, clip, question, cfg.layer, cfg.query)
            answer = generate_answer(select(by_query[key], cfg),
                                     SamplingConfig(max_new_tokens=max_new_tokens, do_sample=False))
            totals[name]["seconds"] += time.perf_counter() - start
            guess = predicted_letter(answer.text) if item.get("options") else answer.text.strip()
            totals[name]["answered"] += 1
            totals[name]["correct"] += int(str(guess).upper() == str(item["answer"]).strip().upper())
    return {name: {**t, "accuracy": t["correct"] / max(t["answered"], 1)} for name, t in totals.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local model folder")
    p.add_argument("--data", required=True, type=Path, help="JSONL file")
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--retentions", default="1.0,0.25")
    p.add_argument("--limit", type=int, default=0, help="first N questions only")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    items = read_items(args.data)[: args.limit or None]
    model = load_video_llm(args.model, device=args.device, dtype=args.dtype)
    configs = configurations([float(x) for x in args.retentions.split(",")], args.layer)
    results = evaluate(model, items, configs, args.frames)
    for name, r in results.items():
        print(f"{name:>14}: {100 * r['accuracy']:.1f}% of {r['answered']} ({r['seconds'] / max(r['answered'], 1):.2f} s each)")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "data": str(args.data), "frames": args.frames,
                                        "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
