"""Out-of-memory handling: a clear error, and no tensor left behind."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TypeVar

import torch

from .budget import available_device_bytes
from .errors import AdaTPInputError, AdaTPInterrupted, AdaTPOutOfMemoryError, is_out_of_memory

T = TypeVar("T")
OOM_ADVICE = "use fewer frames, a lower retention, a smaller K, or keep_loaded off for other models"
# The host ran out, not the device: torch's CPU allocator says so (a pinned block that fails says only
# "CUDA error: out of memory", and keeps the device's advice).
HOST_ALLOCATION_MESSAGES = ("DefaultCPUAllocator",)
HOST_OOM_ADVICE = ("the host's memory ran out: use fewer frames or a lower retention, close what else holds "
                   "memory, or keep the keys and values on the device (kv device, --kv device) where the GPU has room")
# The host ran out after the device did (an answer's retry with its keys and values on the host).
BOTH_OOM_ADVICE = ("the device ran out with the keys and values there, and the host's memory with them on the host: "
                   "use fewer frames (--frames), a lower retention (--retention) or a smaller pixel budget "
                   "(--max-pixels), or close what else holds memory")


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


def free_pinned_memory() -> None:
    """Give back the pinned host memory torch's caching host allocator keeps after its tensors are gone
    (an answer's keys and values on the host, the encoded rows, layer K's rows: gigabytes the rest of the
    machine could not use until the next such run), where torch has torch.accelerator.empty_host_cache (an
    older one keeps it). Called by release_pinned, only where something was pinned."""
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    if empty is not None:
        gc.collect()  # a decode step's window and its layers hold each other (and views of the homes)
        empty()


# Whether a host_buffer was pinned since the last release_pinned that left no pinned block behind: the
# common all-on-device run pins nothing, and its release_pinned costs nothing (no collection, no call).
_pinned = {"since": False}


def host_buffer(shape, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An empty host tensor, pinned with ``pin`` (for a GPU: copies to and from it at full speed). Every
    pinned host buffer of the host's path is made here (the encoded rows, layer K's rows, gathered DeepStack
    rows, layers >= K's homes), so that release_pinned knows there is something to give back."""
    out = torch.empty(shape, dtype=dtype, device="cpu", pin_memory=pin)
    if pin:
        _pinned["since"] = True
    return out


def buffer_like(shape, like: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An empty buffer of ``like``'s dtype on ``device``: a host_buffer there, pinned when ``like`` is on a
    GPU (its copies to and from the card run at full speed), else on that device."""
    if device.type == "cpu":
        return host_buffer(shape, like.dtype, pin=like.device.type == "cuda")
    return torch.empty(shape, dtype=like.dtype, device=device)


def release_pinned() -> bool:
    """free_pinned_memory where host_buffer pinned something since the last release that left nothing: call
    it where such buffers die (the end of a run or an answer, a video prefix dropped). torch's caching host
    allocator keeps a dead pinned block for the process's life otherwise. Returns whether it ran."""
    if not _pinned["since"]:
        return False
    free_pinned_memory()  # something was pinned: CUDA is there
    _pinned["since"] = _pinned_blocks_left()
    return True


def _pinned_blocks_left() -> bool:
    """Whether torch's caching host allocator still holds pinned blocks (live tensors': a kept prefix's, a
    state's): then a later release_pinned runs again. True where torch does not say."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    try:
        held = None if stats is None else stats().get("allocated_bytes.current")
    except (RuntimeError, AttributeError):
        held = None
    return held is None or held > 0


def free_bytes(device) -> int | None:
    """Bytes a new allocation on ``device`` can have now: the CUDA device's free memory plus what
    torch's allocator holds without using it, within the process's cap where one is set
    (budget.available_device_bytes: one answer for the batching's room and the placements). None where
    that is not known (the CPU, MPS): there nothing is refused ahead, and an allocation that fails is
    the error."""
    return available_device_bytes(torch.device(device))


def drop_kept(model, prefixes: bool = True) -> int:
    """Drop what ``model`` (a VideoLLM) keeps between runs after running out of memory: static decoding's
    buffers and graphs, and (``prefixes``) its kept video prefixes, whole KV caches the next, smaller run
    needs back. The number of video prefixes dropped."""
    decoders = getattr(model, "static_decoders", None)
    if decoders is not None:
        decoders.clear()
    store = getattr(model, "prefix_cache", None) if prefixes else None
    if store is None:
        return 0
    dropped = len(store)
    store.clear()
    return dropped


def run_guarded(fn: Callable[[], T], stage: str, advice: str = OOM_ADVICE, model=None,
                drop_prefixes: bool = True, host_advice: str = HOST_OOM_ADVICE) -> T:
    """Run ``fn``; turn running out of memory (errors.is_out_of_memory) into AdaTPOutOfMemoryError.

    The error is raised after the original exception (whose traceback holds
    every tensor of the failed stage) is gone and memory has been collected, so
    nothing of the failed run stays allocated and a smaller run can follow. An
    AdaTPOutOfMemoryError from an inner run_guarded keeps its message.
    model: a VideoLLM whose kept static-decoding buffers and graphs, and kept video
        prefixes, are dropped too (drop_kept).
    drop_prefixes: False keeps the video prefixes, where the caller runs again in less memory
        (generate.generate_answer's retry with the keys and values on the host) and drops them
        only if that fails too.
    host_advice: the advice where the host ran out (HOST_OOM_ADVICE; BOTH_OOM_ADVICE where the device
        ran out before).
    """
    try:
        return fn()
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        if isinstance(exc, AdaTPOutOfMemoryError):
            message = str(exc)
        else:
            detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            if any(m in str(exc) for m in HOST_ALLOCATION_MESSAGES):
                advice = host_advice
            message = f"out of memory during {stage} ({detail}); {advice}."
    drop_kept(model, drop_prefixes)
    free_memory()
    raise AdaTPOutOfMemoryError(message)
