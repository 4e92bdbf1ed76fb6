"""Which scaled-dot-product-attention kernels may run, per phase, on CUDA.

PyTorch may pick cuDNN attention for ``scaled_dot_product_attention``; cuDNN builds
an execution plan for every new key length, and decoding brings a new key length
at every step (and every question a new prompt length). On an H100 that cost
~20 ms of host time per call against ~10 us of GPU work (issue 10). The flash and
memory-efficient kernels need no plan; math is the fallback for anything they
cannot take. Elsewhere (CPU) nothing changes.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

# Priority order: flash for causal / unmasked calls, efficient when a mask is given
# (static decoding), math for anything else. Never cuDNN.
PLAN_FREE_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def plan_free_attention(device) -> contextlib.AbstractContextManager:
    """A context in which SDPA on ``device`` uses only kernels that build no
    per-shape plan (see the module docstring). A no-op off CUDA."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [getattr(SDPBackend, name) for name in PLAN_FREE_BACKENDS]
    if "set_priority" in inspect.signature(sdpa_kernel).parameters:
        return sdpa_kernel(backends, set_priority=True)
    return sdpa_kernel(backends)
