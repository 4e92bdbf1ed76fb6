"""Fixtures that put the tiny Qwen2.5-VL and Qwen3-VL in place of the tiny
LLaVA-OneVision, so a test module written for one family runs on the others:
``from qwen_fixtures import *`` after importing the tests."""

from __future__ import annotations

import pytest
import torch
from conftest import _stock

from adatp_core.models.tiny_qwen import ensure_tiny_qwen2_5_vl, ensure_tiny_qwen3_vl

BUILDERS = {"qwen2_5_vl": ensure_tiny_qwen2_5_vl, "qwen3_vl": ensure_tiny_qwen3_vl}


@pytest.fixture(scope="session")
def qwen_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("adatp-qwen-cache")


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def tiny_dir(family, qwen_cache):
    return BUILDERS[family](qwen_cache)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from adatp_core.models.loader import load_video_llm

    return load_video_llm(tiny_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def stock(tiny_dir):
    return _stock(tiny_dir, "sdpa")


@pytest.fixture(scope="module")
def stock_eager(tiny_dir):
    return _stock(tiny_dir, "eager")


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    """Five 224x280 frames of two scenes (an odd count: the last temporal patch is padded)."""
    from adatp_core.samples import scene_frames

    return torch.from_numpy(scene_frames(num_frames=5, width=280, height=224, scenes=2)).float() / 255
