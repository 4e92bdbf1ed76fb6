"""Video input: probe, choose sample times, decode only the sampled frames.

decord is the first backend and PyAV the fallback (ComfyUI ships PyAV). A file
is always probed with PyAV first: that catches files that are not videos before
any decoder that could abort the process sees them. Sampling works on
timestamps, so variable-frame-rate videos are sampled evenly in time, and the
returned timestamps are monotonic. Frames are resized while decoding (longest
side at most ``max_side``), so a 4K video never exists at full size in memory.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .budget import MemoryEstimate, check_memory, frames_bytes
from .errors import AdaTPEnvironmentError, AdaTPInputError, AdaTPInterrupted
from .report import substituted_text

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ProcessorSampling:
    """How a model's video processor samples a video (transformers' Qwen3-VL ``sample_frames``):
    ``fps`` frames a second of the clip, at least ``min_frames`` and at most ``max_frames`` (and never
    more than the clip has), spread evenly from its first frame to its last."""

    fps: float
    min_frames: int
    max_frames: int

    def __post_init__(self):
        if not (math.isfinite(self.fps) and self.fps > 0) or not 1 <= self.min_frames <= self.max_frames:
            raise AdaTPInputError(f"a video processor's sampling needs fps > 0 and 1 <= min_frames <= max_frames, "
                                  f"got {self}")

    @property
    def label(self) -> str:
        return f"{self.fps:g} fps, {self.min_frames}-{self.max_frames} frames"


# The Qwen3-VL video processor's defaults (transformers 5.25), which Qwen3-VL, Qwen3.5 and Qwen3.6 ship:
# Load Video offers them by name, since it cannot know the model.
QWEN_VL_SAMPLING = ProcessorSampling(fps=2.0, min_frames=4, max_frames=768)
QWEN_VL_PRESET = f"Qwen-VL default: {QWEN_VL_SAMPLING.label}"
PRESETS = {QWEN_VL_PRESET: QWEN_VL_SAMPLING}
SAMPLING_MODES = ("uniform", "fps", *PRESETS)
BACKENDS = ("auto", "decord", "pyav")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".gif", ".wmv", ".flv")
_EPS = 1e-6
_WORKER = Path(__file__).resolve().parent / "decode_worker.py"
# An absolute cap on the frames one run samples, against hostile input (a widget or a file that asks
# for millions): 4.5 hours at 1 frame a second. The limit a run meets first is memory: the run's peak
# is estimated before anything is decoded (attention.check_video_fits, budget.run_memory).
MAX_FRAMES = 16384
DECODE_MAX_SIDE = 1024  # frames are decoded at up to this many pixels on the longer side (plan_sampling)
DECODE_TIMEOUT = 300.0  # seconds before a stuck decoder child is killed
# Containers that hold a still image, not a video (an image renamed .mp4).
IMAGE_FORMATS = ("image2", "png_pipe", "jpeg_pipe", "bmp_pipe", "webp_pipe", "gif_pipe", "tiff_pipe",
                 "ppm_pipe", "pgm_pipe", "svg_pipe", "j2k_pipe", "qoi_pipe", "dpx_pipe", "exr_pipe")
# FFmpeg demuxers that read one self-contained file. Demuxers that open other files or URLs named
# inside the file (hls, dash, concat, imf, sdp...) or sequences of files (image2) are never on it:
# PyAV opens with this list as FFmpeg's format_whitelist, and decord only sees a file after that probe.
CONTAINER_FORMATS = ("mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi", "mpegts", "mpeg",
                     "gif", "asf", "flv")
# Raster still-image pipes may be opened only to say "a still image" (they read the one file).
# mov's external references (drefs) stay off, FFmpeg's default.
_OPENABLE_FORMATS = CONTAINER_FORMATS + tuple(f for f in IMAGE_FORMATS if f not in ("image2", "svg_pipe"))
# Probe-time limits, checked before any frame is decoded (docs/ROBUSTNESS.md).
MAX_DURATION = 24 * 3600.0  # seconds
MAX_FRAME_COUNT = 24 * 3600 * 240  # a day at 240 fps
MAX_PIXELS = 8192 * 4320  # width x height of one frame (DCI 8K)
MAX_SIDE = 8192  # pixels, the longer side
_SNIFF_BYTES = 4096


class DamagedVideo(AdaTPInputError):
    """A clip that decodes only in part: too few of its sampled frames at their own times (check_damage),
    or none at all."""


@dataclass(frozen=True)
class VideoProbe:
    """What the container says about its first video stream."""

    fps: float
    duration: float  # seconds
    frame_count: int  # best estimate
    width: int
    height: int
    codec: str
    start_time: float  # pts of the first frame, seconds


@dataclass(frozen=True)
class VideoInfo:
    """The ADATP_VIDEO_INFO socket: where the frames came from."""

    path: str
    fps: float
    duration: float
    frame_count: int
    width: int
    height: int
    timestamps: tuple[float, ...]  # of the returned frames, seconds, non-decreasing
    backend: str
    frames_decoded: int | None = None  # how many frames the decoder decoded (None: not known)
    # How many of the returned frames are the ones on screen at their sample times (None: not known,
    # frames from another loader), and which are not: (index, the time wanted in seconds).
    frames_own_time: int | None = None
    frames_substituted: tuple[tuple[int, float], ...] = ()


def open_container(path, mode: str = "r", **kwargs):
    """``av.open(path, mode)`` that tolerates badly encoded metadata on every PyAV from 12 on.

    PyAV 12-18 decode (and encode) metadata tags strictly unless told otherwise
    through ``metadata_errors``; a single Latin-1 title then makes the whole file
    unreadable. PyAV 19 removed that keyword and always uses ``surrogateescape``.
    Rather than guess from version numbers, the keyword is offered and dropped
    when this PyAV refuses it.
    """
    import av

    try:
        return av.open(path, mode, metadata_errors="surrogateescape", **kwargs)
    except TypeError as exc:
        if "metadata_errors" not in str(exc):
            raise
    return av.open(path, mode, **kwargs)


def open_video(path):
    """Open a video for reading with only ``CONTAINER_FORMATS`` (and still-image pipes)
    allowed: FFmpeg refuses any other demuxer before it reads a header, so a playlist
    never opens the files it names. No frame larger than MAX_PIXELS is decoded.
    Raises av.error.FFmpegError as av.open does."""
    # max_pixels: the decoders that FFmpeg runs while probing refuse a larger frame, so an
    # 8192x8192 file is refused by check_limits from its header, without decoding a full frame.
    return open_container(str(path), container_options={"format_whitelist": ",".join(_OPENABLE_FORMATS)},
                          options={"max_pixels": str(MAX_PIXELS)})


def names_other_files(head: bytes) -> bool:
    """True when a file's first bytes would let some FFmpeg (decord bundles its own, older one)
    probe it as a demuxer that opens files or URLs named inside it: hls (#EXTM3U at the start),
    concat (ffconcat), sdp (a "c=IN IP" line), dash and imf (XML), all read as text up to the
    first NUL byte, after an ID3v2 tag, which FFmpeg skips when it probes."""
    if head.startswith(b"ID3"):  # no video container starts with an ID3 tag; FFmpeg probes what follows
        return True
    text = head.split(b"\x00", 1)[0].removeprefix(b"\xef\xbb\xbf")
    lower = text.lower()
    return (text.startswith((b"#EXTM3U", b"ffconcat")) or b"<mpd" in lower or b"<compositionplaylist" in lower
            or any(line.lstrip().startswith(b"c=in ip") for line in lower.splitlines()))


def check_video_file(path) -> None:
    """What the pack accepts before FFmpeg sees a file: one of VIDEO_EXTENSIONS, and
    not a text file (playlists, concat lists, DASH or IMF manifests and SDP files are
    text that names other files or URLs). Raises AdaTPInputError."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_EXTENSIONS:
        raise AdaTPInputError(f"{path.name} is not a video file the pack reads (extensions: "
                              f"{', '.join(VIDEO_EXTENSIONS)}); re-export it as MP4 (H.264).")
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as exc:
        raise AdaTPInputError(f"video {path.name} cannot be opened ({exc.strerror or exc}); check the file.") from exc
    if names_other_files(head):
        raise AdaTPInputError(f"{path.name} starts as a playlist or manifest that names other files (HLS, "
                              "concat, SDP, DASH), not a video; only self-contained video files are read.")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        if len(head) < _SNIFF_BYTES:
            return
        try:  # a multi-byte character cut at the end of the sample
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return
    if head and all(c.isprintable() or c in "\t\r\n" for c in text):
        raise AdaTPInputError(f"{path.name} is a text file (a playlist or a list of files?), it cannot be read "
                              "as a video; only self-contained video files are read. Re-export it as MP4 (H.264).")


def check_container(format_name: str, name: str) -> None:
    """Refuse a probed container whose FFmpeg demuxer is not in CONTAINER_FORMATS."""
    formats = set((format_name or "").split(","))
    if formats & set(IMAGE_FORMATS):
        raise AdaTPInputError(f"{name} is a still image, not a video; choose a video file.")
    if not formats & set(CONTAINER_FORMATS):
        raise AdaTPInputError(f"{name} is in the {format_name or 'unknown'} format, which the pack does not read "
                              f"(playlists and manifests are refused); re-export it as MP4 (H.264).")


def check_limits(probe: VideoProbe, name: str) -> None:
    """Refuse a probe beyond the documented limits (duration, frame count, frame size, first
    timestamp) before anything is decoded or any sample time is computed."""
    if not all(math.isfinite(v) for v in (probe.fps, probe.duration, probe.start_time)):
        raise AdaTPInputError(f"{name}: its frame rate, duration or start time is not a number; re-export it.")
    if probe.duration > MAX_DURATION or abs(probe.start_time) > MAX_DURATION:
        raise AdaTPInputError(
            f"{name} says it lasts {probe.duration:.0f} s (starting at {probe.start_time:.0f} s), longer than the "
            f"pack's limit of {MAX_DURATION:.0f} s; cut it into shorter clips or re-export it (its timestamps may "
            "be damaged).")
    if probe.frame_count > MAX_FRAME_COUNT:
        raise AdaTPInputError(f"{name} says it has {probe.frame_count} frames, more than the pack's limit of "
                              f"{MAX_FRAME_COUNT}; cut it into shorter clips.")
    if max(probe.width, probe.height) > MAX_SIDE or probe.width * probe.height > MAX_PIXELS:
        raise AdaTPInputError(
            f"{name} is {probe.width}x{probe.height}, larger than the pack's limit ({MAX_SIDE} px a side, "
            f"{MAX_PIXELS} pixels a frame); scale it down (to 1920x1080 for example) before loading it.")


def probe_video(path) -> VideoProbe:
    """Open ``path`` with PyAV and describe its first video stream.

    Raises AdaTPInputError for anything that is not a readable video.
    """
    import av

    path = Path(path)
    if path.is_dir():
        raise AdaTPInputError(f"video {path} is a folder; give a video file (to caption a folder of clips, "
                              "use the caption command or Caption Folder).")
    if not path.is_file():
        raise AdaTPInputError(f"video {path} does not exist; check the file name.")
    if path.stat().st_size == 0:
        raise AdaTPInputError(f"video {path.name} is empty (0 bytes); copy the file again.")
    check_video_file(path)
    try:
        with open_video(path) as container:
            check_container(container.format.name, path.name)
            if not container.streams.video:
                raise AdaTPInputError(f"{path.name} has no video stream (audio or data only); choose a video file.")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            if ctx is None or not ctx.name or ctx.name == "none":
                tag = getattr(stream.codec_context, "codec_tag", "") if ctx is not None else ""
                raise AdaTPInputError(
                    f"{path.name} uses a video codec that this FFmpeg cannot decode ({tag or 'unknown'}); "
                    "re-export it as MP4 (H.264).")
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            if stream.duration is not None and stream.time_base:  # PyAV 19: AVRational(0, 1) when unset
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
            else:
                duration = 0.0
            start = float(stream.start_time * stream.time_base) if stream.start_time is not None and stream.time_base else 0.0
            count = int(stream.frames or 0) or int(round(duration * fps))
            probe = VideoProbe(fps=fps, duration=duration, frame_count=count, width=int(ctx.width or 0),
                               height=int(ctx.height or 0), codec=ctx.name or "?", start_time=start)
    except AdaTPInputError:
        raise
    except av.error.ArgumentError as exc:  # EINVAL at open: FFmpeg's format_whitelist refused the demuxer
        raise AdaTPInputError(
            f"{path.name} cannot be read as a video: its format is not one the pack reads (mp4, mov, mkv, webm, "
            f"avi, mpeg-ts, mpeg, gif, wmv, flv; playlists and manifests are refused) ({exc}). "
            "Re-export it as MP4 (H.264).") from exc
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise AdaTPInputError(
            f"{path.name} cannot be read as a video ({exc.__class__.__name__}: {exc}); it may be "
            "truncated or not a video. Re-export it as MP4 (H.264).") from exc
    if probe.width <= 0 or probe.height <= 0:
        raise AdaTPInputError(f"{path.name}: the video stream has no frame size; re-export it as MP4 (H.264).")
    if probe.fps <= 0 or probe.duration <= 0:
        raise AdaTPInputError(f"{path.name}: no frame rate or duration could be read; re-export it as MP4 (H.264).")
    check_limits(probe, path.name)
    return probe


def sample_times(probe: VideoProbe, num_frames: int = 32, sampling: str = "uniform", fps: float = 1.0,
                 start_time: float = 0.0, end_time: float = 0.0) -> list[float]:
    """Times (seconds from the first frame) of the frames to decode, ascending.

    uniform: ``num_frames`` evenly spaced frames over [start, end] (LLaVA-OV's
        sampling: first and last frame included). If the clip has fewer frames,
        every frame is taken once (documented clamp).
    fps: one frame every 1/fps seconds from start; ``num_frames`` caps the count
        (evenly thinned when more would be taken); 0: no cap but MAX_FRAMES, so fps=1 with
        num_frames=0 is one frame a second for the whole video.
    a ProcessorSampling, or a preset's name (PRESETS): as the model's video processor samples,
        ``num_frames`` not used: int(seconds x its fps) frames, within its min and max frames and
        the frames there are, spread as uniform spreads them (transformers' ``sample_frames``).
    end_time 0 means the end of the video.
    """
    sampling = PRESETS.get(sampling, sampling) if isinstance(sampling, str) else sampling
    if not isinstance(sampling, ProcessorSampling) and sampling not in SAMPLING_MODES:
        raise AdaTPInputError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
    lowest = 0 if sampling == "fps" else 1  # fps with 0 frames: every 1/fps seconds of the span, up to MAX_FRAMES
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not lowest <= num_frames <= MAX_FRAMES:
        whole = " (0 with fps sampling: one frame every 1/fps seconds of the whole video)" if lowest == 0 else ""
        raise AdaTPInputError(f"num_frames must be an integer from {lowest} to {MAX_FRAMES}{whole}, got "
                              f"{num_frames!r} (32 is LLaVA-OneVision's usual count)")
    for name, value in (("start_time", start_time), ("end_time", end_time)):
        if not math.isfinite(value) or value < 0:
            raise AdaTPInputError(f"{name} must be a number of seconds >= 0, got {value}")
    frame = 1.0 / probe.fps
    last_frame_time = max(probe.duration - frame, 0.0)
    end = last_frame_time if end_time <= 0 else min(end_time, last_frame_time)
    if start_time > last_frame_time or (end_time > 0 and start_time >= end_time):
        raise AdaTPInputError(
            f"start_time {start_time}s / end_time {end_time}s select nothing in a {probe.duration:.2f}s video; "
            "set start_time below end_time and inside the video (end_time 0 = until the end).")
    available = int(math.floor((end - start_time) * probe.fps + _EPS)) + 1
    if isinstance(sampling, ProcessorSampling):  # the processor's count, then uniform over the frames there are
        wanted = int(available / probe.fps * sampling.fps)
        num_frames = min(max(wanted, sampling.min_frames), sampling.max_frames, available, MAX_FRAMES)
        sampling = "uniform"
    if sampling == "uniform":
        # Evenly spaced frame indices, rounded (LLaVA-OV's np.linspace(...).round()).
        n = min(num_frames, available)
        first = math.ceil(start_time * probe.fps - _EPS)
        last = first + available - 1
        return [round(i) / probe.fps for i in np.linspace(first, last, n)] if n > 1 else [first / probe.fps]
    if not math.isfinite(fps) or fps <= 0:
        raise AdaTPInputError(f"fps must be > 0 for fps sampling, got {fps}")
    # Only the kept candidates are computed: a file that claims a huge duration costs nothing here.
    count = int(math.floor((end - start_time) * fps + _EPS)) + 1
    if num_frames == 0:  # the whole span at this rate
        if count > MAX_FRAMES:
            raise AdaTPInputError(
                f"{fps:g} frame(s) a second over {end - start_time:.0f} s are {count} frames, more than the pack's "
                f"limit of {MAX_FRAMES}; lower fps, set start_time/end_time, or give num_frames to thin them evenly")
        num_frames = count
    picks = range(count) if count <= num_frames else np.linspace(0, count - 1, num_frames).round().astype(int)
    return [start_time + int(k) / fps for k in picks]


def output_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(w, h) scaled so the longest side is at most max_side (aspect kept)."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _read_exact(stream, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class _WaitBudget:
    """Kills a decoder child once the reader has waited ``budget`` seconds for it in all.

    Only the time spent waiting on the child counts: while a streamed run encodes the frames it
    was given, the child blocks on its pipe and its clock stops. One watcher thread per decode."""

    def __init__(self, budget: float, kill: Callable[[], None]):
        self._left, self._kill, self._since, self._done = budget, kill, None, False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._watch, name="adatp-decode-watchdog", daemon=True)
        self._thread.start()

    def _watch(self):
        with self._cv:
            while not self._done:
                if self._since is None:
                    self._cv.wait()
                    continue
                left = self._left - (time.monotonic() - self._since)
                if left <= 0:
                    self._kill()
                    return
                self._cv.wait(left)

    def waiting(self, on: bool) -> None:
        """Start (on) or stop the clock."""
        with self._cv:
            now = time.monotonic()
            if on:
                self._since = now
            elif self._since is not None:
                self._left -= now - self._since
                self._since = None
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._done = True
            self._cv.notify()
        self._thread.join()


@dataclass
class DecodeReport:
    """What a decode learns as it yields frames (``iter_frames``): each frame's time and whether it is
    the one on screen at its sample time, how many frames the decoder decoded (None: not known) and
    which decoder ran ("decord+pyav" when PyAV took over part way)."""

    stamps: list = field(default_factory=list)
    own: list = field(default_factory=list)
    decoded: int | None = 0
    backend: str = ""


def _decode_decord(path: str, times: list[float], size: tuple[int, int], probe: VideoProbe,
                   on_frame: Callable[[int], None] | None, report: DecodeReport, timeout: float | None = None):
    """decord in a child process (decode_worker.py; see that file for the protocol): yields
    uint8 [h, w, 3] frames as the child writes them, and appends their times to ``report``.

    A crash, a hang (killed once the reader has waited ``timeout`` seconds for it in all) or a
    decord error raises AdaTPEnvironmentError, on which the caller falls back to PyAV. ``on_frame``
    runs after each frame and may raise to stop (the child is killed), as does closing the generator.
    """
    timeout = DECODE_TIMEOUT if timeout is None else timeout
    request = {"path": path, "width": size[0], "height": size[1], "times": list(times),
               "start_time": probe.start_time}
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen([sys.executable, str(_WORKER), json.dumps(request)],
                                stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL)
        watchdog = _WaitBudget(timeout, proc.kill)
        complete = False
        try:
            watchdog.waiting(True)
            header = proc.stdout.readline()
            if header:
                info = json.loads(header)
                h, w, count = info["height"], info["width"], info["count"]
                stamps = info["timestamps"]
                for k in range(count):
                    watchdog.waiting(True)
                    buf = _read_exact(proc.stdout, h * w * 3)
                    watchdog.waiting(False)
                    if buf is None:
                        break
                    report.stamps.append(stamps[k])
                    report.own.append(True)
                    yield np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3)
                    if on_frame is not None:
                        on_frame(k)
                else:
                    watchdog.waiting(True)
                    complete = not proc.stdout.read(1)  # more bytes than the frames: not our layout
            if not complete:
                proc.kill()
            code = proc.wait(timeout=timeout)
        finally:
            watchdog.stop()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if not complete or code != 0:
            errors.seek(0)
            detail = errors.read().decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
            how = "was killed (crash or timeout)" if code < 0 else f"exited with status {code}"
            raise AdaTPEnvironmentError(f"the decord decoder {how}: {detail[0]}")
    report.decoded = None


def _decode_pyav(path: str, times: list[float], size: tuple[int, int], probe: VideoProbe,
                 on_frame: Callable[[int], None] | None, report: DecodeReport, seek_gap: float = 2.0):
    """For each target time, the frame on screen at that time, and whether it is that frame:
    yields uint8 [h, w, 3] frames in order, and appends their times and whether each is its own to
    ``report`` (and the count of frames decoded, in ``report.decoded``).

    Seeks when the next target lies further ahead than the longest keyframe
    interval seen so far (``seek_gap`` seconds until one is seen), else decodes
    on: work follows the number of sampled frames, not the video's length.
    Packets are decoded one at a time: a damaged packet is skipped (its frame is
    lost), and the frames decoded after it up to the next keyframe are not used
    (they are built on the lost one). A target whose frame was lost gets the last
    good frame before it (or, before the first good frame, that first one; those
    targets are held until it comes) and counts as not at its own time.
    """
    import av

    name = Path(path).name
    decoded = 0
    gop = None  # longest keyframe interval observed (seconds), None until one is seen
    lost: list[float] = []  # times of frames that could not be used (damaged packets, frames built on them)
    damage = {"packets": 0, "frames": 0, "first": None}

    def note_loss(t: float, exc: Exception | None = None) -> None:
        lost.append(t)
        if exc is None:
            damage["frames"] += 1
            return
        damage["packets"] += 1
        if damage["first"] is None:
            damage["first"] = (t, f"{exc.__class__.__name__}: {exc}")

    def timed_frames(container, stream, since: float):
        nonlocal decoded, gop
        last_key = None
        last_t = since  # a damaged packet without a time is counted as lost just after the last frame seen
        built_on_loss = False
        for packet in container.demux(stream):
            try:
                got = packet.decode()
            except av.error.FFmpegError as exc:  # a damaged packet: skip it, keep decoding
                when = float(packet.pts * packet.time_base) - probe.start_time if (
                    packet.pts is not None and packet.time_base) else last_t + _EPS
                note_loss(when, exc)
                built_on_loss = True
                continue
            for frame in got:
                decoded += 1
                t = (frame.time or 0.0) - probe.start_time
                last_t = t
                if frame.key_frame:
                    built_on_loss = False
                    if last_key is not None and t > last_key:
                        gop = max(gop or 0.0, t - last_key)
                    last_key = t
                if built_on_loss or frame.is_corrupt:
                    note_loss(t)
                    continue
                yield t, frame

    def lost_between(lo: float, hi: float) -> bool:
        return any(lo < x <= hi for x in lost)

    good = None  # (time, uint8 frame) of the last target that had a frame
    waiting: list[bool] = []  # own-time flags of the targets before the first good frame
    try:
        container = open_video(path)
    except av.error.FFmpegError as exc:
        raise AdaTPInputError(f"PyAV cannot open {name}: {exc}") from exc
    frame_time = 1.0 / probe.fps
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = None
        shown = ahead = None  # (t, frame): last good frame at or before the target, first after it
        for k, target in enumerate(times):
            seen = ahead or shown
            if frames is None or seen is None or target - seen[0] > (gop or seek_gap):
                container.seek(int((target + probe.start_time) / stream.time_base), stream=stream,
                               backward=True, any_frame=False)
                frames, shown, ahead = timed_frames(container, stream, target), None, None
            if ahead is not None and ahead[0] <= target + _EPS:
                shown, ahead = ahead, None
            broken = False
            while ahead is None:
                try:
                    nxt = next(frames, None)
                except av.error.FFmpegError as exc:  # the container cannot be read on: seek for the next target
                    note_loss(target, exc)
                    frames, nxt, broken = None, None, True
                if nxt is None:  # end of stream: the last frame stays on screen
                    break
                if nxt[0] <= target + _EPS:
                    shown = nxt
                else:
                    ahead = nxt
            if shown is not None:  # its own frame, unless a later one up to the target was lost
                pick, is_own = shown, not broken and not lost_between(shown[0], target + _EPS)
            elif ahead is not None:  # a seek landed just past the target, or nothing before it decodes
                pick = ahead
                is_own = ahead[0] - target <= frame_time + _EPS and not lost_between(target - frame_time, ahead[0])
            else:
                pick, is_own = None, False
            report.decoded = decoded
            if pick is not None:
                good = (pick[0], pick[1].to_ndarray(format="rgb24", width=size[0], height=size[1]))
                for flag in waiting:  # the targets before the first good frame get that frame
                    report.stamps.append(good[0])
                    report.own.append(flag)
                    yield good[1]
                waiting = []
            if good is None:
                waiting.append(is_own)
            else:
                report.stamps.append(good[0])
                report.own.append(is_own and pick is not None)
                yield good[1]
            if on_frame is not None:
                on_frame(k)
    report.decoded = decoded
    if damage["packets"] or damage["frames"]:
        where = f" (the first near {damage['first'][0]:.2f}s: {damage['first'][1]})" if damage["first"] else ""
        built = f"; {damage['frames']} frame(s) built on them were not used" if damage["frames"] else ""
        log.warning("%s: %d damaged packet(s) skipped%s%s", name, damage["packets"], where, built)
    if good is None:
        raise DamagedVideo(f"{name} is damaged: none of its {len(times)} sampled frames decodes (the file is "
                           "corrupt or cut short); re-download the clip or re-export it from the original.")


def check_decodable(path, probe: VideoProbe) -> None:
    """The checks of ``probe_video`` that a decoder relies on, for callers that bring their
    own probe: extension, not text, an allowed container (opened with the whitelist) and
    the limits. Raises AdaTPInputError; decodes nothing."""
    import av

    name = Path(path).name
    check_video_file(path)
    try:
        with open_video(path) as container:
            check_container(container.format.name, name)
    except av.error.FFmpegError as exc:
        raise AdaTPInputError(f"{name} cannot be read as a video, or its format is not one the pack reads "
                              f"({exc}); re-export it as MP4 (H.264).") from exc
    check_limits(probe, name)


def iter_frames(path, times: list[float], probe: VideoProbe, max_side: int | None = 1024,
                backend: str = "auto", on_frame: Callable[[int], None] | None = None,
                report: DecodeReport | None = None, resume: bool = True):
    """Decode the frames on screen at ``times``, one at a time: yields uint8 [h, w, 3] frames in
    order, never holding more than the one being handed over (and, after damage at the very start,
    the targets waiting for the first good frame). ``report`` receives each frame's time, whether it
    is the one on screen at its time, the frames decoded and the decoder that ran.

    decord (in a child process) first, PyAV the fallback: when decord fails part way, PyAV decodes
    the targets it had not yet given (resume), or all of them again (not resume: the frames given so
    far are then given again, from the first, and ``report`` starts over: a caller that keeps every
    frame gets PyAV's whole account). decord decodes a frame or fails, so its frames are all their own.
    """
    if backend not in BACKENDS:
        raise AdaTPInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    report = DecodeReport() if report is None else report
    check_decodable(path, probe)
    size = output_size(probe.width, probe.height, max_side)
    order = ["decord", "pyav"] if backend == "auto" else [backend]
    if backend == "auto" and importlib.util.find_spec("decord") is None:
        order = ["pyav"]  # not an error: PyAV is the fallback by design
    errors, damaged, used = [], None, []
    for name in order:
        if not resume:
            report.stamps.clear()
            report.own.clear()
        done = len(report.stamps)
        rest = list(times[done:])

        def step(k, base=done):
            if on_frame is not None:
                on_frame(base + k)

        try:
            if name == "decord" and importlib.util.find_spec("decord") is None:
                raise AdaTPEnvironmentError("decord is not installed")
            decoder = _decode_decord if name == "decord" else _decode_pyav
            yield from decoder(str(path), rest, size, probe, step, report)
            if used:
                report.decoded = None  # what the decoder that failed part way decoded is not known
            report.backend = "+".join(used + [name])
            return
        except AdaTPInterrupted:
            raise
        except (AdaTPInputError, AdaTPEnvironmentError, RuntimeError, OSError, ValueError) as exc:
            log.warning("%s could not decode %s: %s", name, path, exc)
            errors.append(f"{name}: {exc}")
            if isinstance(exc, DamagedVideo):
                damaged = exc
            if resume and len(report.stamps) > done:
                used.append(name)
    if damaged is not None:  # what PyAV found is the clearest account of the file
        raise damaged
    raise AdaTPInputError(
        f"{Path(path).name} could not be decoded ({'; '.join(errors)}); re-export it as MP4 (H.264).")


def decode_frames(path, times: list[float], probe: VideoProbe, max_side: int | None = 1024,
                  backend: str = "auto", on_frame: Callable[[int], None] | None = None):
    """Decode the frames on screen at ``times`` (``iter_frames``) into one array.

    Returns (uint8 [T, h, w, 3], timestamps, backend, frames decoded or None when unknown,
    own: [T] bool, whether each frame is the one on screen at its time; see ``_decode_pyav``).
    """
    report = DecodeReport()
    frames = None
    for frame in iter_frames(path, times, probe, max_side, backend, on_frame, report, resume=False):
        if frames is None:
            frames = np.empty((len(times), *frame.shape), dtype=np.uint8)
        frames[len(report.stamps) - 1] = frame
    return frames, report.stamps, report.backend, report.decoded, report.own


def _identity(path) -> tuple | None:
    """What changes when a file is replaced or rewritten (None: it does not exist)."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def clip_window(probe: VideoProbe, start_time: float, end_time: float,
                clip: tuple[float, float]) -> tuple[float, float, float]:
    """(start, end, clip length) in the file's seconds for a window given in a clip's seconds.

    clip (start, duration): the part of the file that the video is (a trimmed
    ComfyUI VIDEO); duration 0 means until the end of the file, (0, 0) the whole
    file. end_time 0 means the end of the clip. The clip's last instant is left
    out, as ComfyUI's trim does (a frame starting exactly at the cut is not in it).
    """
    clip_start, clip_duration = (float(v) for v in clip)
    if not (math.isfinite(clip_start) and math.isfinite(clip_duration)) or clip_start < 0 or clip_duration < 0:
        raise AdaTPInputError(f"the video's trim window {clip} is not a pair of seconds >= 0")
    length = probe.duration - clip_start
    if clip_duration > 0:
        length = min(length, clip_duration)
    if (clip_start, clip_duration) == (0.0, 0.0):
        return start_time, end_time, probe.duration
    if length <= 0:
        raise AdaTPInputError(f"the video is trimmed to start at {clip_start:.2f}s, after the end of its "
                              f"{probe.duration:.2f}s file; trim it again inside the video.")
    ends = [clip_start + end_time] if end_time > 0 else []
    if clip_duration > 0:
        ends.append(clip_start + clip_duration - 0.5 / probe.fps)
    return clip_start + start_time, min(ends, default=0.0), length


@dataclass(frozen=True)
class SamplePlan:
    """What ``decode_plan`` will decode, known from the probe alone (nothing decoded yet).

    times: seconds in the file of each frame to decode (sample_times).
    size: (width, height) of each decoded frame (longest side at most max_side).
    max_side: the longest side frames are decoded at (None: as stored).
    offset, length: the clip's start in the file and its length, seconds (clip_window).
    identity: the file's (device, inode, size, mtime) at the probe; a change fails the decode.
    """

    path: str
    probe: VideoProbe
    times: tuple[float, ...]
    size: tuple[int, int]
    max_side: int | None = None
    offset: float = 0.0
    length: float = 0.0
    identity: tuple | None = None

    @property
    def num_frames(self) -> int:
        return len(self.times)

    @property
    def name(self) -> str:
        return Path(self.path).name

    def clip_times(self, times=None) -> tuple[float, ...]:
        """``times`` (default: the sample times) in seconds from the clip's start, as VideoInfo holds them."""
        return tuple(max(t - self.offset, 0.0) for t in (self.times if times is None else times))

    def memory(self) -> MemoryEstimate:
        """Host memory of the decoded frames and of their IMAGE (float32), before decoding."""
        w, h = self.size
        decoded, image = frames_bytes(self.num_frames, w, h)
        shape = f"[{self.num_frames}, {h}, {w}, 3]"
        return MemoryEstimate(parts=((f"decoded frames {shape} uint8", decoded, "host"),
                                     (f"the IMAGE {shape} float32", image, "host")), frames=self.num_frames)


def plan_sampling(path, num_frames: int = 32, sampling: str = "uniform", fps: float = 1.0,
                  start_time: float = 0.0, end_time: float = 0.0, max_side: int | None = 1024,
                  clip: tuple[float, float] = (0.0, 0.0)) -> SamplePlan:
    """Probe ``path`` and choose the frames to decode (read_video's arguments); decodes nothing."""
    before = _identity(path)
    probe = probe_video(path)
    start, end, length = clip_window(probe, start_time, end_time, clip)
    times = sample_times(probe, num_frames, sampling, fps, start, end)
    return SamplePlan(path=str(path), probe=probe, times=tuple(times),
                      size=output_size(probe.width, probe.height, max_side), max_side=max_side,
                      offset=float(clip[0]), length=length, identity=before)


# A clip is refused as damaged when fewer than this share of its sampled frames decode at their
# own times. Each sampled frame stands for 1/T of the clip's time: with more than a quarter of them
# copies of other frames the model misses whole events and its answer describes another video,
# while damage to one keyframe interval of a longer clip costs a frame or two and passes, with a
# warning and the stats naming those frames (README, "Damaged clips").
MIN_OWN_SHARE = 0.75


def check_damage(info: VideoInfo, name: str) -> None:
    """Refuse a clip that decoded only in part (fewer than MIN_OWN_SHARE of its sampled frames at
    their own times), and warn when some frames came from elsewhere. Raises AdaTPInputError."""
    total, own = len(info.timestamps), info.frames_own_time
    if own is None or own == total:
        return
    which = substitution_text(info)
    if own < MIN_OWN_SHARE * total:
        raise DamagedVideo(
            f"{name} is damaged: only {own} of {total} sampled frames decoded at their own times; the other "
            f"{total - own} would be copies of other frames ({which}), so an answer would describe another "
            f"video (below the {100 * MIN_OWN_SHARE:.0f}% the pack requires). Re-download the clip or re-export "
            "it from the original; or set start_time/end_time to a part that decodes.")
    log.warning("%s is damaged: %d of %d sampled frames decoded at their own times; %s", name, own, total, which)


def substitution_text(info: VideoInfo, names: int = 3) -> str:
    """Which sampled frames came from elsewhere: '#3 (wanted 2.83s) is the frame at 0.00s, ...'."""
    return substituted_text([(k, want, info.timestamps[k]) for k, want in info.frames_substituted], names)


def decode_plan(plan: SamplePlan, backend: str = "auto", on_frame: Callable[[int], None] | None = None):
    """Decode a SamplePlan's frames. Returns (uint8 [T, H, W, 3] numpy frames, VideoInfo).

    A clip that decodes only in part is refused (check_damage). Needs no torch, so
    decode-ahead worker processes start fast (caption.py).
    """
    frames, stamps, used, decoded, own = decode_frames(plan.path, list(plan.times), plan.probe, plan.max_side,
                                                       backend, on_frame)
    return frames, _decoded_info(plan, stamps, used, decoded, own)


def _decoded_info(plan: SamplePlan, stamps, used: str, decoded: int | None, own) -> VideoInfo:
    """The VideoInfo of a plan's decoded frames, after the checks every decode ends with: the file
    unchanged since the probe, and not damaged (check_damage)."""
    probe = plan.probe
    if _identity(plan.path) != plan.identity:  # replaced after the probe: the decoder may have read anything
        raise AdaTPInputError(f"{plan.name} changed while it was being read; run again.")
    count = probe.frame_count if plan.length == probe.duration else int(round(plan.length * probe.fps))
    wanted = plan.clip_times()
    info = VideoInfo(path=plan.path, fps=probe.fps, duration=plan.length,
                     frame_count=count, width=probe.width, height=probe.height,
                     timestamps=plan.clip_times(stamps), backend=used,
                     frames_decoded=decoded, frames_own_time=sum(own),
                     frames_substituted=tuple((k, wanted[k]) for k, ok in enumerate(own) if not ok))
    check_damage(info, plan.name)
    return info


class FrameStream:
    """A sampling plan's frames, decoded a chunk at a time as they are iterated (``iter_frames``).

    Iterating yields uint8 [c, h, w, 3] numpy chunks of ``chunk`` frames (the last one may be
    shorter), each a new array: all the frames never exist at once, only the chunk being handed
    over. After the last chunk, ``info`` is the VideoInfo, with decode_plan's checks (the file
    unchanged since the probe, not damaged). A stream is iterated once.
    """

    def __init__(self, plan: SamplePlan, chunk: int = 16, backend: str = "auto",
                 on_frame: Callable[[int], None] | None = None):
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise AdaTPInputError(f"a frame stream's chunk must be a whole number of frames >= 1, got {chunk!r}")
        self.plan, self.chunk, self.backend, self.on_frame = plan, chunk, backend, on_frame
        self._info: VideoInfo | None = None
        self._started = False

    def __len__(self) -> int:
        return self.plan.num_frames

    @property
    def info(self) -> VideoInfo:
        if self._info is None:
            raise RuntimeError("the frame stream's VideoInfo is known once every chunk has been read")
        return self._info

    def __iter__(self):
        if self._started:
            raise RuntimeError("a frame stream is read once; make another for a second pass")
        self._started = True
        plan, report, buf, n = self.plan, DecodeReport(), None, 0
        for frame in iter_frames(plan.path, list(plan.times), plan.probe, plan.max_side, self.backend,
                                 self.on_frame, report):
            if buf is None:
                buf = np.empty((min(self.chunk, plan.num_frames - len(report.stamps) + 1), *frame.shape),
                               dtype=np.uint8)
            buf[n] = frame
            n += 1
            if n == buf.shape[0]:
                yield buf
                buf, n = None, 0
        if buf is not None:  # fewer frames came than planned (cannot happen: every target gets one)
            yield buf[:n]
        self._info = _decoded_info(plan, report.stamps, report.backend, report.decoded, report.own)


def read_video(path, num_frames: int = 32, sampling: str = "uniform", fps: float = 1.0,
               start_time: float = 0.0, end_time: float = 0.0, max_side: int | None = 1024,
               backend: str = "auto", on_frame: Callable[[int], None] | None = None,
               clip: tuple[float, float] = (0.0, 0.0)):
    """Sample and decode a video. Returns (uint8 [T, H, W, 3] numpy frames, VideoInfo).

    clip: the (start, duration) of the file that the video is, for a trimmed
    ComfyUI VIDEO (see clip_window); start_time, end_time and the returned
    timestamps are then seconds from the clip's start.
    Before decoding, a plan whose frames (and their IMAGE) would not fit in the host's
    memory is refused (budget.check_memory); after, a clip that decoded only in part
    (check_damage).
    """
    plan = plan_sampling(path, num_frames, sampling, fps, start_time, end_time, max_side, clip)
    check_memory(plan.memory(), plan.name)
    return decode_plan(plan, backend, on_frame)


def frames_to_image(frames: np.ndarray):
    """uint8 [T, H, W, 3] -> float32 torch [T, H, W, 3] in 0..1 (ComfyUI IMAGE).

    Made outside inference mode even where the caller is in it (ComfyUI runs every node
    there): the IMAGE then keeps a version counter, so the prefix cache can key the same
    unwritten frames by identity on the next Run instead of hashing them (prefix_cache.FrameKeys).
    """
    import torch

    with torch.inference_mode(False):
        return torch.from_numpy(frames).float().div_(255.0)


def load_video(path, num_frames: int = 32, sampling: str = "uniform", fps: float = 1.0,
               start_time: float = 0.0, end_time: float = 0.0, max_side: int | None = 1024,
               backend: str = "auto", on_frame: Callable[[int], None] | None = None,
               clip: tuple[float, float] = (0.0, 0.0)):
    """Sample and decode a video. Returns (frames, info).

    frames: [T, H, W, 3] float32 in 0..1 (ComfyUI IMAGE), longest side <= max_side.
    """
    frames, info = read_video(path, num_frames, sampling, fps, start_time, end_time, max_side, backend, on_frame,
                              clip)
    return frames_to_image(frames), info


def _check_frames(images, what: str):
    """images: [T, H, W, C>=3] (ComfyUI IMAGE). Returns it, or raises AdaTPInputError."""
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != 4 or shape[-1] < 3 or min(shape[1:3], default=0) < 1:
        raise AdaTPInputError(f"{what} must be frames of shape [T, H, W, 3] (a ComfyUI IMAGE batch), got shape "
                              f"{list(shape) if shape else type(images).__name__}; connect a video or an image batch.")
    if shape[0] < 1:
        raise AdaTPInputError(f"{what} has no frames; check the node that made it.")
    return images


def _check_rate(rate, what: str) -> float:
    try:
        value = float(rate)
    except (TypeError, ValueError, ZeroDivisionError):
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise AdaTPInputError(f"{what} must be a number of frames per second > 0, got {rate!r}")
    return value


def frames_info(images, fps: float, start_time: float = 0.0) -> VideoInfo:
    """ADATP_VIDEO_INFO for frames taken every 1/fps seconds from start_time (any loader's IMAGE batch).

    images: [T, H, W, 3]. Frame i is at start_time + i / fps.
    """
    images = _check_frames(images, "frames")
    rate = _check_rate(fps, "fps")
    if not math.isfinite(start_time) or start_time < 0:
        raise AdaTPInputError(f"start_time must be a number of seconds >= 0, got {start_time}")
    t, h, w = (int(v) for v in images.shape[:3])
    return VideoInfo(path="", fps=rate, duration=t / rate, frame_count=t, width=w, height=h,
                     timestamps=tuple(start_time + i / rate for i in range(t)), backend="frames", frames_decoded=0)


def sample_frames(images, frame_rate, num_frames: int = 32, sampling: str = "uniform", fps: float = 1.0,
                  start_time: float = 0.0, end_time: float = 0.0, max_side: int | None = 1024):
    """Sample a video that is already frames in memory (a ComfyUI VIDEO made by Create Video).

    images: [N, H, W, 3] float 0..1, frame i shown from i / frame_rate seconds.
    The same times as load_video on a constant-rate file of these frames
    (sample_times, and the frame on screen at each time); only the sampled
    frames are copied. Returns (frames [T, h, w, 3] float32 CPU, VideoInfo).
    """
    import torch

    images = _check_frames(images if isinstance(images, torch.Tensor) else torch.as_tensor(images), "the video's frames")
    rate = _check_rate(frame_rate, "the video's frame rate")
    n, h, w = (int(v) for v in images.shape[:3])
    probe = VideoProbe(fps=rate, duration=n / rate, frame_count=n, width=w, height=h, codec="frames", start_time=0.0)
    times = sample_times(probe, num_frames, sampling, fps, start_time, end_time)
    index = [min(int(math.floor(t * rate + _EPS)), n - 1) for t in times]
    size = output_size(w, h, max_side)
    parts = [(f"the sampled frames [{len(index)}, {h}, {w}, 3] float32", frames_bytes(len(index), w, h)[1], "host")]
    if size != (w, h):
        parts.append((f"the IMAGE [{len(index)}, {size[1]}, {size[0]}, 3] float32",
                      frames_bytes(len(index), *size)[1], "host"))
    check_memory(MemoryEstimate(parts=tuple(parts), frames=len(index)), "the VIDEO")
    frames = images[torch.as_tensor(index, dtype=torch.long, device=images.device), ..., :3]
    frames = frames.to(device="cpu", dtype=torch.float32)
    if size != (w, h):
        frames = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2), size=(size[1], size[0]), mode="bilinear",
                                                 antialias=True, align_corners=False).permute(0, 2, 3, 1).clamp_(0, 1)
    info = VideoInfo(path="", fps=rate, duration=probe.duration, frame_count=n, width=w, height=h,
                     timestamps=tuple(i / rate for i in index), backend="memory", frames_decoded=0,
                     frames_own_time=len(index))
    return frames.contiguous(), info
