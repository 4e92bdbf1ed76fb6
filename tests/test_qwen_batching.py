"""Captions decoded together on the tiny Qwen2.5-VL and Qwen3-VL: rows with their own
M-RoPE position ids ([3, B, 1]) and, for Qwen3-VL, DeepStack in each clip's prefill,
equal batch 1 token for token (test_batching.py's model-level tests)."""

from __future__ import annotations

from test_batching import (early_eos, states, test_a_batched_step_reads_the_chosen_tokens_once,  # noqa: F401
                           test_a_failing_prefill_fails_its_clip_alone,
                           test_greedy_rows_equal_batch_one_token_for_token, test_penalised_rows_equal_batch_one,
                           test_rows_logits_match_batch_one, test_sampled_rows_equal_batch_one_with_the_same_seed,
                           test_static_rows_equal_batch_one)

from qwen_fixtures import *  # noqa: F401,F403  (tiny: the Qwen models)
