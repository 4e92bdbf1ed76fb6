"""AdaTP Sample Video: sample frames from ComfyUI's own VIDEO (core Load Video, Create
Video, video generation and API nodes) without decoding every frame.

A VIDEO backed by a file (``get_stream_source()`` gives a path) goes through
Load Video's decoders: probe, decord in a child process, PyAV fallback, only the
sampled frames. One backed by bytes in memory (a BytesIO, from API nodes or a
concatenation) is first written to a file in ComfyUI's temp folder, so the
decord child, which takes a path, and the probe's checks apply unchanged; the
file is deleted when decoding ends. A VIDEO held as frames (Create Video's
VideoFromComponents) is sampled from its tensor, its times from its frame rate.
Classes are recognised by what they implement, so the node needs no import of
ComfyUI and works with any VideoInput.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from ..adatp_core.errors import AdaTPEnvironmentError, AdaTPInputError
from ..adatp_core.video import load_video, probe_video, sample_frames
from . import comfy_bridge as bridge
from .inputs import checked
from .load_video import AdaTP_LoadVideo, ensure_sample_in_input

log = logging.getLogger(__name__)

# What ComfyUI's own video classes raise for a file they cannot read (ValueError, av's errors
# are OSError or ValueError subclasses, a failed assert on a stream), as opposed to an interrupt.
_READ_ERRORS = (ValueError, OSError, RuntimeError, TypeError, AssertionError, StopIteration, IndexError)


def _owner(video, method: str) -> str | None:
    """The name of the class in the video's MRO that defines ``method`` (None: none does)."""
    return next((k.__name__ for k in type(video).__mro__ if method in vars(k)), None)


def _is_components(video) -> bool:
    return any(k.__name__ == "VideoFromComponents" for k in type(video).__mro__)


def held_in_memory(video) -> bool:
    """True for a VIDEO whose frames are a tensor (VideoFromComponents), or that has no stream
    of its own: VideoInput's default get_stream_source would encode every frame to make one.
    Also true while a video has edits (a crop) that its stream does not contain yet."""
    if _is_components(video):
        return True
    if _owner(video, "get_stream_source") in (None, "VideoInput"):
        return True
    pending = getattr(video, "has_pending_frame_edits", None)
    return bool(pending()) if callable(pending) else False


def _read(what: str, call, *args):
    try:
        return call(*args)
    except _READ_ERRORS as exc:
        raise AdaTPInputError(f"the video cannot be read ({what}: {exc.__class__.__name__}: {exc}); "
                              "check the node that made it, or re-export the clip as MP4 (H.264).") from exc


@contextlib.contextmanager
def stream_file(source):
    """A path for a stream source: the path itself, or a file-like object (BytesIO) written
    to a fresh file in ComfyUI's temp folder and deleted afterwards. Yields (path, label)."""
    if isinstance(source, (str, os.PathLike)):
        yield Path(source), str(source)
        return
    if not callable(getattr(source, "read", None)):
        raise AdaTPInputError(f"the video's stream source is {type(source).__name__}, not a path or bytes; "
                              "connect a VIDEO from Load Video, Create Video or a video model.")
    folder = bridge.temp_directory()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A video extension: the decoders take only those; FFmpeg then probes the bytes themselves.
        fd, name = tempfile.mkstemp(prefix="adatp_video_", suffix=".mp4", dir=folder)
    except OSError as exc:
        raise AdaTPEnvironmentError(f"cannot create a file in ComfyUI's temp folder {folder} ({exc}); "
                                    "free disk space or fix its permissions.") from exc
    path = Path(name)
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                if callable(getattr(source, "seek", None)):
                    source.seek(0)
                shutil.copyfileobj(source, out, 1 << 20)
        except OSError as exc:
            raise AdaTPEnvironmentError(f"cannot write the video to ComfyUI's temp folder {folder} ({exc}); "
                                        "free disk space.") from exc
        try:
            yield path, "(VIDEO in memory)"
        except (AdaTPInputError, AdaTPEnvironmentError) as exc:  # a message names the file: not the server's
            unnamed(exc, path, "the VIDEO input")  # temp path, which the user never gave and cannot act on
            raise
    finally:
        path.unlink(missing_ok=True)


def unnamed(exc: BaseException, path: Path, name: str) -> None:
    """Replace ``path`` (whole, or its file name) in ``exc``'s message with ``name``, in place (the
    exception keeps its type and attributes)."""
    if exc.args and isinstance(exc.args[0], str):
        text = exc.args[0].replace(str(path), name).replace(path.name, name)
        exc.args = (text, *exc.args[1:])


def _cropped(video, path: Path) -> bool:
    """Whether a VIDEO is a crop of its file (newer ComfyUI keeps the crop beside the stream)."""
    if not callable(getattr(video, "as_cropped", None)):
        return False
    probe = probe_video(path)
    size = _read("its size", video.get_dimensions)
    return tuple(int(v) for v in size) != (probe.width, probe.height)


@contextlib.contextmanager
def video_file(video):
    """The file a ComfyUI VIDEO's decoders read: yields (path, label, (trim start, trim duration)), or
    None when its frames are the way to it (held in memory, no stream of its own, or a crop of its
    file). A stream of bytes is written to ComfyUI's temp folder and deleted afterwards (stream_file)."""
    if not callable(getattr(video, "get_components", None)):
        raise AdaTPInputError(f"video must be a ComfyUI VIDEO (from Load Video, Create Video or a video model), "
                              f"got {type(video).__name__}.")
    if not held_in_memory(video):
        source = _read("its stream", video.get_stream_source)
        trim = getattr(video, "get_active_trim_window", None)
        clip = _read("its trim window", trim) if callable(trim) else (0.0, 0.0)
        with stream_file(source) as (path, label):
            if not _cropped(video, path):
                yield path, label, tuple(clip)
                return
        log.info("the VIDEO is a crop of its file: sampling its decoded frames")
    elif _owner(video, "get_stream_source") is None and not _is_components(video):  # ComfyUI 0.3.30 to 0.3.4x
        log.warning("this ComfyUI's %s has no stream source: decoding all of its frames (update ComfyUI "
                    "to decode only the sampled ones)", type(video).__name__)
    yield None


def sample_video(video, num_frames, sampling, fps, start_time, end_time, on_frame=None):
    """(frames [T, H, W, 3] float32, VideoInfo) from a ComfyUI VIDEO; see the module docstring."""
    with video_file(video) as found:
        if found is not None:
            path, label, clip = found
            frames, info = load_video(path, num_frames, sampling, fps, start_time, end_time,
                                      on_frame=on_frame, clip=clip)
            return frames, replace(info, path=label)
    return sampled_frames(video, num_frames, sampling, fps, start_time, end_time)


def sampled_frames(video, num_frames, sampling, fps, start_time, end_time):
    """(frames, VideoInfo) sampled from a VIDEO's decoded frames (video_file found no file to read)."""
    components = _read("its frames", video.get_components)
    return sample_frames(getattr(components, "images", None), getattr(components, "frame_rate", None),
                         num_frames, sampling, fps, start_time, end_time)


class AdaTP_SampleVideo:
    DESCRIPTION = ("Samples frames from a ComfyUI VIDEO (core Load Video, Create Video, video models) as AdaTP "
                   "Load Video does, and decodes only the sampled frames. A video held as frames (Create Video) "
                   "is sampled from memory, with times from its frame rate.")
    CATEGORY = "AdaTP"
    RETURN_TYPES = ("IMAGE", "ADATP_VIDEO_INFO")
    RETURN_NAMES = ("frames", "video_info")
    OUTPUT_TOOLTIPS = AdaTP_LoadVideo.OUTPUT_TOOLTIPS
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        ensure_sample_in_input()  # for core Load Video in the shipped workflow, as AdaTP Load Video does
        load = AdaTP_LoadVideo.INPUT_TYPES()["required"]
        return {"required": {
            "video": ("VIDEO", {"tooltip": "A VIDEO: from core Load Video, Create Video, a video model or an API "
                                           "node."}),
            **{name: load[name] for name in ("num_frames", "sampling", "fps", "start_time", "end_time")},
        }}

    @checked
    def sample(self, video, num_frames, sampling, fps, start_time, end_time):
        progress = bridge.Progress(num_frames)
        return sample_video(video, num_frames, sampling, fps, start_time, end_time, on_frame=progress.step)
