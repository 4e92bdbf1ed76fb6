"""Loaded models are handed to ComfyUI's model management (stubbed here, see
comfy_stub.py): "Unload models" / "Free memory" release the weights, and
keep_loaded keeps its meaning."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from comfy_stub import make_comfy
from pack import pack_module

TINY = "adatp-tiny (built-in, random weights)"


@pytest.fixture
def comfy(monkeypatch, tiny_dir):
    """The pack's bridge wired to a stub ComfyUI: compute on the CPU, offload to meta
    (a device that holds no memory, so "offloaded" is visible on a CPU-only machine)."""
    monkeypatch.setenv("ADATP_CACHE_DIR", str(tiny_dir.parent))
    bridge = pack_module("nodes.comfy_bridge")
    mm, mp = make_comfy(torch.device("cpu"), torch.device("meta"))
    monkeypatch.setattr(bridge, "model_management", mm)
    monkeypatch.setattr(bridge, "model_patcher", mp)
    monkeypatch.setattr(bridge, "_PATCHER_CLASS", None)
    return mm


def nodes():
    return pack_module("nodes").NODE_CLASS_MAPPINGS


def load(keep_loaded: bool):
    return nodes()["AdaTP_LoadVideoLLM"]().load(TINY, "float32", "sdpa", "cpu", keep_loaded)[0]


def answer(llm, frames) -> str:
    m = nodes()
    state = m["AdaTP_ExtractAttention"]().extract(llm, frames[:2], "What moves?", 2, "text")[0]
    return m["AdaTP_GenerateAnswer"]().generate(state, 3, False, 1.0, 1.0, 0)["result"][0]


def devices(llm) -> set[str]:
    return {t.device.type for t in (*llm.model.parameters(), *llm.model.buffers())}


def test_unload_models_releases_the_weights(comfy, frames):
    llm = load(keep_loaded=True)
    assert [r.model.model.llm for r in comfy.current_loaded_models] == [llm.model]
    size = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    assert comfy.current_loaded_models[0].model.loaded_size() >= size
    assert answer(llm, frames)
    assert devices(llm) == {"cpu"}  # keep_loaded: still on the compute device after answering

    comfy.unload_all_models()  # what "Unload models" and "Free memory" run
    assert comfy.current_loaded_models == [] and devices(llm) == {"meta"}  # no weight left on the device


def test_another_models_memory_request_releases_it(comfy):
    llm = load(keep_loaded=True)
    comfy.free_memory(1024, torch.device("cpu"))  # another pack asks for room, less than the model
    assert comfy.current_loaded_models == [] or comfy.current_loaded_models[0].model.loaded_size() == 0
    assert devices(llm) == {"meta"}


def test_unloaded_model_is_loaded_back_by_the_next_stage(comfy, frames, monkeypatch):
    bridge = pack_module("nodes.comfy_bridge")
    monkeypatch.setattr(bridge, "offload_device", lambda: torch.device("cpu"))  # a round trip needs real memory
    llm = load(keep_loaded=True)
    first = answer(llm, frames)
    comfy.unload_all_models()
    assert comfy.current_loaded_models == []
    assert answer(llm, frames) == first  # Extract Attention asked ComfyUI to load it again
    assert len(comfy.current_loaded_models) == 1 and comfy.current_loaded_models[0].model.loaded_size() > 0


def test_keep_loaded_off_offloads_after_each_answer(comfy, frames):
    llm = load(keep_loaded=False)
    assert devices(llm) == {"cpu"}
    answer(llm, frames)
    assert devices(llm) == {"meta"} and comfy.current_loaded_models[0].model.loaded_size() == 0


def test_dropping_the_output_frees_the_model(comfy):
    """ComfyUI's "Free memory" also drops cached node outputs: nothing else may keep the weights."""
    llm = load(keep_loaded=True)
    ref = weakref.ref(llm.model)
    del llm
    gc.collect()
    assert ref() is None
    comfy.cleanup_models()
    assert comfy.current_loaded_models == []


def test_unloading_also_frees_static_decoding_buffers(comfy, frames):
    """Static decoding keeps per-model buffers (and CUDA graphs) between answers;
    "Unload models" frees them with the weights."""
    from adatp_core.generate import SamplingConfig, generate_answer

    llm = load(keep_loaded=True)
    state = nodes()["AdaTP_ExtractAttention"]().extract(llm, frames[:2], "What moves?", 2, "text")[0]
    generate_answer(state, SamplingConfig(max_new_tokens=3, decode_mode="static"))
    assert len(llm.static_decoders) == 1
    comfy.unload_all_models()
    assert len(llm.static_decoders) == 0 and devices(llm) == {"meta"}
