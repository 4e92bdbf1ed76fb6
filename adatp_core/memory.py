"""Out-of-memory handling: a clear error, and no tensor left behind."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TypeVar

import torch

from .errors import AdaTPEnvironmentError, AdaTPInputError, AdaTPInterrupted

T = TypeVar("T")
OOM_ADVICE = "use fewer frames, a lower retention, a smaller K, or keep_loaded off for other models"


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def is_interrupt(exc: BaseException) -> bool:
    """The user asked to stop: Ctrl-C, AdaTP's interrupt, or ComfyUI's
    InterruptProcessingException (matched by name: the core never imports ComfyUI)."""
    return isinstance(exc, (KeyboardInterrupt, AdaTPInterrupted)) or "Interrupt" in type(exc).__name__


def fallback_allowed(exc: BaseException) -> bool:
    """Whether a fast path that raised ``exc`` may be redone on its plain path (static
    decoding -> default decoding, the batched Qwen vision tower -> the stock one).

    Any ordinary error may, since the plain path recomputes the whole result. Running out
    of memory may not (it is reported as such, with what to lower), nor an interrupt (the
    user asked to stop), nor bad input (the plain path would refuse it too), nor anything
    that is not an ``Exception`` (SystemExit, ...).
    """
    return (isinstance(exc, Exception) and not isinstance(exc, AdaTPInputError)
            and not is_out_of_memory(exc) and not is_interrupt(exc))


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_guarded(fn: Callable[[], T], stage: str, advice: str = OOM_ADVICE, model=None) -> T:
    """Run ``fn``; turn running out of memory into AdaTPEnvironmentError.

    The error is raised after the original exception (whose traceback holds
    every tensor of the failed stage) is gone and memory has been collected, so
    nothing of the failed run stays allocated and a smaller run can follow.
    model: a VideoLLM whose kept static-decoding buffers and graphs, and kept video
        prefixes, are dropped too.
    """
    try:
        return fn()
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    for kept in (getattr(model, "static_decoders", None), getattr(model, "prefix_cache", None)):
        if kept is not None:  # whole KV caches: what the next, smaller run needs back
            kept.clear()
    free_memory()
    raise AdaTPEnvironmentError(f"out of memory during {stage} ({detail}); {advice}.")
