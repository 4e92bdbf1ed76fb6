"""The video prefix cache's tests (tests/test_prefix_cache.py) on the tiny Qwen2.5-VL and
Qwen3-VL: M-RoPE positions, timestamps in the prompt (Qwen3-VL) and DeepStack features
added after layers 0..2, which the prefix keeps for layers < K and the state for layers >= K."""

from __future__ import annotations

from qwen_fixtures import *  # noqa: F401,F403  (tiny_dir, frames: the Qwen models)
from test_prefix_cache import *  # noqa: F401,F403  (the same tests)
