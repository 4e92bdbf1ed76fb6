"""Captions decoded together on the tiny Qwen3.5, Qwen3.5-MoE and Qwen3-VL-MoE: each row holds
its own conv and recurrent state per linear-attention layer, and rows equal batch 1 token for
token (test_batching.py's model-level tests)."""

from __future__ import annotations

from test_batching import (early_eos, states, test_a_failing_prefill_fails_its_clip_alone,  # noqa: F401
                           test_greedy_rows_equal_batch_one_token_for_token, test_rows_logits_match_batch_one,
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


def test_a_batched_graph_capture_leaves_the_linear_states_as_they_were(tiny, states, monkeypatch):
    """StaticRowsStep's capture runs the step once as a warm-up, then the graph replays it: every
    row's linear states took the step's token in twice. CUDA's semantics here on the CPU: the
    capture records without running (its run is undone), the replay runs."""
    import contextlib

    import torch
    from test_batching import together

    from adatp_core import batching
    from adatp_core.generate import SamplingConfig, generate_answer

    capturing = []

    class Graph:
        def replay(self):
            self.out.copy_(self.step())

    @contextlib.contextmanager
    def graph(g, **kwargs):
        capturing.append(g)
        yield
        capturing.pop()
        g.undo()

    class Stream:
        def wait_stream(self, other):
            pass

    real_step = batching.StaticRowsStep._step

    def step(self, entry):
        if not capturing:
            return real_step(self, entry)
        g = capturing[-1]
        saved = [(c.clone(), r.clone()) for c, r in self.cache.linear.values()]

        def undo():  # what the capture ran did not run
            for (c, r), (c0, r0) in zip(self.cache.linear.values(), saved):
                c.copy_(c0)
                r.copy_(r0)

        g.step, g.undo = (lambda: real_step(self, entry)), undo
        g.out = real_step(self, entry)
        return g.out

    real_init = batching.StaticRowsStep.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.use_graph = True

    monkeypatch.setattr(batching.StaticRowsStep, "__init__", init)
    monkeypatch.setattr(batching.StaticRowsStep, "_step", step)
    for name, value in {"Stream": lambda device=None: Stream(), "current_stream": lambda device=None: Stream(),
                        "stream": lambda s: contextlib.nullcontext(), "CUDAGraph": Graph, "graph": graph}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    cfg = SamplingConfig(max_new_tokens=6, ignore_eos=True, decode_mode="static")
    answers = together(tiny, states[:3], cfg, 3)
    monkeypatch.undo()
    reference = [generate_answer(s, SamplingConfig(max_new_tokens=6, ignore_eos=True, decode_mode="default")).token_ids
                 for s in states[:3]]
    assert [a.token_ids for a in answers] == reference
