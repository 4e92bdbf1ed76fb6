"""The stage tests (tests/test_stages.py) on the tiny Qwen3.5, Qwen3.5-MoE and Qwen3-VL-MoE:
grid, budgets, FastV equivalence, branch safety, and static decoding, whose fixed buffers
hold the linear-attention layers' conv and recurrent states. K = 1 and 2 move to 4 on the
hybrid models (test_hybrid.py)."""

from __future__ import annotations

import pytest
from hybrid_fixtures import *  # noqa: F401,F403  (tiny, frames: the hybrid and MoE models)
from test_stages import *  # noqa: F401,F403  (the same tests)


@pytest.fixture(scope="module")
def static_tolerance():
    """As for Qwen3-VL (test_qwen_stages.py): float32 summation order over the static buffers."""
    return 3e-5
