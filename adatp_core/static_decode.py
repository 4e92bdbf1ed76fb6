"""Static decoding: every decode step has the same shapes, so on CUDA the whole
step (embedding, all layers, head, argmax) is captured once as a CUDA graph and
replayed per token, removing the per-kernel launch cost that dominates decoding
at batch 1.

Pruning leaves layers < K with the full prompt and layers >= K with the kept
tokens only. Each layer keeps its own buffer and its own valid length; a step
writes the new key/value at ``base_l + step`` (a device-side index) and attends
over the whole buffer with a per-layer mask of the filled positions. No token
that the spec keeps is dropped. Greedy only: the chosen tokens equal the default
mode's (a test checks).
"""

from __future__ import annotations

import torch

from .models.base import KVCache


class StaticKVCache:
    """Fixed-size per-layer buffers taken over from a prefilled ``KVCache``.

    cache: after the prefill, with room for ``max_new_tokens`` more per layer.
    """

    def __init__(self, cache: KVCache, max_new_tokens: int):
        self.keys, self.values, self.base = [], [], []
        for i, length in enumerate(cache.lengths()):
            need = length + max_new_tokens
            k, v = (t[..., :need, :] for t in cache.buffers(i))
            if k.shape[-2] < need:  # generate_answer reserves the room; this is a fallback
                pad = (*k.shape[:-2], need - k.shape[-2], k.shape[-1])
                k, v = torch.cat([k, k.new_zeros(pad)], dim=-2), torch.cat([v, v.new_zeros(pad)], dim=-2)
            k[..., length:, :].zero_()  # unwritten slots must be finite: masked probs are 0, and 0 * NaN is NaN
            v[..., length:, :].zero_()
            self.keys.append(k)
            self.values.append(v)
            self.base.append(length)
        device = self.keys[0].device
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self._base = torch.tensor(self.base, dtype=torch.long, device=device)
        self._arange = [torch.arange(k.shape[-2], device=device) for k in self.keys]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        index = self._base[layer_idx:layer_idx + 1] + self.step
        self.keys[layer_idx].index_copy_(2, index, key_states)
        self.values[layer_idx].index_copy_(2, index, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def masks(self) -> list[torch.Tensor]:
        """Per layer, [1, 1, 1, capacity] bool: the positions filled after this step's write."""
        return [(ar <= self._base[i] + self.step)[None, None, None, :] for i, ar in enumerate(self._arange)]

    def lengths(self, steps_done: int) -> tuple[int, ...]:
        return tuple(b + steps_done for b in self.base)


class StaticDecoder:
    """One greedy decode step with fixed shapes; a CUDA graph of it on CUDA."""

    def __init__(self, adapter, cache: StaticKVCache, position_ids: torch.Tensor, use_graph: bool | None = None):
        self.adapter = adapter
        self.cache = cache
        dev = adapter.device
        self.token = torch.zeros((1, 1), dtype=torch.long, device=dev)
        self.position = torch.zeros((*position_ids.shape[:-1], 1), dtype=position_ids.dtype, device=dev)
        self.use_graph = dev.type == "cuda" if use_graph is None else use_graph
        self.graph = None
        self.out = None

    def _step(self) -> torch.Tensor:
        hidden = self.adapter.embed_tokens(self.token)
        hidden = self.adapter.run_layers(hidden, self.position, self.cache, 0, self.adapter.num_layers,
                                         masks=self.cache.masks())
        return self.adapter.logits(hidden)[-1]

    def __call__(self, token: int, position: torch.Tensor, step: int) -> torch.Tensor:
        """Feed ``token`` at ``position`` as decode step ``step``; returns logits [V] float32."""
        self.token.fill_(token)
        self.position.copy_(position)
        self.cache.step.fill_(step)
        if not self.use_graph:
            return self._step()
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph (allocations, lazy inits)
                self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._step()
        self.graph.replay()
        return self.out
