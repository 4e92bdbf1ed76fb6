"""Captions decoded together on the tiny Qwen3.5, Qwen3.5-MoE and Qwen3-VL-MoE: each row holds
its own conv and recurrent state per linear-attention layer, and rows equal batch 1 token for
token (test_batching.py's model-level tests)."""

from __future__ import annotations

from test_batching import (early_eos, states, test_a_batched_step_reads_the_chosen_tokens_once,  # noqa: F401
                           test_a_failing_prefill_fails_its_clip_alone,
                           test_another_batched_capture_failure_steps_without_a_graph_and_names_it,
                           test_greedy_rows_equal_batch_one_token_for_token,
                           test_out_of_memory_in_a_batched_capture_halves_the_batch_and_keeps_graphs,
                           test_penalised_rows_equal_batch_one,
                           test_rows_logits_match_batch_one,
                           test_sampled_rows_equal_batch_one_with_the_same_seed,
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


def test_graph_replays_keep_no_copy_of_the_linear_states(tiny, states, monkeypatch):
    """A batched step that replays a CUDA graph (played on the CPU: the capture records the step,
    each replay runs it) allocates nothing, so it cannot run out of memory halfway and needs no
    copy of the rows' linear-attention states; only the captures keep one (their warm-up is undone).
    It used to be taken at every step of several rows. The tokens stay batch 1's."""
    from test_batching import together
    from test_hybrid import _capture_like_cuda

    from adatp_core import steps
    from adatp_core.generate import SamplingConfig, generate_answer

    kept, replays = [], []

    def capture(fn, device):
        graph, out, stream = _capture_like_cuda(fn, device)
        replay = graph.replay
        graph.replay = lambda: (replays.append(True), replay())
        return graph, out, stream

    monkeypatch.setattr(steps, "capture_graph", capture)
    monkeypatch.setattr(steps, "no_graph_reason", lambda adapter: None)  # as on CUDA
    real_kept = steps.linear_states_kept

    def counted(cache, rows=slice(None), only_on_error=False):
        kept.append("step" if only_on_error else "capture")
        return real_kept(cache, rows, only_on_error)

    monkeypatch.setattr(steps, "linear_states_kept", counted)
    cfg = dict(max_new_tokens=6, ignore_eos=True)
    answers = together(tiny, states, SamplingConfig(**cfg, decode_mode="static"), 2)
    monkeypatch.undo()
    default = SamplingConfig(**cfg, decode_mode="default")
    assert [a.token_ids for a in answers] == [generate_answer(s, default).token_ids for s in states]
    captures = kept.count("capture")
    assert captures and len(replays) > 2 * captures  # most steps replay a graph
    assert "step" not in kept, kept


def test_row_bytes_count_the_linear_states_and_their_copy(tiny, states):
    """auto_batch_size sizes the batch by row_bytes: a hybrid row takes its keys and values, its
    linear-attention states, and the copy of them that a step without a graph (or a capture) keeps."""
    from adatp_core import batching
    from adatp_core.decode import continue_prefill
    from adatp_core.hf.cache import RowsKVCache

    cache, _ = continue_prefill(states[0], 0)
    rows = RowsKVCache(tiny.adapter.num_layers, 2)
    rows.add(cache, 10)
    kv = sum(2 * (n + 10) * rows.keys[i][0, :, 0].numel() * rows.keys[i].element_size()
             for i, n in enumerate(rows.lengths[0]) if i not in rows.linear)
    linear = sum(buf[0].numel() * buf.element_size() for bufs in rows.linear.values() for buf in bufs)
    assert bool(linear) == any(tiny.adapter.is_linear_layer(i) for i in range(tiny.adapter.num_layers))
    assert batching.row_bytes(cache, 10) == kv + 2 * linear
