"""Shot detection on long videos: hard cuts and gradual transitions (fades, dissolves).

Detection runs on PyAV frames: each source is decoded once (``thread_type`` AUTO), and the
frames analysed (at most ANALYSIS_FPS a second; the others are decoded but never
converted) are scaled straight from the decoder into a tiny RGB image
(ANALYSIS_SIDE pixels on the long side). Only a window of the last ``GRADUAL_WINDOW``
seconds of those tiny frames is kept, so memory does not grow with the video's length.

Each analysed frame is described by its colour histogram (HIST_BINS bins per RGB channel)
and its tiny image. The distance between two frames is the mean of the histograms' total
variation distance and the images' mean absolute difference (both 0 to 1):

* a **hard cut** is a frame whose distance to the frame before is at least ``threshold``
  and at least CUT_RATIO times the median of that distance over the frames around it
  (CUT_CONTEXT seconds: motion raises that median, so fast motion does not read as cuts,
  nor does a fade, whose every frame differs from the one before), and whose picture
  FLASH_SECONDS later is not back to the one FLASH_SECONDS before it (a flash is not a cut);
* a **gradual transition** (dissolve, fade through black) changes little from one frame to
  the next, so each frame is also compared with the frame GRADUAL_WINDOW seconds before
  it, both with their exposure evened out (a change of light is not a change of shot; a
  black frame stays black, so a fade through black still counts). That distance rises above ``threshold`` as the transition starts and falls back (below
  GRADUAL_LOW times the threshold: a fade's dark middle would otherwise split it in two)
  GRADUAL_WINDOW seconds after it ends; the middle of that rise, less half the window, is
  the middle of the transition, where the new shot begins. A rise that a hard cut
  explains is not counted twice. Two gradual transitions are told apart when the shot
  between them lasts longer than GRADUAL_WINDOW plus their lengths; closer ones make one
  boundary between them.

Why PyAV and not PySceneDetect: PySceneDetect (``scenedetect``) needs OpenCV, and a
ComfyUI venv that gets a second OpenCV variant (``opencv-python`` beside
``opencv-contrib-python`` or ``-headless``) can no longer ``import cv2``. Both were measured
on the same synthetic videos with known cut times (bench/shots.py; bench/RESULTS.md, "Issue
29"): 90 transitions with slow and fast camera motion, and flashes. Recall of cuts / dissolves /
fades and precision: this detector 1.00 / 0.97 / 1.00, 0.99; PySceneDetect 0.7.2 at its
defaults: content 0.53 / 0.17 / 0.50, 0.49; adaptive 0.33 / 0.00 / 0.00, 0.56; histogram
0.90 / 0.10 / 1.00, 0.49 (the set was made by the same hand as this detector: optimistic for
it). Speed on 720p is about the same (21 source seconds a second here, 19-27 for
PySceneDetect). So the pack detects on PyAV frames and needs no new dependency.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..caption.files import printable
from ..errors import AdaTPInputError, OptionError

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.3
ANALYSIS_FPS = 30.0  # frames analysed a second at most (a faster source has frames skipped)
ANALYSIS_SIDE = 64  # pixels on the long side of an analysed frame
HIST_BINS = 16  # histogram bins per RGB channel
EVEN_MEAN = 110.0  # gradual transitions compare frames scaled to this mean level (0-255)
BLACK_MEAN = 8.0  # a frame darker than this on average is black (not scaled)
CUT_RATIO = 3.0  # a cut's distance is at least this many times the median distance around it
CUT_CONTEXT = 1.0  # seconds of frame-to-frame distances (centred on the frame) that make that median
GRADUAL_WINDOW = 1.0  # seconds between the frames compared for gradual transitions
GRADUAL_LOW = 0.5  # a rise ends when the windowed distance falls below this fraction of the threshold
FLASH_SECONDS = 0.25  # a change undone this soon after (a flash) is not a cut
MIN_SHOT = 0.5  # seconds: a change sooner than this after the last one is not a new shot
PROGRESS_EVERY = 2.0  # source seconds between on_progress calls
_EPS = 1e-6


@dataclass(frozen=True)
class Shot:
    """One shot of a source. Shots tile [0, duration) of the source timeline."""

    index: int  # 0-based in the source
    start: float  # seconds on the source timeline (from its first frame), inclusive
    end: float  # seconds, exclusive
    transition: str  # how this shot begins: "start" | "cut" | "dissolve"


def analysis_size(width: int, height: int) -> tuple[int, int]:
    scale = ANALYSIS_SIDE / max(width, height, 1)
    return max(8, round(width * scale)), max(8, round(height * scale))


class Features:
    """What is kept of one analysed frame: its time, and its colour histogram and tiny image as
    they are and with the exposure evened out (scaled to a mean of EVEN_MEAN; a black frame
    stays black)."""

    __slots__ = ("time", "hist", "image", "even_hist", "even_image")

    def __init__(self, time: float, rgb: np.ndarray):
        self.time = time
        self.image, self.hist = self._describe(rgb)
        mean = float(rgb.mean())
        if mean >= BLACK_MEAN:
            rgb = np.clip(rgb.astype(np.float32) * (EVEN_MEAN / mean), 0, 255).astype(np.uint8)
        self.even_image, self.even_hist = self._describe(rgb)

    @staticmethod
    def _describe(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        flat = (rgb.reshape(-1, 3) // (256 // HIST_BINS)).astype(np.int64)
        counts = np.stack([np.bincount(flat[:, c], minlength=HIST_BINS) for c in range(3)])
        return rgb.astype(np.float32) / 255.0, counts.astype(np.float32) / flat.shape[0]

    def distance(self, other: Features, even: bool = False) -> float:
        """0 (the same picture) to 1; ``even``: with the exposure evened out, so a change of light
        (a lamp, the camera's exposure) does not count, but a fade to black still does."""
        a, b = (self.even_hist, other.even_hist) if even else (self.hist, other.hist)
        x, y = (self.even_image, other.even_image) if even else (self.image, other.image)
        return 0.5 * (0.5 * float(np.abs(a - b).sum()) / 3.0 + float(np.abs(x - y).mean()))


class Detector:
    """The streaming decision rules (see the module docstring), fed one analysed frame at a time."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.window: deque[Features] = deque()  # the last GRADUAL_WINDOW seconds of frames
        self.recent: deque[tuple[float, float]] = deque()  # (time, distance to the frame before)
        self.changes: list[tuple[float, str]] = []  # (time a shot begins, how)
        self.cuts: list[float] = []
        self.decided = -math.inf  # frames up to this time have had their hard-cut decision
        self.rise: list[float] | None = None  # [first time, last time] while the windowed distance is high

    def feed(self, f: Features) -> None:
        if self.window:
            self._hard(f, f.distance(self.window[-1]))
        while self.window and self.window[0].time < f.time - GRADUAL_WINDOW - _EPS:
            old = self.window.popleft()
            self._gradual(f, f.distance(old, even=True) if f.time - old.time <= GRADUAL_WINDOW + 0.5 else 0.0)
        self.window.append(f)

    def _hard(self, f: Features | None, d: float) -> None:
        """Record this frame's distance to the one before; decide on the frames CUT_CONTEXT/2
        seconds old, whose neighbours on both sides are known now (all that is left when f is None)."""
        half = CUT_CONTEXT / 2
        if f is not None:
            self.recent.append((f.time, d))
        now = self.recent[-1][0] if self.recent else 0.0
        while self.recent and self.recent[0][0] < now - 2 * half - _EPS:
            self.recent.popleft()
        for t, x in self.recent:
            if t <= self.decided or (f is not None and t > now - half):
                continue
            self.decided = t
            others = [y for u, y in self.recent if u != t and abs(u - t) <= half + _EPS]
            level = float(np.median(others)) if others else 0.0
            if x >= self.threshold and x >= CUT_RATIO * level and not self._transient(t, x):
                self.cuts.append(t)
                self._add(t, "cut")

    def _transient(self, t: float, jump: float) -> bool:
        """Whether the picture FLASH_SECONDS after t is back to the one FLASH_SECONDS before it (a
        flash, a frame or two of something passing in front): nearer each other than half the
        ``jump`` at t. A change, but not of shot."""
        before = after = None
        for w in self.window:
            if w.time <= t - FLASH_SECONDS + _EPS or before is None:
                before = w
            if w.time >= t + FLASH_SECONDS - _EPS:
                after = w
                break
        return (before is not None and after is not None and before.time < t
                and before.distance(after) < jump / 2)

    def _gradual(self, f: Features, d: float) -> None:
        if d >= (self.threshold if self.rise is None else self.threshold * GRADUAL_LOW):
            self.rise = [f.time, f.time] if self.rise is None else [self.rise[0], f.time]
            return
        if self.rise is None:
            return
        first, last = self.rise
        self.rise = None
        if last - first < GRADUAL_WINDOW / 3:  # a blip, not a transition
            return
        if any(first - 0.25 <= c <= last for c in self.cuts):  # the window passing over a hard cut
            return
        self._add((first + last) / 2 - GRADUAL_WINDOW / 2, "dissolve")

    def finish(self) -> None:
        self._hard(None, 0.0)
        if self.rise is not None:  # the video ends while the windowed distance is still high
            self._gradual(None, 0.0)

    def move_cut(self, t: float, to: float) -> None:
        """Place the cut found at ``t`` at ``to`` instead (a frame between two analysed ones)."""
        if to == t:
            return
        self.cuts = [to if c == t else c for c in self.cuts]
        self.changes = [(to, how) if (when == t and how == "cut") else (when, how) for when, how in self.changes]

    def _add(self, t: float, kind: str) -> None:
        if t < MIN_SHOT:
            return
        for k, (when, how) in enumerate(self.changes):
            if abs(when - t) < MIN_SHOT:
                if how != "cut" and kind == "cut":  # a cut is placed more exactly than a rise
                    self.changes[k] = (t, kind)
                return
        self.changes.append((t, kind))


def _place_cuts(detector: Detector, found: int, skipped: deque | None) -> None:
    """Move each cut the detector found since ``found`` (on an analysed frame) to the frame, among the
    skipped ones since the analysed frame before it, where the picture jumps most. A cut is decided
    CUT_CONTEXT / 2 after its frame, so it and the frame before it are still in the detector's
    GRADUAL_WINDOW of analysed frames."""
    if not skipped:
        return
    for t in detector.cuts[found:]:
        before = [f for f in detector.window if f.time < t - _EPS]
        at = next((f for f in detector.window if abs(f.time - t) <= _EPS), None)
        if not before or at is None:
            continue
        prev = before[-1]
        chain = [prev] + [Features(u, rgb) for u, rgb in skipped if prev.time + _EPS < u < t - _EPS] + [at]
        jumps = [chain[i + 1].distance(chain[i]) for i in range(len(chain) - 1)]
        detector.move_cut(t, chain[max(range(len(jumps)), key=jumps.__getitem__) + 1].time)


def check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
            math.isfinite(threshold) and 0 < threshold <= 1):
        raise OptionError("threshold", f"the shot threshold must be a number above 0 and at most 1 (the distance "
                                       f"between two frames that counts as a change of shot; {DEFAULT_THRESHOLD} by "
                                       f"default), got {threshold!r}")
    return float(threshold)


def source_events(container, video, audio=None, start_time: float = 0.0, since: float = 0.0):
    """The decoded frames of ``video`` in time order, and what interrupted them, decoding packet by
    packet so that damage costs only what it touches: yields ("frame", t, frame), ("lost", t, why)
    for a damaged packet or a frame decoded on one (up to the next keyframe), ("audio", t, packet)
    for ``audio``'s packets, and ("end", t, why) when the container cannot be read on. t: seconds
    from the first frame (``start_time``); ``since`` > 0 seeks to the keyframe before it first."""
    import av

    if since > 0:
        container.seek(int((since + start_time) / video.time_base), stream=video, backward=True, any_frame=False)
    packets = container.demux(*([video] + ([audio] if audio is not None else [])))
    built_on_loss = False
    last = since
    while True:
        try:
            packet = next(packets, None)
        except av.error.FFmpegError as exc:
            yield "end", last, f"the source cannot be read on after {last:.2f} s ({exc})"
            return
        if packet is None:
            return
        if packet.stream.type == "audio":
            if packet.pts is not None and packet.size:
                yield "audio", float(packet.pts * packet.time_base) - start_time, packet
            continue
        try:
            frames = packet.decode()
        except av.error.FFmpegError as exc:
            built_on_loss = True
            yield "lost", last, f"damaged data near {last:.2f} s ({exc})"
            continue
        for frame in frames:
            if frame.key_frame:
                built_on_loss = False
            if frame.time is None:
                continue
            t = frame.time - start_time
            if built_on_loss or frame.is_corrupt:
                yield "lost", t, f"damaged data near {t:.2f} s"
                continue
            last = t
            yield "frame", t, frame


def analysed_frames(path, probe, on_progress: Callable[[float, float], None] | None = None,
                    skipped: deque | None = None):
    """Yield (time from the first frame, tiny RGB uint8 [h, w, 3]) of the frames to analyse:
    at most ANALYSIS_FPS a second. Damaged packets and the frames decoded on them (up to the
    next keyframe) are skipped; detection goes on after them. ``skipped``: the frames left out
    between two analysed ones are appended to it as (time, tiny RGB) before the next analysed
    frame is yielded (the caller trims it), so a cut can be placed on one of them."""
    import av
    from av.video.reformatter import VideoReformatter

    from ..video import open_video

    name = printable(Path(path).name)
    size = analysis_size(probe.width, probe.height)
    scaler = VideoReformatter()  # one for all frames: a new one per frame costs ten times the scaling

    def tiny(frame):
        return scaler.reformat(frame, width=size[0], height=size[1], format="rgb24", interpolation="AREA").to_ndarray()
    step = 1.0 / ANALYSIS_FPS
    next_t = -math.inf
    next_report = PROGRESS_EVERY
    damage = []
    try:
        container = open_video(path)
    except av.error.FFmpegError as exc:
        raise AdaTPInputError(f"{name} cannot be opened as a video ({exc}); re-export it as MP4 (H.264).") from exc
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for kind, t, item in source_events(container, stream, start_time=probe.start_time):
            if kind != "frame":
                damage.append(item)
                continue
            if t < next_t - _EPS:
                if skipped is not None:
                    skipped.append((t, tiny(item)))
                continue
            next_t = max(next_t + step, t + step / 2) if math.isfinite(next_t) else t + step
            yield t, tiny(item)
            if on_progress is not None and t >= next_report:
                next_report = t + PROGRESS_EVERY
                on_progress(min(t, probe.duration), probe.duration)
    if damage:
        log.warning("%s: %d damaged stretch(es) skipped while finding shots (the first: %s)", name, len(damage),
                    damage[0])


def detect_shots(path, *, threshold: float = DEFAULT_THRESHOLD,
                 on_progress: Callable[[float, float], None] | None = None) -> list[Shot]:
    """The shots of the video at ``path``: hard cuts and gradual transitions (fades, dissolves).

    threshold: the distance between two frames (0 to 1; DEFAULT_THRESHOLD) that counts as a change
    of shot; higher finds fewer. on_progress(seconds_done, duration). Memory is flat in the video's
    length. Raises AdaTPInputError for a file that is not a video, or one where no frame decodes; a
    corrupt region in the middle is skipped and detection goes on after it. A video without a cut
    is one shot."""
    from ..video import DamagedVideo, probe_video

    threshold = check_threshold(threshold)
    probe = probe_video(path)
    detector = Detector(threshold)
    last = None
    # A source faster than ANALYSIS_FPS has frames between the analysed ones: a cut found on an analysed
    # frame may have happened on one of them, and its shot would end with a frame of the next. Their tiny
    # pictures of the last few seconds are kept (a few KB each) to place each cut where the picture jumps.
    skipped: deque | None = deque() if probe.fps > ANALYSIS_FPS + _EPS else None
    for last, rgb in analysed_frames(path, probe, on_progress, skipped):
        found = len(detector.cuts)
        detector.feed(Features(last, rgb))
        _place_cuts(detector, found, skipped)
        while skipped and skipped[0][0] < last - 2 * CUT_CONTEXT:
            skipped.popleft()
    if last is None:
        raise DamagedVideo(f"{Path(path).name}: no frame of it decodes (the file is corrupt or cut short); "
                           "re-export it from the original.")
    found = len(detector.cuts)
    detector.finish()
    _place_cuts(detector, found, skipped)
    duration = last + 1.0 / probe.fps  # the last frame stays on screen for one frame
    if on_progress is not None:
        on_progress(duration, duration)
    changes = sorted((t, kind) for t, kind in detector.changes if t < duration - _EPS)
    starts = [(0.0, "start")] + changes
    return [Shot(i, round(s, 6), round(starts[i + 1][0] if i + 1 < len(starts) else duration, 6), kind)
            for i, (s, kind) in enumerate(starts)]
