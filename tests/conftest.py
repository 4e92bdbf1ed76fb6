"""Shared fixtures: the tiny model is built once per session into a temporary
cache, saved with save_pretrained and loaded back through the safe loader."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from adatp_core.models.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("adatp-cache"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from adatp_core.models.loader import load_video_llm

    return load_video_llm(tiny_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def frames() -> torch.Tensor:
    """Four 96x128 frames of two scenes, float 0..1 (ComfyUI IMAGE)."""
    from adatp_core.samples import scene_frames

    return torch.from_numpy(scene_frames(num_frames=4, width=128, height=96, scenes=2)).float() / 255


QUESTION = "What is the red square doing in this video?"


def _stock(tiny_dir, attention):
    """The model class that the loader would pick, loaded the stock way."""
    import json

    import transformers

    from adatp_core.models.loader import ADAPTERS

    model_type = json.loads((tiny_dir / "config.json").read_text())["model_type"]
    model_class = getattr(transformers, ADAPTERS[model_type].model_class)
    return model_class.from_pretrained(
        tiny_dir, local_files_only=True, dtype=torch.float32, attn_implementation=attention).eval()


@pytest.fixture(scope="session")
def stock(tiny_dir):
    """The same weights loaded the stock way (plain sdpa), as the reference."""
    return _stock(tiny_dir, "sdpa")


@pytest.fixture(scope="session")
def stock_eager(tiny_dir):
    return _stock(tiny_dir, "eager")


class LoaderStopped(Exception):
    """Raised by the stop_at_from_pretrained fixture in place of loading weights."""


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch believes two bf16-capable CUDA GPUs are present (nothing may run on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@pytest.fixture
def stop_at_from_pretrained(monkeypatch) -> dict:
    """The keyword arguments the loader hands to LLaVA-OV's from_pretrained, which raises LoaderStopped."""
    import transformers

    seen = {}

    def from_pretrained(folder, **kwargs):
        seen.update(kwargs)
        raise LoaderStopped

    monkeypatch.setattr(transformers.LlavaOnevisionForConditionalGeneration, "from_pretrained", from_pretrained)
    return seen


# Tests that touch devices run on every device present: CPU always, CUDA when it
# is there (skipped otherwise). Use the ``device`` fixture, never a literal "cuda".
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")))


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(scope="module")
def tiny_on(tiny_dir, tiny):
    """The tiny model loaded on a given device (float32), each device loaded once.
    Module-scoped, so that a module that swaps ``tiny_dir``/``tiny`` (qwen_fixtures) gets its own."""
    from adatp_core.models.loader import load_video_llm

    models = {"cpu": tiny}

    def on(device):
        key = str(torch.device(device))
        if key not in models:
            models[key] = load_video_llm(tiny_dir, device=key, dtype="float32")
        return models[key]

    return on


@pytest.fixture(scope="module")
def stock_on(tiny_dir, stock):
    """The stock reference model on a given device (float32, plain sdpa)."""
    models = {"cpu": stock}

    def on(device):
        key = str(torch.device(device))
        if key not in models:
            models[key] = _stock(tiny_dir, "sdpa").to(key)
        return models[key]

    return on
