"""Issue 30, where only a GPU can show it: layers >= K's keys and values live on the host (pinned
buffers), each attention layer staged on the device while it runs and the next one prefetched on a
side stream; the answer is the one with the keys and values on the device, the device holds two
layers' copies instead of all of them, and static decoding gives way to default steps.
Skips without CUDA; on a GPU machine: python -m pytest -p no:cacheprovider tests/gpu
"""

from __future__ import annotations

import pytest
import torch
from conftest import QUESTION

from adatp_core.attention import extract_attention
from adatp_core.generate import KV_ON_HOST_NOT_STATIC, SamplingConfig, generate_answer
from adatp_core.hf.cache import KVCache, RowsKVCache
from adatp_core.pipeline import PipelineConfig, select

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("chunk", [0, 16])
def test_keys_and_values_on_the_host_give_the_device_answer(tiny_on, frames, chunk):
    model = tiny_on("cuda")
    # K = 1: three of the tiny model's four layers on the host, more than the two slots (copied at every step)
    state = select(extract_attention(model, frames, QUESTION, layer=1, reuse_prefix=False, prefill_chunk=chunk),
                   PipelineConfig(retention=0.5))
    answers = {kv: generate_answer(state, SamplingConfig(max_new_tokens=6, ignore_eos=True, decode_mode="default"),
                                   return_logits=True, kv=kv) for kv in ("device", "host")}
    assert answers["device"].stats["kv_on"] == "cuda:0" and answers["host"].stats["kv_on"] == "host"
    assert answers["host"].token_ids == answers["device"].token_ids
    assert answers["host"].stats["kv_staged_mb"] > 0  # the side stream's copies ran
    assert (answers["host"].logits - answers["device"].logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("mode", ["auto", "static"])
def test_static_decoding_gives_way_on_cuda(tiny_on, frames, mode):
    model = tiny_on("cuda")
    state = select(extract_attention(model, frames, QUESTION, layer=1, reuse_prefix=False), PipelineConfig(retention=0.5))
    sampling = SamplingConfig(max_new_tokens=4, ignore_eos=True, decode_mode=mode)
    host = generate_answer(state, sampling, kv="host")
    assert host.stats["decode_mode"] == "default" and host.stats["fallback_static_decoding"] == KV_ON_HOST_NOT_STATIC
    default = SamplingConfig(max_new_tokens=4, ignore_eos=True, decode_mode="default")
    assert host.token_ids == generate_answer(state, default, kv="device").token_ids


def _drive(host: bool, layers: int = 12, k_layer: int = 2, heads: int = 8, dim: int = 128, prompt: int = 4096,
           steps: int = 8):
    """A continuation from K in two calls then ``steps`` decode steps, as decoder layers drive the caches, with
    layers >= K on the device or on the host; (outputs of every update, peak bytes allocated over the start,
    the rows). Layers < K start from a past of ``prompt`` positions, as a state's."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)

    def kv(n):
        return torch.randn(2, 1, heads, n, dim, device=dev, dtype=torch.bfloat16, generator=gen)

    past = tuple(tuple(kv(prompt)) for _ in range(k_layer))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    first = prompt // 2
    cache = KVCache(layers, past=past, reserve=[steps if i < k_layer else steps + prompt - first for i in range(layers)],
                    host=range(k_layer, layers) if host else ())
    outs = []
    for a, b in ((0, first), (first, prompt)):
        for i in range(k_layer, layers):
            k, v = kv(b - a)
            outs += [t.float().sum().item() for t in cache.update(k, v, i)]
    rows = RowsKVCache.holding(cache)
    for _ in range(steps):
        window = rows.window(0, 1)
        for i in range(layers):
            k, v = kv(1)
            outs += [t.float().sum().item() for t in window.update(k, v, i)]
        rows.advance(0, 1)
    torch.cuda.synchronize()
    return outs, torch.cuda.max_memory_allocated() - start, rows


def test_the_device_holds_two_staged_layers_not_all_of_them():
    """12 layers, K = 2, 8 KV heads of 128 in bf16, 4096 kept positions: layers >= K on the device take
    10 x 16.8 MB x 2; on the host, two slots of staged copies. Same outputs at every update (the side
    stream's copies are ordered before their readers), the homes pinned, at most two layers staged."""
    want, device_peak, _ = _drive(host=False)
    got, host_peak, rows = _drive(host=True)
    assert got == pytest.approx(want, rel=1e-6)
    assert host_peak < 0.5 * device_peak, (host_peak, device_peak)
    assert sorted(rows.homed) == list(range(2, 12))
    assert all(rows.keys[i].device.type == "cpu" and rows.keys[i].is_pinned() for i in rows.homed)
    assert rows.staging.most_alive == 2 and rows.staging._streams  # prefetched on a side stream
    print(f"peak allocated: keys and values on the device {device_peak / 2**20:.1f} MiB, "
          f"on the host {host_peak / 2**20:.1f} MiB")
