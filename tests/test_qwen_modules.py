"""The module names that the Qwen adapters hand to 4/8-bit loading (kept 16-bit) and to
multi-GPU placement (kept on the first GPU) exist in the real model classes, and the
adapters run the vision tower through the batched attention path."""

from __future__ import annotations

import torch
from qwen_fixtures import *  # noqa: F401,F403  (tiny, stock, frames on each Qwen family)

from adatp_core.hf import vision as qwen_vision


def _resolve(model, name):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model.get_parameter(name)


def test_quantization_and_placement_names_exist(tiny):
    adapter = tiny.adapter
    assert "model.visual" in adapter.unquantized_modules and "lm_head" in adapter.unquantized_modules
    for name in (*adapter.unquantized_modules, *adapter.input_modules):
        assert _resolve(tiny.model, name) is not None
    assert _resolve(tiny.model, "model.language_model.embed_tokens") is adapter.text_model.embed_tokens


def test_encode_uses_the_batched_vision_path(tiny, frames, monkeypatch):
    calls = []
    real = qwen_vision.vision_forward

    def spy(visual, pixel_values, grid_thw):
        calls.append(tuple(grid_thw.shape))
        return real(visual, pixel_values, grid_thw)

    monkeypatch.setattr("adatp_core.models.qwen2_5_vl.vision_forward", spy)
    adapter = tiny.adapter
    plan = adapter.plan_video(*frames.shape[:3])
    encoded = adapter.encode(adapter.preprocess(frames, plan), plan)
    assert calls == [(1, 3)]
    with torch.inference_mode():
        stock = tiny.model.model.visual(adapter.preprocess(frames, plan), grid_thw=adapter.grid_thw(plan))
    assert (encoded.visual - stock.pooler_output).abs().max().item() < 1e-5
