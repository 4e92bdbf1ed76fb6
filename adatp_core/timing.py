"""Wall-clock timing of stages that is honest on GPUs (synchronises first), and one answer's
decoding figures as one typed value (``DecodeStats``)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch

from .sampling import settings_text


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(times: dict, key: str, device="cpu"):
    """Add the seconds spent in the block to ``times[key]``."""
    synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        synchronize(device)
        times[key] = times.get(key, 0.0) + time.perf_counter() - start


@dataclass(frozen=True)
class DecodeStats:
    """One answer's decoding figures: generate.py measures them for one answer, batching.py for a
    row of a batch. The node's stats text (``text``, report.py), the CLI's --json and the caption
    stream read these fields; ``as_dict`` gives them under the stats keys every output has used
    (in that order), and ``from_dict`` reads them back from such a dict.

    kv_lengths: each layer's cached length at the end. prefill_seconds: the prefill from K.
    capture_seconds: a one-time CUDA graph capture (per model and cache-size bucket), in neither
    of the other two. graph_note: static decoding's graph: captured, reused, or why there is none.
    sampling: the settings in effect (the model's generation_config filled in). The batch fields
    (None for one answer alone): this row's share of the batch's decode time, the batch's size,
    its static passes and the positions each carried beyond its own (static_extra)."""

    new_tokens: int = 0
    kv_lengths: tuple = ()
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    ms_per_token: float = 0.0
    mode: str | None = None
    capture_seconds: float = 0.0
    graph_note: str | None = None
    sampling: dict | None = None
    decode_share: float | None = None
    batch_size: int | None = None
    static_passes: int | None = None
    static_extra: float | None = None

    KEYS = {"new_tokens": "new_tokens", "kv_lengths": "kv_lengths", "prefill_seconds": "time_prefill_continue",
            "decode_seconds": "time_generate", "ms_per_token": "decode_ms_per_token", "mode": "decode_mode",
            "capture_seconds": "time_graph_capture", "graph_note": "static_graph", "sampling": "sampling",
            "decode_share": "time_decode_share", "batch_size": "batch_size",
            "static_passes": "decode_passes_static", "static_extra": "static_extra_positions"}
    BATCH_FIELDS = ("decode_share", "batch_size", "static_passes", "static_extra")

    def as_dict(self) -> dict:
        """The figures under their stats keys (the batch's only for a row of a batch)."""
        batch = self.batch_size is not None
        return {self.KEYS[f.name]: getattr(self, f.name) for f in fields(self)
                if batch or f.name not in self.BATCH_FIELDS}

    @classmethod
    def from_dict(cls, stats: dict) -> DecodeStats:
        """The figures in a stats dict (an answer's, a pipeline's); a missing one is its default."""
        return cls(**{name: stats[key] for name, key in cls.KEYS.items() if key in stats})

    def text(self) -> str:
        """The stats text's "Generation:" line."""
        line = f"Generation: {self.new_tokens} tokens, {self.ms_per_token:.1f} ms/token"
        if self.mode is not None:
            line += f" ({self.mode} decoding)"
        if self.capture_seconds:  # once per model and cache-size bucket, so on its own
            line += f"; one-time CUDA graph capture {self.capture_seconds:.3f} s"
        if self.sampling is not None:  # the settings in effect, the model's generation_config filled in
            line += f"; {settings_text(self.sampling)}"
        return line
