"""Captions decoded together on the tiny Qwen3.5, Qwen3.5-MoE and Qwen3-VL-MoE: each row holds
its own conv and recurrent state per linear-attention layer, and rows equal batch 1 token for
token (test_batching.py's model-level tests)."""

from __future__ import annotations

from test_batching import (early_eos, states, test_a_failing_prefill_fails_its_clip_alone,  # noqa: F401
                           test_greedy_rows_equal_batch_one_token_for_token, test_rows_logits_match_batch_one,
                           test_sampled_rows_equal_batch_one_with_the_same_seed,
                           test_static_rows_equal_batch_one)

from hybrid_fixtures import *  # noqa: F401,F403  (tiny: the hybrid and MoE models)
