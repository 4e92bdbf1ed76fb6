#!/usr/bin/env python3
"""Turn benchmark JSON files into the markdown tables of bench/RESULTS.md.

    python bench/report.py bench/results/cpu_tiny.json bench/results/cpu_0.5b.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = (
    ("frames", "frames", None), ("method", "method", None), ("R", "retention", "{:.2f}"),
    ("kept / total", None, None), ("decode video s (sampled / all)", None, None),
    ("vision s", "vision_s", "{:.3f}"), ("layers<K + scores s", "layers_below_k_s", "{:.3f}"),
    ("selection ms", "selection_s", "ms"), ("rest of prefill s", "prefill_rest_s", "{:.3f}"),
    ("LLM prefill s", "llm_prefill_s", "{:.3f}"), ("TTFT s", "ttft_s", "{:.3f}"),
    ("decode ms/token", "decode_ms_per_token", "{:.1f}"), ("peak GiB", "peak_bytes", "gib"),
    ("FLOPs, FastVID conv.", "flops_ratio_fastvid", "pct"), ("FLOPs, whole prefill", "flops_total_ratio", "pct"),
    ("TTFT s, new question", "ttft_new_question_s", "{:.3f}"),
    ("decode ms/token, new question", "decode_ms_per_token_new_question", "{:.1f}"),
)


def cell(row: dict, key, style) -> str:
    if key is None:
        return ""
    value = row.get(key)
    if value is None:
        return "-"
    if style == "ms":
        return f"{1000 * value:.1f}"
    if style == "gib":
        return f"{value / 2**30:.2f}"
    if style == "pct":
        return f"{100 * value:.1f}%"
    return style.format(value) if style else str(value)


def table(data: dict) -> str:
    meta, rows = data["meta"], data["rows"]
    head = (f"Shape {meta['shape']}, {meta['device']} ({meta['card']}, {meta['cpu_threads']} threads), "
            f"{meta['dtype']}, torch {meta['torch']}, transformers {meta['transformers']}, {meta['date']}, "
            f"{meta['new_tokens']} new tokens, median of {meta['repeats']} after a warm-up.\n"
            f"Command: `{meta['command']}`\n\n")
    lines = ["| " + " | ".join(name for name, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for name, key, style in COLUMNS:
            if name == "kept / total":
                cells.append(f"{r['tokens_kept']} / {r['tokens_total']}")
            elif name.startswith("decode video"):
                cells.append(f"{r['decode_sampled_decord_s']:.2f} (decord) {r['decode_sampled_pyav_s']:.2f} (PyAV)"
                              f" / {r['decode_all_frames_s']:.2f}")
            else:
                cells.append(cell(r, key, style))
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n" + micro_table(data.get("micro", []))


def micro_table(rows: list[dict]) -> str:
    """The repeated micro-measurements (selection, pooling, graph capture, caption)."""
    if not rows:
        return ""
    lines = ["", "| figure | frames | median ms | worst ms | runs | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['figure']} | {r['frames']} | {r['median_ms']:.3f} | {r['max_ms']:.3f} | {r['runs']} "
                     f"| {r['note']} |")
    return "\n".join(lines) + "\n"


def main(argv) -> int:
    for path in argv:
        print(f"### {Path(path).name}\n\n{table(json.loads(Path(path).read_text()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
