#!/usr/bin/env python3
"""Static against default decoding at long caches (issue 18, item 9). Not a test.

    python bench/decode_modes.py --shape 7b --device cuda                 # the GPU figures
    python bench/decode_modes.py --shape tiny --device cpu --cached 256,1024   # what runs anywhere

For each cached length (every layer holds that many positions, random keys and
values: the speed of a decode step does not depend on their values), decodes
--tokens steps both ways and prints ms/token:
  default  one eager step per token over a growing cache (flash with split-KV and GQA on CUDA)
  static   fixed-shape steps over a power-of-two capacity with a bool mask, replayed as one
           CUDA graph on CUDA (captured once per bucket; the capture time is printed apart)
and what auto mode picks there (static_decode.static_pays_off). The threshold
STATIC_AUTO_MAX_CAPACITY is an estimate from the kernels: this measures it.
Prints a table and, with --out, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shapes import SHAPES, TINY, build  # noqa: E402

from adatp_core.hf.cache import KVCache, LinearState, capacity_bucket  # noqa: E402
from adatp_core.sdpa import plan_free_attention  # noqa: E402
from adatp_core.static_decode import StaticDecoders  # noqa: E402
from adatp_core.steps import STATIC_AUTO_MAX_CAPACITY, static_pays_off  # noqa: E402
from adatp_core.timing import synchronize  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _past(adapter, cached: int, dtype: torch.dtype, seed: int = 0):
    """Per layer, random (key, value) [1, Hkv, cached, d] on the layer's device; a hybrid
    model's linear-attention layers get a random ``LinearState`` (its fixed size, ``cached``
    tokens folded in)."""
    cfg = adapter.text_model.config
    hkv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator(device="cpu").manual_seed(seed)
    k = torch.randn(1, hkv, cached, d, generator=gen).to(adapter.device, dtype)
    v = torch.randn(1, hkv, cached, d, generator=gen).to(adapter.device, dtype)
    linear = None
    if any(adapter.is_linear_layer(i) for i in range(adapter.num_layers)):
        dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        channels = 2 * cfg.linear_num_key_heads * dk + cfg.linear_num_value_heads * dv
        conv = torch.randn(1, channels, cfg.linear_conv_kernel_dim, generator=gen).to(adapter.device, dtype)
        recurrent = 0.1 * torch.randn(1, cfg.linear_num_value_heads, dk, dv, generator=gen)
        linear = LinearState(conv, recurrent.to(adapter.device, dtype), cached)
    # copied in by each cache: shared is fine
    return tuple(linear if adapter.is_linear_layer(i) else (k, v) for i in range(adapter.num_layers))


def _position_ids(adapter, cached: int) -> torch.Tensor:
    """Prompt position ids of ``cached`` tokens: [1, L], or [3, 1, L] for M-RoPE models."""
    ids = torch.arange(cached, device=adapter.device)[None]
    rope = getattr(adapter.text_model.config, "rope_parameters", None) or {}
    return ids.expand(3, 1, cached) if "mrope_section" in rope else ids


def _default_ms(adapter, past, position_ids, tokens: int) -> float:
    cache = KVCache(adapter.layer_kinds, past=past, reserve=tokens)
    first = adapter.next_position_ids(position_ids, 0)
    ids = torch.zeros((1, 1), dtype=torch.long, device=adapter.device)
    synchronize(adapter.device)
    start = time.perf_counter()
    for step in range(tokens):
        hidden = adapter.run_layers(adapter.embed_tokens(ids), first + step, cache, 0, adapter.num_layers)
        ids = adapter.logits(hidden)[-1].argmax().view(1, 1)
    synchronize(adapter.device)
    return 1000 * (time.perf_counter() - start) / tokens


def _static_ms(adapter, past, position_ids, tokens: int) -> tuple[float, float]:
    """(ms per token, capture seconds) with a fresh decoder store."""
    decoders = StaticDecoders(max_buckets=1)
    step_fn = decoders.decoder(adapter, KVCache(adapter.layer_kinds, past=past), tokens, position_ids)
    capture = step_fn.capture().seconds
    first = adapter.next_position_ids(position_ids, 0)
    token = torch.zeros(1, dtype=torch.long, device=adapter.device)
    synchronize(adapter.device)
    start = time.perf_counter()
    for step in range(tokens):
        token = step_fn(token, first + step)[0].argmax().view(1)
        int(token)  # one host read per token, as generation does
    synchronize(adapter.device)
    ms = 1000 * (time.perf_counter() - start) / tokens
    decoders.clear()
    return ms, capture


def measure(model, cached: int, tokens: int, repeats: int) -> dict:
    adapter = model.adapter
    past = _past(adapter, cached, model.dtype)
    position_ids = _position_ids(adapter, cached)
    with torch.inference_mode(), plan_free_attention(adapter.device):
        _default_ms(adapter, past, position_ids, 2)  # warm-up (lazy inits, kernels)
        default = sorted(_default_ms(adapter, past, position_ids, tokens) for _ in range(repeats))
        static_runs = [_static_ms(adapter, past, position_ids, tokens) for _ in range(repeats)]
    static = sorted(ms for ms, _ in static_runs)
    return {"cached_tokens": cached, "new_tokens": tokens, "static_capacity": capacity_bucket(cached + tokens),
            "default_ms_per_token": default[len(default) // 2],
            "static_ms_per_token": static[len(static) // 2],
            "capture_s": max(c for _, c in static_runs),
            "auto_picks": "static" if adapter.device.type == "cuda" and static_pays_off(
                [cached] * sum(not adapter.is_linear_layer(i) for i in range(adapter.num_layers)), tokens)
            else "default"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=(*TINY, *SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES))
    p.add_argument("--cached", default="1000,8000,32000", help="cached tokens per layer, comma-separated")
    p.add_argument("--tokens", type=int, default=16, help="decode steps timed per run (and static's room for them)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = build(args.shape, str(device), dtype)
    rows = [measure(model, int(n), args.tokens, args.repeats) for n in args.cached.split(",")]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"{args.shape} on {gpu}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}; "
          f"auto is static up to a mean capacity of {STATIC_AUTO_MAX_CAPACITY} positions")
    print("| cached tokens | static capacity | default ms/token | static ms/token | static/default | capture s "
          "| auto picks |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cached_tokens']} | {r['static_capacity']} | {r['default_ms_per_token']:.2f} | "
              f"{r['static_ms_per_token']:.2f} | "
              f"{r['static_ms_per_token'] / r['default_ms_per_token']:.2f} | {r['capture_s']:.3f} | {r['auto_picks']} |")
    if args.out is not None:
        args.out.write_text(json.dumps({"shape": args.shape, "device": gpu, "dtype": str(dtype),
                                        "torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
