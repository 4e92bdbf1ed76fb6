"""Shot detection on long videos with PyAV frames (skeleton; the detector follows)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_THRESHOLD = 0.3


@dataclass(frozen=True)
class Shot:
    """One shot of a source. Shots tile [0, duration) of the source timeline."""

    index: int  # 0-based in the source
    start: float  # seconds on the source timeline (from its first frame), inclusive
    end: float  # seconds, exclusive
    transition: str  # how this shot begins: "start" | "cut" | "dissolve"


def detect_shots(path, *, threshold: float = DEFAULT_THRESHOLD,
                 on_progress: Callable[[float, float], None] | None = None) -> list[Shot]:
    """The shots of the video at ``path``: hard cuts and gradual transitions (fades, dissolves).

    threshold: higher finds fewer cuts. on_progress(seconds_done, duration). Memory is flat in the
    video's length. Raises AdaTPInputError for a file that is not a video; a corrupt region in the
    middle is skipped and detection goes on after it."""
    raise NotImplementedError
