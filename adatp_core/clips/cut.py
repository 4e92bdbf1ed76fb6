"""Cutting planned clips out of a source with PyAV (skeleton)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .plan import ClipPlan

CUT_MODES = ("reencode", "copy")


@dataclass(frozen=True)
class CutResult:
    """What became of one planned clip."""

    plan: ClipPlan
    path: Path | None  # the written clip (.mp4), None on failure
    skipped: bool  # already there from an earlier run
    error: str | None


def cut_clips(source: Path, plans: list[ClipPlan], out_dir: Path, *, mode: str = "reencode",
              keep_audio: bool = False, crf: int = 18,
              on_clip: Callable[[CutResult], None] | None = None) -> list[CutResult]:
    """Write each plan to ``out_dir / f"{plan.name}.mp4"``, decoding the source once for all.

    mode "reencode": exact frames, H.264 yuv420p at plan.fps; "copy": stream copy cut at keyframes.
    Each clip goes to a temp file in out_dir then is renamed (never a half-written clip). A clip
    whose file exists is skipped."""
    raise NotImplementedError
