#!/usr/bin/env python3
"""Speed, memory and FLOPs of AdaTP beside what users run today. Not a test.

    python bench/benchmark.py --shape 7b --device cuda --dtype bfloat16 \
        --frames 32,64,128 --retentions 1.0,0.5,0.25,0.15,0.10 --out bench/results/h100_7b.json
    python bench/benchmark.py --shape tiny --device cpu                  # what runs anywhere

Methods, side by side on one machine and one model:
  stock     transformers' own generate() on the full video (what users run today)
  adatp_k2  AdaTP at K = 2 (global + local debiasing)
  adatp_k0  AdaTP before the LLM (K = 0)
  fastv_k2  FastV at the same K and retention (no debias stages, last-token query)
  adatp_k2_static  adatp_k2 with static decoding (fixed-shape steps; a CUDA graph on CUDA)
For each: video decode, preprocessing, vision encoder, the prefill split into its
stages (layers < K with the scores, AdaTP's selection, the rest of the prefill),
time to first token, decode ms per token, peak memory, and FLOPs in both
conventions. Every row also gives TTFT and ms/token for questions whose prompt
length no earlier run in the process used (what a user asking a new question
sees), beside the warm figures.
Below the table, per frame count ("micro" in the JSON): AdaTP's selection repeated
(median and worst), the pooling as one matmul against apply_pooling, static
decoding's one-time graph capture (first answer, then a new question in the same
bucket), and a --caption-tokens caption end to end, AdaTP against stock generate.
Weights are random (models of real shapes built from configs), so no accuracy is
recorded. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shapes import SHAPES, TINY, build, stock_inputs, stock_prefill, stock_vision  # noqa: E402

from adatp_core.attention import extract_attention  # noqa: E402
from adatp_core.debias import global_debias, local_debias  # noqa: E402
from adatp_core.flops import flops_summary  # noqa: E402
from adatp_core.generate import SamplingConfig, generate_answer  # noqa: E402
from adatp_core.hf.cache import KVCache  # noqa: E402
from adatp_core.prune import prune_tokens  # noqa: E402
from adatp_core.samples import scene_frames, write_video  # noqa: E402
from adatp_core.timing import synchronize  # noqa: E402
from adatp_core.video import load_video  # noqa: E402

QUESTION = "What happens in this video? Describe the main events."
_fresh = iter(range(1, 1 << 30))


def fresh_question() -> str:
    """QUESTION made longer by one more word than any earlier call in this process:
    a prompt length (and so key lengths) that no earlier run has seen, as when a user
    asks a new question. Warm runs reuse QUESTION, whose shapes the warm-up saw."""
    return QUESTION + " Please" + " answer" * next(_fresh) + "."
# Figures also measured with a question (prompt length) new to the process, beside the warm ones.
NEW_QUESTION_FIELDS = {"ttft_s": "ttft_new_question_s", "llm_prefill_s": "llm_prefill_new_question_s",
                       "decode_ms_per_token": "decode_ms_per_token_new_question",
                       "prompt_tokens": "prompt_tokens_new_question"}
METHODS = ("stock", "adatp_k2", "adatp_k2_static", "adatp_k0", "fastv_k2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PeakMemory:
    """Peak allocated memory of a block: CUDA's allocator stats, or sampled RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = _rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak, _rss())
        self.extra_bytes = self.peak_bytes - self.base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def run_adatp(model, frames, method: str, retention: float, new_tokens: int, question: str = QUESTION) -> dict:
    layer = 0 if method.startswith("adatp_k0") else 2
    query = "last" if method == "fastv_k2" else "text"
    dev = model.compute_device
    model.prefix_cache.clear()  # a first question about this video (bench/prefix_reuse.py times the next)
    with PeakMemory(dev) as mem:
        state = extract_attention(model, frames, question, layer=layer, query=query)
        if method.startswith("adatp"):
            state = local_debias(global_debias(state))
        state = prune_tokens(state, retention)
        mode = "static" if method.endswith("_static") else "default"
        answer = generate_answer(state, SamplingConfig(max_new_tokens=new_tokens, do_sample=False, ignore_eos=True,
                                                       decode_mode=mode))
    s, decoding = answer.stats, answer.decoding
    layer = state.layer  # the K that ran: a hybrid model moves K = 2 up to a full-attention layer K-1
    plain = plain_prefill_seconds(model, state, layer) if layer > 0 else 0.0
    prefill = s["time_attention"] + s["time_selection"] + decoding.prefill_seconds
    return {
        "preprocess_s": s["time_preprocess"], "vision_s": s["time_vision"],
        "layers_below_k_s": s["time_attention"], "plain_layers_below_k_s": plain,
        "selection_s": s["time_selection"], "prefill_rest_s": decoding.prefill_seconds,
        "llm_prefill_s": prefill, "ttft_s": s["time_to_first_token"],
        "decode_ms_per_token": decoding.ms_per_token, "peak_bytes": mem.peak_bytes,
        "peak_extra_bytes": mem.extra_bytes, "tokens_kept": s["tokens_kept"], "tokens_total": s["tokens_total"],
        "flops_ratio_fastvid": s["flops_ratio"], "flops_video_llm_T": s["flops_video_llm_T"],
        "flops_total_T": s["flops_total_T"], "flops_total_ratio": s["flops_total_ratio"],
        "flops_vision_T": s["flops_vision_T"], "prompt_tokens": s["prompt_tokens"], "layer": layer,
    }


def plain_prefill_seconds(model, state, layer: int) -> float:
    """Layers 0..K-1 on the same prompt without the attention probe: the baseline
    against which the cost of extracting the scores is measured."""
    adapter = model.adapter

    def run():
        with torch.inference_mode():  # values do not change the cost: any [1, L, D] input will do
            hidden = state.hidden.new_zeros(state.hidden.shape)
            return adapter.run_layers(hidden, state.position_ids, KVCache(adapter.layer_kinds), 0, layer)

    run()
    return timed(run, model.compute_device)[1]


class StepTimer:
    """A logits processor that only records when generate() reaches each step."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def run_stock(model, frames, new_tokens: int, question: str = QUESTION) -> dict:
    """transformers' own path, each part timed directly: get_video_features, the
    language model's forward over the whole prompt (the stock full prefill), and
    one generate() whose steps a logits processor timestamps (decode ms/token,
    and its own time to first token as a cross-check)."""
    from transformers import LogitsProcessorList

    adapter, hf, dev = model.adapter, model.model, model.compute_device
    plan = adapter.plan_video(*frames.shape[:3])
    (pixels, preprocess) = timed(lambda: adapter.preprocess(frames, plan), dev)
    n = plan.num_tokens
    prompt = adapter.build_prompt(question, plan)
    ids = prompt.input_ids[None].to(dev)
    mask = torch.ones_like(ids)
    video = stock_inputs(model, prompt, pixels)
    timer = StepTimer(dev)
    with torch.inference_mode(), PeakMemory(dev) as mem:
        (feats, deepstack), vision = timed(lambda: stock_vision(model, video), dev)
        _, prefill = timed(lambda: stock_prefill(model, prompt, ids, mask, feats, deepstack), dev)
        del feats, deepstack
        synchronize(dev)
        start = time.perf_counter()
        hf.generate(input_ids=ids, attention_mask=mask, **video,
                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                    logits_processor=LogitsProcessorList([timer]))
    steps = len(timer.times) - 1
    flops = flops_summary(model, prompt, keep_count=n, layer=0)
    return {
        "preprocess_s": preprocess, "vision_s": vision, "layers_below_k_s": None, "plain_layers_below_k_s": None,
        "selection_s": 0.0, "prefill_rest_s": prefill, "llm_prefill_s": prefill,
        "ttft_s": preprocess + vision + prefill, "ttft_generate_s": preprocess + timer.times[0] - start,
        "decode_ms_per_token": 1000 * (timer.times[-1] - timer.times[0]) / steps if steps else 0.0,
        "peak_bytes": mem.peak_bytes, "peak_extra_bytes": mem.extra_bytes, "tokens_kept": n, "tokens_total": n,
        "flops_ratio_fastvid": 1.0, "flops_video_llm_T": flops["flops_video_llm_vanilla_T"],
        "flops_total_T": flops["flops_total_vanilla_T"], "flops_total_ratio": 1.0,
        "flops_vision_T": flops["flops_vision_T"], "prompt_tokens": prompt.length,
    }


def micro_row(figure: str, frames: int, times_s: list[float], note: str = "") -> dict:
    """One line of the micro-benchmark table: median and worst of repeated timings, in ms."""
    return {"figure": figure, "frames": frames, "median_ms": 1000 * statistics.median(times_s),
            "max_ms": 1000 * max(times_s), "runs": len(times_s), "note": note}


def bench_selection(model, frames, repeats: int = 20) -> dict:
    """AdaTP's whole selection (segments, shares, local order, budgets, keep set) on one
    state, repeated: the selection must be fast on every run, not only on average."""
    state = extract_attention(model, frames, QUESTION, layer=2)
    dev = model.compute_device

    def select():
        return prune_tokens(local_debias(global_debias(state)), 0.25)

    select()
    times = [timed(select, dev)[1] for _ in range(repeats)]
    return micro_row("selection (global+local debias, prune; R=0.25)", frames.shape[0], times,
                     f"{state.num_visual} visual tokens")


def bench_pooling(model, frames: int, repeats: int = 10) -> list[dict]:
    """The 27x27 -> 14x14 pooling of ``frames`` frames of projected patches: AdaTP's one
    matmul against transformers' apply_pooling (a bilinear resize kernel). Families
    without pooling (Qwen: a 2x2 merger in the vision tower) give no rows."""
    adapter, dev = model.adapter, model.compute_device
    if not hasattr(adapter, "pool"):
        return []
    mm = model.model.model
    d = model.model.config.text_config.hidden_size
    feats = torch.randn(frames, adapter.patch_grid ** 2, d, device=dev, dtype=model.dtype)
    rows = []
    for name, fn in (("pooling, one matmul (AdaTP)", adapter.pool), ("pooling, apply_pooling (stock)", mm.apply_pooling)):
        with torch.inference_mode():
            fn(feats)
            times = [timed(lambda: fn(feats), dev)[1] for _ in range(repeats)]
        rows.append(micro_row(name, frames, times, f"[{frames}, {adapter.patch_grid ** 2}, {d}] {model.dtype}"))
    return rows


def bench_capture(model, frames, new_tokens: int) -> list[dict]:
    """Static decoding's one-time CUDA graph capture: for a model's first answer in a
    capacity bucket, then for a new question in the same bucket (reused: zero)."""
    model.static_decoders.clear()
    rows = []
    for label, question in (("first answer", QUESTION), ("next question, same bucket", fresh_question())):
        state = prune_tokens(local_debias(global_debias(extract_attention(model, frames, question))), 0.25)
        answer = generate_answer(state, SamplingConfig(max_new_tokens=new_tokens, do_sample=False, ignore_eos=True,
                                                       decode_mode="static"))
        note = "no graph off CUDA" if model.compute_device.type != "cuda" else f"{new_tokens} tokens, R=0.25"
        rows.append(micro_row(f"static graph capture ({label})", frames.shape[0], [answer.decoding.capture_seconds],
                              note))
    return rows


CAPTION = "Describe this video in detail."


def bench_caption(model, frames, new_tokens: int, repeats: int) -> list[dict]:
    """End to end, from decoded frames to the caption's text, ``new_tokens`` tokens
    (EOS ignored): AdaTP (K=2, R=0.25, the default decode mode) against stock generate()."""
    from transformers import GenerationConfig

    adapter, hf, dev = model.adapter, model.model, model.compute_device

    def adatp():
        model.prefix_cache.clear()  # every caption of a folder is of a new clip
        state = extract_attention(model, frames, CAPTION)
        state = prune_tokens(local_debias(global_debias(state)), 0.25)
        return generate_answer(state, SamplingConfig(max_new_tokens=new_tokens, do_sample=False, ignore_eos=True)).text

    def stock():
        plan = adapter.plan_video(*frames.shape[:3])
        prompt = adapter.build_prompt(CAPTION, plan)
        video = stock_inputs(model, prompt, adapter.preprocess(frames, plan))
        ids = prompt.input_ids[None].to(dev)
        gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **video, generation_config=gen)
        return model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    rows = []
    for name, fn in (("caption end to end, AdaTP K=2 R=0.25", adatp), ("caption end to end, stock generate", stock)):
        fn()
        times = [timed(fn, dev)[1] for _ in range(repeats)]
        rows.append(micro_row(name, frames.shape[0], times, f"{new_tokens} new tokens"))
    return rows


def print_micro(rows: list[dict]) -> None:
    if not rows:
        return
    print()
    print("micro | frames | median ms | max ms | runs | note")
    for r in rows:
        print(f"{r['figure']} | {r['frames']} | {r['median_ms']:.3f} | {r['max_ms']:.3f} | {r['runs']} | {r['note']}")


def bench_video(path: Path, frames: int, device) -> dict:
    """Sampled decoding (decord in its child process, and PyAV) against decoding every frame."""
    import av

    out = {}
    for backend in ("decord", "pyav"):
        (_, info), seconds = timed(lambda: load_video(path, frames, backend=backend), "cpu")
        out[f"decode_sampled_{backend}_s"] = seconds
    start = time.perf_counter()
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        count = sum(1 for f in c.decode(stream) if f.to_ndarray(format="rgb24") is not None)
    out["decode_all_frames_s"] = time.perf_counter() - start
    out["video_frames"] = count
    return out


def median_rows(rows: list[dict]) -> dict:
    merged = dict(rows[0])
    for key, value in rows[0].items():
        if isinstance(value, float):
            merged[key] = statistics.median(r[key] for r in rows)
    return merged


def fmt(v, scale=1.0, digits=3):
    return "-" if v is None else f"{v * scale:.{digits}f}"


def print_table(rows: list[dict]) -> None:
    cols = [("frames", "frames", None), ("method", "method", None), ("R", "retention", None),
            ("kept", "tokens_kept", None), ("vision s", "vision_s", 1), ("<K+scores s", "layers_below_k_s", 1),
            ("select ms", "selection_s", 1000), ("rest s", "prefill_rest_s", 1), ("LLM prefill s", "llm_prefill_s", 1),
            ("TTFT s", "ttft_s", 1), ("ms/tok", "decode_ms_per_token", 1), ("peak GiB", "peak_bytes", 2**-30),
            ("FLOPs lit", "flops_ratio_fastvid", 1), ("FLOPs all", "flops_total_ratio", 1),
            ("TTFT new-q s", "ttft_new_question_s", 1), ("ms/tok new-q", "decode_ms_per_token_new_question", 1)]
    print(" | ".join(name for name, _, _ in cols))
    for r in rows:
        print(" | ".join(str(r[k]) if s is None else fmt(r.get(k), s) for _, k, s in cols))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=(*TINY, *SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES))
    p.add_argument("--frames", default="32,64,128")
    p.add_argument("--retentions", default="1.0,0.5,0.25,0.15,0.10")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (median); one warm-up first")
    p.add_argument("--caption-tokens", type=int, default=128,
                   help="length of the end-to-end caption row, AdaTP against stock (0: skip it)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    methods = args.methods.split(",")
    model = build(args.shape, args.device, dtype)

    tmp = Path(__file__).resolve().parent / "results"
    tmp.mkdir(exist_ok=True)
    video = tmp / "bench_video.mp4"
    if not video.exists():  # 40 s at 24 fps, 640x360, four scenes
        write_video(video, scene_frames(960, 640, 360, scenes=4), fps=24)

    rows, micro = [], []
    for n_frames in [int(x) for x in args.frames.split(",")]:
        decode = bench_video(video, n_frames, device)
        frames, _ = load_video(video, n_frames)
        micro.append(bench_selection(model, frames))
        micro += bench_pooling(model, n_frames)
        if any(m.endswith("_static") for m in methods):
            micro += bench_capture(model, frames, args.new_tokens)
        if args.caption_tokens:
            micro += bench_caption(model, frames, args.caption_tokens, args.repeats)
        for method in methods:
            retentions = [1.0] if method == "stock" else [float(x) for x in args.retentions.split(",")]
            for r in retentions:
                def fn(question=QUESTION):
                    if method == "stock":
                        return run_stock(model, frames, args.new_tokens, question)
                    return run_adatp(model, frames, method, r, args.new_tokens, question)

                fn()  # warm-up
                row = median_rows([fn() for _ in range(args.repeats)])
                fresh = median_rows([fn(fresh_question()) for _ in range(args.repeats)])
                row.update({new: fresh[key] for key, new in NEW_QUESTION_FIELDS.items()})
                row.update({"frames": n_frames, "method": method, "retention": r, **decode})
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("frames", "method", "retention", "ttft_s")}), file=sys.stderr)
    print_table(rows)
    print_micro(micro)
    meta = {"shape": args.shape, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "date": date.today().isoformat(),
            "new_tokens": args.new_tokens, "repeats": args.repeats, "command": " ".join(sys.argv)}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows, "micro": micro}, indent=1))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
