"""What transformers' sdpa attention allocates in a one-token decode step with a mask, per release.

Static and batched decode steps always pass a mask (``cache.py``: fixed buffers, rows of different
lengths). transformers' ``integrations/sdpa_attention.py`` then, for a model whose query heads
share key/value heads (``num_key_value_groups`` > 1), on CUDA and on the CPU:
- 5.17 through 5.22 (5.17.0, 5.18.0, 5.20.2, 5.21.1 read): ``use_gqa_in_sdpa`` is False with a mask,
  so the keys and values are copied to every query head (``repeat_kv``) before attending: a new
  [rows, Hq, n, d] tensor each, freed after the layer (so one layer's copy counts towards the peak);
- 5.23 on (5.23.0, 5.24.0, 5.25.0 read): the one query token is grouped onto the key/value heads
  (``pack_gqa``), so nothing is copied.
(On XPU with torch 2.8+, and on MPS with torch 2.13+ from 5.18, no copy either; the pack's memory
estimates only matter on CUDA, and count the copy there, as on the CPU.)
"""

from __future__ import annotations

import torch
from packaging.version import Version

from . import versions

# The first release whose masked one-token sdpa step groups the query heads instead of copying K/V.
NO_COPY_FROM = "5.23"


def masked_step_copies_kv(version: str | None = None) -> bool:
    """Whether a masked one-token sdpa step copies keys and values to every query head
    (5.17 - 5.22: True; 5.23 and later: False). version: the installed one unless given;
    one that cannot be parsed counts as copying (the estimate then errs on the safe side)."""
    release = versions.release(version)
    return release is None or release < Version(NO_COPY_FROM)


def query_groups(text_model: torch.nn.Module) -> list[int]:
    """Per decoder layer, the query heads per key/value head of its softmax attention
    (``self_attn.num_key_value_groups``, what sdpa repeats by); 1 for a layer without one
    (linear attention) or whose attention does not share heads."""
    return [int(getattr(getattr(layer, "self_attn", None), "num_key_value_groups", 1) or 1)
            for layer in text_model.layers]
