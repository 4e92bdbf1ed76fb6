"""The stage tests (tests/test_stages.py) on the tiny Qwen2.5-VL and Qwen3-VL: grid, budgets,
FastV equivalence, no repeated cell after Local Debias, branch safety, static decoding."""

from __future__ import annotations

from qwen_fixtures import *  # noqa: F401,F403  (tiny, frames: the Qwen models)
from test_stages import *  # noqa: F401,F403  (the same tests)
