"""From shots to training clips: lengths, frame counts, sizes and names (skeleton)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .shots import Shot

FRAME_RULES = ("4k+1", "8k+1", "any")


@dataclass(frozen=True)
class ClipRules:
    """What a trainer wants of its clips."""

    min_seconds: float = 1.0
    max_seconds: float = 5.0
    fps: float | None = 16.0  # None: the source's rate
    frames: str = "4k+1"  # "4k+1" | "8k+1" | "any"
    trim_frames: int = 0  # dropped at each end of a shot (at the target fps)
    keep_short: bool = False  # a shot shorter than min_seconds: dropped, or kept as one clip
    max_side: int = 0  # 0: keep the size; else cap the long side, even dimensions


@dataclass(frozen=True)
class ClipPlan:
    """One clip to cut: ``frames`` frames at ``fps`` from ``start`` on the source timeline."""

    source: Path
    shot: int
    index: int  # clip index within the shot
    start: float  # seconds on the source timeline
    frames: int  # frame count at `fps`, obeying the rules
    fps: float
    width: int
    height: int
    name: str  # deterministic file stem: source key, shot, time range; no extension

    @property
    def end(self) -> float:
        return self.start + self.frames / self.fps


def source_key(source: Path, root: Path | None) -> str:
    """A deterministic file-name stem for a source. Two sources with the same stem in different
    folders get different keys (root: the folder the source was found in; None: the resolved
    path decides)."""
    raise NotImplementedError


def plan_clips(source: Path, shots: list[Shot], rules: ClipRules, root: Path | None = None) -> list[ClipPlan]:
    """The clips of ``source`` that ``rules`` allow in ``shots``, in time order. Probes the source
    (size, frame rate, rotation)."""
    raise NotImplementedError
