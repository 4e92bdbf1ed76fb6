"""From shots to training clips: lengths, frame counts, sizes and names.

Times are seconds on the source's timeline (from its first frame), so a variable-frame-rate
source is cut by timestamps, never by frame indices: clip frame k is the source frame on
screen at ``start + k / fps``.

Lengths: a clip of ``n`` frames at ``fps`` counts as ``(n - 1) / fps`` seconds long, the time
from its first frame to its last, as the trainers count (Wan's "81 frames = 5 s" at 16 fps), and
that length lies in [min_seconds, max_seconds]. The clip takes the span [start, start + n / fps]
of the source (its last frame is on screen for 1/fps too), which lies inside its shot, and that
span is the clip's end time in its name and the manifest. So at 16 fps max_seconds 5 gives Wan's
81 frames; HunyuanVideo's 129 frames at 24 fps last (129 - 1) / 24 = 5.333 s, so they need a
max_seconds of 5.34 (with 5 the largest 4k+1 count is 121). A target fps above the source's
repeats source frames (each clip frame is the one on screen).

Within a shot (less ``trim_frames`` at each end) clips follow each other from the shot's
start, each with the largest allowed count that fits what is left and max_seconds; what is
left at the end, shorter than min_seconds, is not used. A shot shorter than min_seconds
gives no clip, or with ``keep_short`` one clip of the largest allowed count that fits it.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdaTPInputError, OptionError
from .shots import Shot

FRAME_RULES = ("4k+1", "8k+1", "any")
_EPS = 1e-6
# Upper bounds (the node's widgets take them too): far above what trainers use (16-30 fps, up to a few
# hundred frames), low enough that a typo (--fps 1e9) cannot plan clips that fill the disk.
MAX_FPS = 240.0
MAX_SECONDS = 600.0
MAX_CLIP_FRAMES = 14_401  # frames in one clip: 600 s at 24 fps, 60 s at 240 fps
MAX_TRIM_FRAMES = 1000
MAX_SIDE = 8192


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

    def __post_init__(self):
        """Each rule checked here, once; OptionError names the rule at fault (the CLI's --option)."""
        def number(name, low, high, integer=False):
            value = getattr(self, name)
            kinds = (int,) if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
                    or not low <= value <= high:
                kind = "a whole number" if integer else "a number"
                raise OptionError(name, f"{name.replace('_', '-')} must be {kind} from {low:g} to {high:g}, "
                                        f"got {value!r}")

        number("min_seconds", 0, MAX_SECONDS)
        number("max_seconds", 0, MAX_SECONDS)
        if not self.max_seconds > 0:
            raise OptionError("max_seconds", f"max-seconds must be above 0, got {self.max_seconds!r}")
        if self.min_seconds > self.max_seconds:
            raise OptionError("min_seconds", f"min-seconds ({self.min_seconds}) is above max-seconds "
                                             f"({self.max_seconds}); no clip could obey both")
        if self.fps is not None:
            number("fps", 0, MAX_FPS)
            if not self.fps > 0:
                raise OptionError("fps", f"fps must be above 0 (or None: the source's rate), got {self.fps!r}")
            check_clip_frames(self.max_seconds, self.fps)
        if self.frames not in FRAME_RULES:
            raise OptionError("clip_frames", f"frames must be one of {FRAME_RULES}, got {self.frames!r}")
        number("trim_frames", 0, MAX_TRIM_FRAMES, integer=True)
        number("max_side", 0, MAX_SIDE, integer=True)
        if 0 < self.max_side < 16:
            raise OptionError("max_side", f"max-side must be 0 (keep the size) or at least 16, got {self.max_side}")
        if not isinstance(self.keep_short, bool):
            raise OptionError("keep_short", f"keep-short must be True or False, got {self.keep_short!r}")


def check_clip_frames(max_seconds: float, fps: float) -> None:
    """OptionError when the longest clip (max_seconds at fps) would have more than MAX_CLIP_FRAMES."""
    frames = math.floor(max_seconds * fps + _EPS) + 1
    if frames > MAX_CLIP_FRAMES:
        raise OptionError("max_seconds", f"max-seconds {max_seconds:g} at {fps:g} fps gives clips of up to {frames} "
                                         f"frames; at most {MAX_CLIP_FRAMES} are allowed (trainers take a few "
                                         "hundred): lower max-seconds or fps")


@dataclass(frozen=True)
class ClipPlan:
    """One clip to cut: ``frames`` frames at ``fps`` from ``start`` on the source timeline."""

    source: Path
    shot: int
    index: int  # clip index within the shot
    start: float  # seconds on the source timeline
    frames: int  # frame count at `fps`, obeying the rules ((frames - 1) / fps seconds, first frame to last)
    fps: float
    width: int
    height: int
    name: str  # deterministic file stem: source key, shot, time range; no extension

    @property
    def end(self) -> float:
        """The end of the span the clip takes from the source (its last frame shown for 1/fps)."""
        return self.start + self.frames / self.fps


def snap(n: int, frames: str) -> int:
    """The largest count <= n that ``frames`` allows (0 when none)."""
    if n < 1:
        return 0
    step = {"4k+1": 4, "8k+1": 8}.get(frames, 1)
    return n - (n - 1) % step


def clip_size(width: int, height: int, rotation: int, max_side: int) -> tuple[int, int]:
    """The clips' (width, height): as displayed (a 90 or 270 degree rotation swaps the sides),
    the long side capped at max_side with the aspect kept, both even (yuv420p needs that)."""
    if rotation % 180 == 90:
        width, height = height, width
    if max_side and max(width, height) > max_side:
        scale = max_side / max(width, height)
        width, height = round(width * scale / 2) * 2, round(height * scale / 2) * 2
    else:  # an odd side loses one pixel (scaled, not cropped)
        width, height = width // 2 * 2, height // 2 * 2
    return max(2, width), max(2, height)


def display_rotation(path) -> int:
    """The rotation (degrees counterclockwise, 0/90/180/270) a player applies to the video's frames,
    from its first frame's display matrix (0 when none or unreadable)."""
    import av

    from ..video import open_video

    try:
        with open_video(path) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                return int(round((getattr(frame, "rotation", 0) or 0) / 90)) % 4 * 90
    except (av.error.FFmpegError, IndexError, ValueError):
        pass
    return 0


HDR_TRANSFERS = {16: "PQ", 18: "HLG"}  # FFmpeg's color_trc: smpte2084 (PQ), arib-std-b67 (HLG)


def hdr_transfer(path) -> str | None:
    """"PQ" or "HLG" for a source whose video stream says it is HDR, else None (unread: None)."""
    import av

    from ..video import open_video

    try:
        with open_video(path) as container:
            trc = container.streams.video[0].codec_context.color_trc
    except (av.error.FFmpegError, IndexError, ValueError):
        return None
    return HDR_TRANSFERS.get(int(trc or 0))


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def source_key(source: Path) -> str:
    """A deterministic file-name stem for a source: its stem (made safe for file names) and a
    short hash of the file's resolved absolute path, so a file has one key however it was given
    (alone, in a folder, through a link) and two sources with the same stem in different folders
    differ.
    A source moved elsewhere gets a new key (the job's Adoption gives it its old record, clips and
    names, by its content's fingerprint)."""
    source = Path(source).resolve()
    where = source.as_posix()
    stem = _UNSAFE.sub("_", source.stem).strip("._-")[:60] or "video"
    return f"{stem}-{hashlib.sha1(where.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


FINGERPRINT_PART = 1 << 20  # bytes read at the start, the middle and the end of a source


def fingerprint(source: Path) -> str:
    """A cheap content fingerprint of a source: BLAKE2b of its size and 1 MiB at its start, its
    middle and its end (the whole file when smaller than 3 MiB). It tells the same footage however
    it was moved, renamed or touched, and other footage of the same size and time (``cp -p``),
    reading 3 MiB of a multi-GB source, not all of it."""
    digest = hashlib.blake2b(digest_size=16)
    with open(source, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        digest.update(size.to_bytes(8, "little"))
        if size <= 3 * FINGERPRINT_PART:
            digest.update(f.read())
        else:
            for at in (0, (size - FINGERPRINT_PART) // 2, size - FINGERPRINT_PART):
                f.seek(at)
                digest.update(f.read(FINGERPRINT_PART))
    return digest.hexdigest()


def clip_name(key: str, shot: int, start: float, end: float) -> str:
    """``KEY_s0003_12.500-17.563``: the source key, the shot and the time range (ms)."""
    return f"{key}_s{shot:04d}_{start:.3f}-{end:.3f}"


def shot_clips(shot: Shot, fps: float, rules: ClipRules) -> list[tuple[float, int]]:
    """(start, frames) of the clips ``rules`` take from ``shot`` at ``fps``."""
    start = shot.start + rules.trim_frames / fps
    end = shot.end - rules.trim_frames / fps
    # frames whose whole time [start + k/fps, start + (k+1)/fps) lies inside the shot
    available = max(0, math.floor((end - start) * fps + _EPS))
    # a clip of n frames lasts (n - 1) / fps, first frame to last
    least = math.ceil(rules.min_seconds * fps - _EPS) + 1
    most = snap(int(math.floor(rules.max_seconds * fps + _EPS)) + 1, rules.frames)
    if available < least:
        n = snap(min(available, most), rules.frames)
        return [(start, n)] if rules.keep_short and n >= 1 else []
    out = []
    while True:
        n = snap(min(available, most), rules.frames)
        if n < least or n < 1:
            break
        out.append((start, n))
        start += n / fps
        available -= n
    return out


def plan_clips(source: Path, shots: list[Shot], rules: ClipRules) -> list[ClipPlan]:
    """The clips of ``source`` that ``rules`` allow in ``shots``, in time order. Probes the source
    (size, frame rate, rotation); raises AdaTPInputError for a source that is not a video (ClipRules
    checked the rules)."""
    from ..video import probe_video

    source = Path(source)
    probe = probe_video(source)
    fps = float(rules.fps) if rules.fps is not None else probe.fps
    if not (math.isfinite(fps) and fps > 0):
        raise AdaTPInputError(f"{source.name} has no frame rate; give the clips one (fps)")
    if fps > MAX_FPS:
        raise AdaTPInputError(f"{source.name} says its frame rate is {fps:g} fps, above {MAX_FPS:g}; give the clips "
                              "a frame rate (fps)")
    try:
        check_clip_frames(rules.max_seconds, fps)
    except OptionError as exc:
        raise AdaTPInputError(f"{source.name} at its own {fps:g} fps: {exc}") from None
    width, height = clip_size(probe.width, probe.height, display_rotation(source), rules.max_side)
    key = source_key(source)
    plans = []
    for shot in sorted(shots, key=lambda s: s.start):
        for i, (start, n) in enumerate(shot_clips(shot, fps, rules)):
            start = round(start, 6)
            plans.append(ClipPlan(source=source, shot=shot.index, index=i, start=start, frames=n, fps=fps,
                                  width=width, height=height, name=clip_name(key, shot.index, start, start + n / fps)))
    return plans
