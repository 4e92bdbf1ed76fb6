"""Fixtures that put the tiny Qwen3.5 (hybrid linear/full attention), Qwen3.5-MoE and
Qwen3-VL-MoE in place of the tiny LLaVA-OneVision, so a test module written for one family
runs on them: ``from hybrid_fixtures import *`` after importing the tests."""

from __future__ import annotations

import pytest
from qwen_fixtures import *  # noqa: F401,F403  (qwen_cache, tiny, stock, stock_eager, frames)

from adatp_core.models.tiny_qwen import ensure_tiny_qwen3_5, ensure_tiny_qwen3_5_moe, ensure_tiny_qwen3_vl_moe

HYBRID_BUILDERS = {"qwen3_5": ensure_tiny_qwen3_5, "qwen3_5_moe": ensure_tiny_qwen3_5_moe,
                   "qwen3_vl_moe": ensure_tiny_qwen3_vl_moe}


@pytest.fixture(scope="module", params=sorted(HYBRID_BUILDERS))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def tiny_dir(family, qwen_cache):
    return HYBRID_BUILDERS[family](qwen_cache)
