"""Captions decoded together on the tiny Qwen3.5, Qwen3.5-MoE and Qwen3-VL-MoE: each row holds
its own conv and recurrent state per linear-attention layer, and rows equal batch 1 token for
token (test_batching.py's model-level tests)."""

from __future__ import annotations

from test_batching import (early_eos, states, test_a_batched_step_reads_the_chosen_tokens_once,  # noqa: F401
                           test_a_failing_prefill_fails_its_clip_alone,
                           test_greedy_rows_equal_batch_one_token_for_token, test_penalised_rows_equal_batch_one,
                           test_rows_logits_match_batch_one, test_sampled_rows_equal_batch_one_with_the_same_seed,
                           test_static_rows_equal_batch_one)

from hybrid_fixtures import *  # noqa: F401,F403  (tiny: the hybrid and MoE models)


def test_out_of_memory_inside_a_step_rolls_back_the_linear_states(tiny, states, monkeypatch):
    """Out of memory in a late layer of a batched step: the layers before it had already folded
    the step's token into their conv and recurrent states (in place), and the step ran again in
    halves, folding it twice. The rows' states are put back before the retry: batch 1's tokens."""
    import torch
    from test_batching import GREEDY, together

    from adatp_core.generate import generate_answer

    layer = tiny.adapter.text_model.layers[tiny.adapter.num_layers - 1]
    real = layer.forward
    sizes = []

    def small_memory(hidden, *args, **kwargs):
        sizes.append(hidden.shape[0])
        if hidden.shape[0] > 2 and hidden.shape[1] == 1:  # a batched decode step, after every other layer
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return real(hidden, *args, **kwargs)

    monkeypatch.setattr(layer, "forward", small_memory)
    answers = together(tiny, states, GREEDY, 5)
    monkeypatch.undo()
    assert max(sizes) > 2  # the failure really came in the middle of a step
    assert [a.token_ids for a in answers] == [generate_answer(s, GREEDY).token_ids for s in states]


# The batched step's graph capture and its warm-up: test_hybrid.py::test_a_graph_warm_up_leaves_the_linear_states_as_they_were.
