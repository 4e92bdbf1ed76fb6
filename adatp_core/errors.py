"""Typed, actionable errors.

Every message says what is wrong and what to do about it. Bad user input is a
``ValueError`` subclass; a problem with the environment (missing package, out of
memory, decoder crash) is a ``RuntimeError`` subclass.
"""

from __future__ import annotations

import sys


class AdaTPInputError(ValueError):
    """A user-supplied value (path, question, parameter, file) cannot be used."""


class AdaTPEnvironmentError(RuntimeError):
    """The machine or installation cannot do what was asked."""


class AdaTPTransformersError(AdaTPEnvironmentError):
    """transformers' own code failed while a model family ran (hf/versions.py's
    ``transformers_boundary``): most likely a release the pack was not tested with. Every
    clip or question would fail the same way, so it is not retried as running out of memory is."""


class AdaTPInterrupted(RuntimeError):
    """The user interrupted a run (ComfyUI's Cancel button or Ctrl-C)."""


class AdaTPOutOfMemoryError(AdaTPEnvironmentError):
    """The device ran out of memory (``memory.run_guarded`` raises it, with what to lower). A
    batch halves its rows on it; nothing retries it on a plain path, which needs as much memory."""


# How torch words a device out of memory where it raises a plain RuntimeError, not
# torch.OutOfMemoryError: "CUDA error: out of memory" (the driver, from a kernel launch or a
# graph capture), "MPS backend out of memory", HIP's and XPU's "... out of memory"; the CPU
# allocator's "DefaultCPUAllocator: can't allocate memory"; cuBLAS and cuDNN failing to allocate
# their workspace ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED").
OUT_OF_MEMORY_MESSAGES = ("out of memory", "can't allocate memory", "STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """The one out-of-memory rule: whether ``exc`` means the device ran out of memory.

    torch.OutOfMemoryError, the pack's own AdaTPOutOfMemoryError, and a RuntimeError in one of
    torch's wordings (OUT_OF_MEMORY_MESSAGES). Every place that treats running out of memory
    apart (run_guarded, the fallbacks, capture, the batch's halving, the doctor) asks this.
    torch is not imported for it: no torch error can exist before torch is loaded."""
    if isinstance(exc, AdaTPOutOfMemoryError):
        return True
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(exc, oom):
        return True
    if isinstance(exc, (AdaTPEnvironmentError, AdaTPInterrupted)):  # the pack's others may only quote one
        return False
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in OUT_OF_MEMORY_MESSAGES)


class OptionError(AdaTPInputError):
    """A setting that fits no clip or question; ``option`` names it (a command line shows its --option)."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option
