"""The stage tests (tests/test_stages.py) on the tiny Qwen2.5-VL and Qwen3-VL: grid, budgets,
FastV equivalence, no repeated cell after Local Debias, branch safety, static decoding."""

from __future__ import annotations

import pytest
from qwen_fixtures import *  # noqa: F401,F403  (tiny, frames: the Qwen models)
from test_stages import *  # noqa: F401,F403  (the same tests)


@pytest.fixture(scope="module")
def static_tolerance():
    """Measured: up to 1.24e-5 on Qwen2.5-VL's logits of magnitude ~3-7 (float32 summation order
    over the static buffer; the greedy tokens are identical). The family's masked-reference
    tolerance (test_qwen_exactness.py) is the same 3e-5, for the same reason."""
    return 3e-5
