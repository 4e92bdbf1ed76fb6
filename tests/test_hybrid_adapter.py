"""The Qwen adapter tests (tests/test_qwen_adapter.py) on the tiny Qwen3.5, Qwen3.5-MoE and
Qwen3-VL-MoE: visual tokens and DeepStack features equal the stock model's, frame features per
temporal patch, special tokens in the question, M-RoPE positions from transformers' own
get_rope_index with timestamps in the prompt. (The prompt's text and thinking block: test_hybrid.py.)"""

from __future__ import annotations

from test_qwen_adapter import (test_encode_matches_stock_video_features,  # noqa: F401
                               test_frame_features_are_per_temporal_patch,
                               test_positions_come_from_get_rope_index_and_frame_times,
                               test_special_tokens_in_the_question_stay_text)

from hybrid_fixtures import *  # noqa: F401,F403  (tiny, stock, frames: the hybrid and MoE models)
