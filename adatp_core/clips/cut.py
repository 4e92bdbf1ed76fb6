"""Cutting planned clips out of a source with PyAV, decoding the source once for all of them.

``reencode`` (the default, for training sets): clip frame k is the source frame on screen at
``plan.start + k / plan.fps`` (timestamps, so a variable-frame-rate source is cut right),
rotated as a player shows it, scaled to the plan's size and written as H.264 yuv420p 8-bit
(a 10-bit or HDR source is converted; HDR is not tone-mapped: the job says so for each PQ or
HLG source, job.source_notes) at ``crf`` quality. The
source is read once, front to back, for all its clips; clips that overlap are written
side by side, and a long stretch with no clip is skipped by a seek.

``copy``: packets are copied, no frame is decoded: each clip starts at the first keyframe
at or after its start and ends before its end, at the source's own rate and size (so the
frame count follows the source's keyframes, not the plan; each CutResult's ``made`` says what
was written). A clip with no keyframe inside it fails with a message to use reencode.

Every clip is written to a hidden temp file in out_dir and renamed to
``out_dir / f"{plan.name}.mp4"`` only when complete: an interrupted cut (even a kill)
never leaves a half-written clip under a clip's name. A damaged region of the source fails
only the clips whose frames it holds.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..caption.files import hold_file
from ..errors import AdaTPInputError, OptionError
from .plan import ClipPlan, display_rotation
from .shots import source_events

log = logging.getLogger(__name__)

CUT_MODES = ("reencode", "copy")
MP4_AUDIO = ("aac", "mp3", "ac3", "eac3", "opus", "alac", "flac")  # audio codecs copied into MP4 as they are
ENCODERS = ("libx264", "libopenh264")  # the first one this PyAV has encodes the clips
PRESET = "veryfast"  # libx264 speed / size trade (quality is set by crf); twice "fast"'s speed on this CPU
SEEK_GAP = 20.0  # seconds with no clip before the next one: seek there rather than decode through
AUDIO_KEEP = 2.0  # seconds of audio packets held back for a clip that has not started yet
_EPS = 1e-6


@dataclass(frozen=True)
class CutResult:
    """What became of one planned clip."""

    plan: ClipPlan
    path: Path | None  # the written clip (.mp4), None on failure
    skipped: bool  # already there from an earlier run
    error: str | None
    made: dict | None = None  # a clip written now: what its file holds (MADE_FIELDS; copy mode decides them)


MADE_FIELDS = ("start", "frames", "fps", "width", "height")  # a written clip, as its file holds it


def probe_clip(path: Path) -> dict | None:
    """What a written clip holds, read from its container (no frame decoded): frames, fps, width,
    height and whether it has audio; None when it cannot be read as a video."""
    import av

    from ..video import open_video

    try:
        with open_video(path) as container:
            video = container.streams.video[0]
            rate = video.average_rate or video.guessed_rate
            return {"frames": int(video.frames or 0), "fps": float(rate) if rate else 0.0,
                    "width": int(video.codec_context.width or 0), "height": int(video.codec_context.height or 0),
                    "audio": bool(container.streams.audio)}
    except (av.error.FFmpegError, IndexError, OSError):
        return None


def check_cut(mode: str, crf: int) -> None:
    """The cut settings; OptionError names the one at fault."""
    if mode not in CUT_MODES:
        raise OptionError("cut", f"the cut mode must be one of {CUT_MODES} (reencode: exact frames; copy: fast, "
                                 f"cut at keyframes), got {mode!r}")
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise OptionError("crf", f"crf must be a whole number from 0 (lossless) to 51 (18: visually lossless, "
                                 f"23: x264's default), got {crf!r}")


def clip_file(out_dir: Path, plan: ClipPlan) -> Path:
    return Path(out_dir) / f"{plan.name}.mp4"


def temp_file(out_dir: Path, plan: ClipPlan) -> Path:
    return Path(out_dir) / f".{plan.name}.part-{os.getpid()}.mp4"


LOCKS = os.name == "posix"  # a temp file is locked (flock) while written; Windows' locks would stop FFmpeg's writes


def hold_temp(tmp: Path) -> int | None:
    """Make the temp file ``tmp`` and lock it (POSIX) before FFmpeg opens it (the same file, truncated):
    the lock, held until the clip is renamed into place or given up, tells a live writer from a dead
    one whatever the PID in the name. None where there are no locks (Windows: the PID is asked)."""
    return hold_file(tmp) if LOCKS else None


def remove_stale_temps(out_dir: Path) -> None:
    """Remove the temp files (temp_file's names) left in out_dir by a process that is gone (a killed
    run), whichever clip they were for: the plan may have changed since. On POSIX a temp file whose
    lock can be taken has no live writer (a PID in the name may have been reused by now); on Windows,
    one whose PID surely runs no process (pid_alive; left alone when that cannot be told)."""
    for tmp in Path(out_dir).glob(".*.part-*.mp4"):
        stem, _, pid = tmp.name[1:-len(".mp4")].rpartition(".part-")
        if not stem or not pid.isdigit() or not tmp.is_file() or tmp.is_symlink():
            continue
        if LOCKS:
            try:
                fd = hold_file(tmp, create=False)
            except OSError:  # not ours to open (another user's run): left alone
                continue
            if fd is None:
                continue  # its writer is alive (or it went meanwhile)
            try:
                tmp.unlink(missing_ok=True)
            finally:
                os.close(fd)
            continue
        if pid_alive(int(pid)) is False:  # not when it runs, or cannot be told
            tmp.unlink(missing_ok=True)


WINDOWS = os.name == "nt"


def pid_alive(pid: int) -> bool | None:
    """Whether process ``pid`` runs: True, False, or None when that cannot be told. POSIX: signal 0.
    Windows: OpenProcess and its exit code (os.kill(pid, 0) is no check there: signal 0 is CTRL_C_EVENT,
    sent to the process)."""
    if WINDOWS:
        return windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    except OSError:
        return None
    return True


def windows_pid_alive(pid: int) -> bool | None:
    """pid_alive on Windows, through kernel32 (ctypes); None where that is not at hand."""
    import ctypes

    try:
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    except (AttributeError, OSError):  # not Windows
        return None
    query, still_active, invalid_parameter = 0x1000, 259, 87  # PROCESS_QUERY_LIMITED_INFORMATION, ...
    handle = kernel32.OpenProcess(query, False, pid)
    if not handle:
        return False if ctypes.get_last_error() == invalid_parameter else None  # no such process; else denied
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return None
        return code.value == still_active
    finally:
        kernel32.CloseHandle(handle)


def encoder_name() -> str:
    import av

    for name in ENCODERS:
        try:
            av.codec.Codec(name, "w")
            return name
        except (av.error.FFmpegError, ValueError):
            continue
    raise AdaTPInputError(f"this PyAV has no H.264 encoder ({', '.join(ENCODERS)}); use the copy cut mode, or "
                          "install a PyAV wheel (they ship libx264).")


class ClipWriter:
    """One clip being written: a temp file renamed into place by ``finish``, removed by ``abort``."""

    def __init__(self, plan: ClipPlan, out_dir: Path, *, video_template=None, encoder: str | None = None,
                 crf: int = 18, audio_template=None):
        from ..video import open_container

        self.plan = plan
        self.final = clip_file(out_dir, plan)
        self.tmp = temp_file(out_dir, plan)
        self.k = 0  # frames written (reencode)
        self.packets = 0  # video packets copied (copy): one a frame
        self.offset = None  # copy: the first packet's dts, in the video stream's time base
        self.start_t = plan.start  # the source time of its first frame (copy: of its first keyframe)
        self.encoding = video_template is None
        self.audio = None
        self.lock = hold_temp(self.tmp)
        try:
            self.container = open_container(str(self.tmp), "w", format="mp4")
        except BaseException:
            self._unlock(remove=True)
            raise
        try:
            if video_template is not None:
                self.video = self.container.add_stream_from_template(video_template)
                self.source_rate = video_template.average_rate or video_template.guessed_rate
            else:
                rate = Fraction(plan.fps).limit_denominator(1001)
                self.video = self.container.add_stream(encoder, rate=rate)
                self.video.width, self.video.height, self.video.pix_fmt = plan.width, plan.height, "yuv420p"
                self.video.codec_context.time_base = 1 / rate
                if encoder == "libx264":
                    self.video.options = {"crf": str(crf), "preset": PRESET}
            if audio_template is not None:
                self.audio = self.container.add_stream_from_template(audio_template)
        except BaseException:
            self.abort()
            raise

    @property
    def target(self) -> float:
        """The source time of the next frame to write (reencode)."""
        return self.plan.start + self.k / self.plan.fps

    @property
    def done(self) -> bool:
        return self.k >= self.plan.frames

    def add_frame(self, frame) -> None:
        frame.pts = self.k
        frame.time_base = self.video.codec_context.time_base
        for packet in self.video.encode(frame):
            self.container.mux(packet)
        self.k += 1

    def made(self) -> dict:
        """What the clip's file holds (MADE_FIELDS): reencode, the plan's frames at the encoder's rate
        and the plan's size; copy, the packets copied from the first keyframe on, at the source's
        rate and size."""
        stream = self.video
        if self.encoding:
            frames, rate = self.k, stream.codec_context.time_base
            fps = float(1 / rate)
        else:
            frames = self.packets
            rate = self.source_rate
            fps = float(rate) if rate else self.plan.fps
        return {"start": round(self.start_t, 6), "frames": frames, "fps": round(fps, 6),
                "width": stream.codec_context.width, "height": stream.codec_context.height}

    def add_packet(self, packet, out_stream, start_ts: int) -> None:
        """Copy ``packet`` (times rebased by ``start_ts`` in its own time base) into ``out_stream``."""
        import av

        copy = av.Packet(bytes(packet))
        copy.pts = None if packet.pts is None else packet.pts - start_ts
        copy.dts = None if packet.dts is None else packet.dts - start_ts
        copy.time_base = packet.time_base
        copy.is_keyframe = packet.is_keyframe
        copy.stream = out_stream
        self.container.mux(copy)
        self.packets += out_stream is self.video

    def finish(self) -> Path:
        if self.encoding:
            for packet in self.video.encode():
                self.container.mux(packet)
        self.container.close()
        os.replace(self.tmp, self.final)
        self._unlock()
        return self.final

    def abort(self) -> None:
        try:
            self.container.close()
        except Exception:  # noqa: BLE001 - the file is removed anyway
            pass
        self._unlock(remove=True)

    def _unlock(self, remove: bool = False) -> None:
        if remove:  # while still locked: another run never takes a live temp file for a dead one's
            self.tmp.unlink(missing_ok=True)
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


class Frames:
    """The source being cut: its container, video and (kept) audio streams; ``events`` are
    shots.source_events."""

    def __init__(self, container, video, audio, start_time: float):
        self.container, self.video, self.audio, self.start_time = container, video, audio, start_time

    def events(self, since: float = 0.0):
        return source_events(self.container, self.video, self.audio, self.start_time, since)


class Converter:
    """A source frame as the clips want it: rotated as displayed, at the plan's size, yuv420p 8-bit;
    converted once per source frame whichever clips use it."""

    def __init__(self, rotation: int):
        from av.video.reformatter import VideoReformatter

        self.scaler = VideoReformatter()  # kept: a new one per frame costs more than the scaling
        self.rotation = rotation
        self.key = None
        self.out = None

    def __call__(self, frame, width: int, height: int):
        import av

        key = (id(frame), frame.pts, width, height)
        if key != self.key:
            if self.rotation:
                w, h = (height, width) if self.rotation % 180 else (width, height)
                rgb = self.scaler.reformat(frame, width=w, height=h, format="rgb24", interpolation="AREA")
                turned = np.ascontiguousarray(np.rot90(rgb.to_ndarray(), k=self.rotation // 90))
                self.out = av.VideoFrame.from_ndarray(turned, format="rgb24").reformat(format="yuv420p")
            else:
                self.out = self.scaler.reformat(frame, width=width, height=height, format="yuv420p",
                                                interpolation="AREA")
            self.key = key
        return self.out


def cut_clips(source: Path, plans: list[ClipPlan], out_dir: Path, *, mode: str = "reencode",
              keep_audio: bool = False, crf: int = 18,
              on_clip: Callable[[CutResult], None] | None = None) -> list[CutResult]:
    """Write each plan to ``out_dir / f"{plan.name}.mp4"``, decoding the source once for all.

    mode "reencode": exact frames, H.264 yuv420p at plan.fps; "copy": stream copy cut at keyframes.
    Each clip goes to a temp file in out_dir then is renamed (never a half-written clip). A clip
    whose file exists is skipped. keep_audio: the source's audio in the clip's time range is copied
    too. Returns one CutResult per plan, in the order of ``plans``; on_clip(result) runs as each is
    done. Raises OptionError for a bad mode or crf, AdaTPInputError for or a source that is not a video; a clip
    that cannot be cut (a damaged region, the source ending early) is a failed result."""
    import av

    from ..video import open_video, probe_video

    check_cut(mode, crf)
    source, out_dir = Path(source), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[int, CutResult] = {}

    def report(i: int, result: CutResult) -> None:
        results[i] = result
        if on_clip is not None:
            on_clip(result)

    todo = []
    for i, plan in sorted(enumerate(plans), key=lambda x: (x[1].start, x[0])):
        if clip_file(out_dir, plan).is_file():
            report(i, CutResult(plan, clip_file(out_dir, plan), True, None))
        else:
            todo.append((i, plan))
    if todo:
        probe = probe_video(source)
        remove_stale_temps(out_dir)
        try:
            container = open_video(source)
        except av.error.FFmpegError as exc:
            raise AdaTPInputError(f"{source.name} cannot be opened as a video ({exc})") from exc
        with container:
            video = container.streams.video[0]
            video.thread_type = "AUTO"
            audio = container.streams.audio[0] if keep_audio and container.streams.audio else None
            codec = audio.codec_context.name if audio is not None else None
            if audio is not None and codec not in MP4_AUDIO:
                raise AdaTPInputError(f"{source.name}: its audio ({codec}) cannot be copied into an MP4 clip "
                                      f"(MP4 takes {', '.join(MP4_AUDIO)}); cut it without keeping the audio.")
            frames = Frames(container, video, audio, probe.start_time)
            if mode == "copy":
                _copy(frames, todo, out_dir, report)
            else:
                _reencode(frames, todo, out_dir, report, crf=crf, rotation=display_rotation(source),
                          frame_time=1.0 / probe.fps)
    return [results[i] for i in range(len(plans))]


def _fail(writer: ClipWriter, i: int, report, why: str) -> None:
    writer.abort()
    log.warning("clip %s not cut: %s", writer.plan.name, why)
    report(i, CutResult(writer.plan, None, False, why))


def _finish(writer: ClipWriter, i: int, report) -> None:
    try:
        made = writer.made()
        path = writer.finish()
    except Exception as exc:  # noqa: BLE001 - the muxer's failure fails this clip only
        _fail(writer, i, report, f"writing the clip failed ({exc.__class__.__name__}: {exc})")
        return
    report(i, CutResult(writer.plan, path, False, None, made))


def _route_audio(writers: dict, t: float, packet, start_time: float) -> None:
    """Copy an audio packet (at source time t) into the open clips whose time range holds it."""
    for writer in writers.values():  # from the clip's first frame (copy: its first keyframe)
        if writer.audio is not None and writer.start_t - _EPS <= t < writer.plan.end:
            writer.add_packet(packet, writer.audio, round((writer.start_t + start_time) / packet.time_base))


def _reencode(frames: Frames, todo: list, out_dir: Path, report, *, crf: int, rotation: int,
              frame_time: float) -> None:
    import av

    encoder = encoder_name()
    convert = Converter(rotation)
    pending = deque(todo)
    writers: dict[int, ClipWriter] = {}
    held: deque = deque()
    prev = None  # (t, frame): the last good frame, None after damaged data until the next good one
    last_t = None

    def open_next() -> None:
        """Open the next pending clip (its audio so far routed in); a clip that cannot be written fails."""
        i, plan = pending.popleft()
        try:
            w = writers[i] = ClipWriter(plan, out_dir, encoder=encoder, crf=crf, audio_template=frames.audio)
            for at, packet in held:
                _route_audio({i: w}, at, packet, frames.start_time)
        except (OSError, av.error.FFmpegError) as exc:  # this clip cannot be written (disk full...)
            if i in writers:
                writers.pop(i).abort()
            report(i, CutResult(plan, None, False, f"the clip cannot be written ({exc})"))

    try:
        since = pending[0][1].start if pending[0][1].start > SEEK_GAP else 0.0
        while pending or writers:
            events = frames.events(since)
            restart = None
            for kind, t, item in events:
                if kind == "audio":  # held back a while for clips that open later
                    held.append((t, item))
                    while held and held[0][0] < t - AUDIO_KEEP:
                        held.popleft()
                    _route_audio(writers, t, item, frames.start_time)
                    continue
                if kind == "lost":
                    prev = None
                    for i, w in list(writers.items()):  # an open clip needs the frames of the damaged stretch
                        if w.plan.end > t:
                            _fail(writers.pop(i), i, report, item)
                    continue
                if kind == "end":
                    for i, w in list(writers.items()):
                        _fail(writers.pop(i), i, report, item)
                    break
                # a new frame at t: the frame before it is on screen for every target before t
                while pending and pending[0][1].start + _EPS < t:
                    open_next()
                for i, w in list(writers.items()):
                    try:
                        while not w.done and w.target + _EPS < t:
                            if prev is None or prev[0] > w.target + frame_time:
                                _fail(writers.pop(i), i, report, f"no frame of the source at {w.target:.2f} s "
                                                                 "(damaged or missing data there)")
                                break
                            w.add_frame(convert(prev[1], w.plan.width, w.plan.height))
                    except (OSError, av.error.FFmpegError) as exc:
                        _fail(writers.pop(i), i, report, f"the clip cannot be written ({exc})")
                    if i in writers and w.done:
                        _finish(writers.pop(i), i, report)
                prev = (t, item)
                last_t = t
                if not writers and pending and pending[0][1].start - t > SEEK_GAP and pending[0][1].start > since:
                    restart = pending[0][1].start  # nothing to cut for a while: seek there (once: a seek
                    break  # can land far before it, at the keyframe before)
            if restart is not None:
                since, prev = restart, None
                continue
            # the end of the source: the last frame stays on screen for one frame (a clip may start there)
            while pending and prev is not None and pending[0][1].start < prev[0] + frame_time - _EPS:
                open_next()
            for i, w in list(writers.items()):
                while not w.done and prev is not None and w.target < prev[0] + frame_time - _EPS:
                    w.add_frame(convert(prev[1], w.plan.width, w.plan.height))
                if w.done:
                    _finish(writers.pop(i), i, report)
            for i, w in list(writers.items()):
                _fail(writers.pop(i), i, report, f"the source ends (or cannot be read) at {last_t or 0.0:.2f} s, "
                                                 f"before this clip's end at {w.plan.end:.2f} s")
            while pending:
                i, plan = pending.popleft()
                report(i, CutResult(plan, None, False, f"the source ends (or cannot be read) at "
                                                      f"{last_t or 0.0:.2f} s, before this clip at {plan.start:.2f} s"))
    finally:
        for w in writers.values():  # an interruption: no temp file stays behind
            w.abort()


def _copy(frames: Frames, todo: list, out_dir: Path, report) -> None:
    """Stream copy: packets only, each clip from its first keyframe at or after its start."""
    import av

    container, video = frames.container, frames.video
    tb = video.time_base
    pending = deque(todo)
    writers: dict[int, ClipWriter] = {}
    streams = [video] + ([frames.audio] if frames.audio is not None else [])
    try:
        for packet in container.demux(*streams):
            if packet.pts is None or packet.size == 0:
                continue
            t = float(packet.pts * tb if packet.stream is video else packet.pts * packet.time_base) - frames.start_time
            if packet.stream is not video:
                _route_audio(writers, t, packet, frames.start_time)
                continue
            for i, w in list(writers.items()):
                if t >= w.plan.end - _EPS:  # what follows in decode order may lean on this frame: stop here
                    _finish(writers.pop(i), i, report)
                elif t >= w.start_t - _EPS:  # (leading frames of an open GOP come after the keyframe: not used)
                    w.add_packet(packet, w.video, w.offset)
            while pending and pending[0][1].end <= t + _EPS:  # passed with no keyframe inside
                i, plan = pending.popleft()
                report(i, CutResult(plan, None, False, "no keyframe of the source inside this clip, so it cannot "
                                                       "be stream-copied; use the reencode cut mode"))
            if packet.is_keyframe:
                while pending and pending[0][1].start - _EPS <= t < pending[0][1].end - _EPS:
                    i, plan = pending.popleft()
                    w = writers[i] = ClipWriter(plan, out_dir, video_template=video, audio_template=frames.audio)
                    w.offset = packet.dts if packet.dts is not None else packet.pts
                    w.start_t = t
                    w.add_packet(packet, w.video, w.offset)
        for i, w in list(writers.items()):
            _finish(writers.pop(i), i, report)
        while pending:
            i, plan = pending.popleft()
            report(i, CutResult(plan, None, False, "the source ends before this clip's first keyframe"))
    except av.error.FFmpegError as exc:
        for i, w in list(writers.items()):
            _fail(writers.pop(i), i, report, f"the source cannot be read on ({exc})")
        while pending:
            i, plan = pending.popleft()
            report(i, CutResult(plan, None, False, f"the source cannot be read on ({exc})"))
    finally:
        for w in writers.values():
            w.abort()
