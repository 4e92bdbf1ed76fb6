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
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(
        tiny_dir, local_files_only=True, dtype=torch.float32, attn_implementation=attention).eval()


@pytest.fixture(scope="session")
def stock(tiny_dir):
    """The same weights loaded the stock way (plain sdpa), as the reference."""
    return _stock(tiny_dir, "sdpa")


@pytest.fixture(scope="session")
def stock_eager(tiny_dir):
    return _stock(tiny_dir, "eager")


# Tests that touch devices run on every device present: CPU always, CUDA when it
# is there (skipped otherwise). Use the ``device`` fixture, never a literal "cuda".
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")))


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(scope="session")
def tiny_on(tiny_dir):
    """The tiny model loaded on a given device (float32), each device loaded once."""
    from adatp_core.models.loader import load_video_llm

    models = {}

    def on(device):
        key = str(torch.device(device))
        if key not in models:
            models[key] = load_video_llm(tiny_dir, device=key, dtype="float32")
        return models[key]

    return on


@pytest.fixture(scope="session")
def stock_on(tiny_dir, stock):
    """The stock reference model on a given device (float32, plain sdpa)."""
    models = {"cpu": stock}

    def on(device):
        key = str(torch.device(device))
        if key not in models:
            models[key] = _stock(tiny_dir, "sdpa").to(key)
        return models[key]

    return on
