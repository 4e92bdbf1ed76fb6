"""The loaded model as the stages hold it: ``VideoLLM`` and the stores it carries between calls.

A VideoLLM is what the ADATP_MODEL socket carries: the transformers model, its tokenizer, its
adapter (models/), the device and dtype policy, and two stores that outlive one call, static
decoding's buffers and graphs (static_decode.StaticDecoders) and the videos' reusable prefills
(prefix_cache.PrefixStore). The loader (models/loader.py) builds one; the stages (attention.py,
state.py, generate.py) use it. It sits below both, so neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .models.base import VideoLLMAdapter
from .prefix_cache import PrefixStore
from .static_decode import StaticDecoders


@dataclass(frozen=True, eq=False)
class VideoLLM:
    """A loaded model: what the ADATP_MODEL socket carries.

    Holds no per-query or pruning setting; every stage gets those per call.
    """

    model: torch.nn.Module
    tokenizer: object
    adapter: VideoLLMAdapter
    name: str
    path: str
    compute_device: torch.device
    dtype: torch.dtype
    attention: str
    offload_device: torch.device | None = None  # None: keep the model loaded
    quantization: str | None = None  # a QUANTIZED_DTYPES choice (dtype is then the compute dtype)
    # Static decoding's buffers and CUDA graphs, reused across answers (static_decode.py).
    static_decoders: StaticDecoders = field(default_factory=StaticDecoders, repr=False)
    # Videos' question-independent prefills, reused by the next question (prefix_cache.py, attention.py).
    prefix_cache: PrefixStore = field(default_factory=PrefixStore, repr=False)

    @property
    def device(self) -> torch.device:
        """Where the weights are now (the compute device, or the offload device)."""
        return self.adapter.device

    def __repr__(self) -> str:
        precision = self.quantization or str(self.dtype).removeprefix("torch.")
        return f"VideoLLM({self.name!r}, {self.compute_device}, {precision})"


def activate(llm: VideoLLM) -> None:
    """Move the weights to the compute device if they were offloaded."""
    if llm.device != llm.compute_device:
        llm.model.to(llm.compute_device)


def release(llm: VideoLLM) -> bool:
    """Offload the weights if the model's policy says so. Returns whether it did."""
    if llm.offload_device is None or llm.device == llm.offload_device:
        return False
    llm.static_decoders.clear()  # their KV buffers live on the compute device
    llm.prefix_cache.clear()
    llm.model.to(llm.offload_device)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return True
