"""Long videos in bounded memory: a video file decoded, preprocessed and encoded a chunk at a time.

``encode_video`` reads a sampling plan's frames from the decoder a chunk at a time
(video.FrameStream), and hands each chunk to the model's vision side
(``VideoLLMAdapter.encode_chunks``): one chunk's frames and pixels exist at a time, and
what stays of the whole video is one encoded row per visual token (and Qwen3-VL's DeepStack
rows). Extract Attention takes the resulting ``EncodedVideo`` in place of frames; a second
question over it encodes nothing again.

Chunks are whole temporal patches (Qwen: 2 frames), and every family's tower attends within a
frame or a temporal patch, so the encoding equals one pass over all the frames (within float
tolerance; tests/test_streaming.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from .errors import AdaTPInputError
from .fits import DEFAULT_PREFILL_CHUNK, check_max_pixels, place_name, runtime_places
from .places import Places, place_stats
from .models.base import Encoded, VideoPlan, frame_times
from .video import FrameStream, SamplePlan, VideoInfo


@dataclass(frozen=True)
class EncodedVideo:
    """A video file's visual features, encoded a chunk at a time (``encode_video``).

    encoded: the vision side's output for every frame (the rows assemble() scatters into the prompt).
    plan: the video plan they were encoded with, its frame times those of the decoded frames.
    info: the decoded frames' account (Load Video's VideoInfo).
    frame_size: (width, height) the frames were decoded at.
    max_pixels: the pixel budget they were encoded with (fits.check_max_pixels' value).
    key: what identifies these frames for the prefix cache without their pixels: the file (path,
        device, inode, size, mtime), the decoded times and size and the decoder.
    owner: id() of the adapter that encoded them (a video is encoded for one model).
    stats: time_video_decode, time_preprocess, time_vision, frames_per_chunk, and where the rows wait
        (encoded_on: "host" or the device; encoded_reason, encoded_moved: places.place_stats).
    places: where the rows wait and where extract_attention puts layer K's rows (places.Places).
    """

    encoded: Encoded
    plan: VideoPlan
    info: VideoInfo
    frame_size: tuple[int, int]
    max_pixels: object
    key: tuple
    owner: int
    stats: dict = field(default_factory=dict)
    places: Places | None = None

    @property
    def num_frames(self) -> int:
        return self.plan.num_frames

    def check_model(self, adapter) -> None:
        if id(adapter) != self.owner:
            raise AdaTPInputError("this encoded video was encoded by another model (or before the model was "
                                  "reloaded); encode it again with this one")


class _TimedChunks:
    """Iterates ``chunks`` and adds the seconds spent getting each one to ``times[key]``."""

    def __init__(self, chunks, times: dict, key: str):
        self.chunks, self.times, self.key = chunks, times, key

    def __iter__(self):
        it = iter(self.chunks)
        while True:
            start = time.perf_counter()
            try:
                chunk = next(it)
            except StopIteration:
                self.times[self.key] = self.times.get(self.key, 0.0) + time.perf_counter() - start
                return
            self.times[self.key] = self.times.get(self.key, 0.0) + time.perf_counter() - start
            yield chunk


# The decoder of a stream: PyAV, in this process, decodes a frame when the next one is asked for.
# decord's child process (video.py's first choice for a whole decode) keeps decoding ahead while its
# reader is busy encoding a chunk: at 1024 frames of a 20-minute video its memory reached 1.5 GB,
# twice this process's whole peak (bench/RESULTS.md). Both are FFmpeg: the same frames.
STREAM_BACKEND = "pyav"


# Where no check placed the run (a direct call): a stand-in question for the prompt the placement weighs
# (the video's part of a prompt is the same for every question).
PLACE_QUESTION = "?"


def encode_video(model, sample: SamplePlan, max_pixels=None, chunk: int | None = None,
                 backend: str = STREAM_BACKEND, on_frame=None, encoded: str = "auto", layer: int = 2,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, places: Places | None = None) -> EncodedVideo:
    """Decode, preprocess and encode ``sample``'s frames a chunk at a time, for ``model``.

    sample: a video.SamplePlan (check it first: fits.check_video_fits, whose FitCheck.places to pass).
    max_pixels: as extract_attention's (None or 0: the pack's default; "model" or -1).
    chunk: frames per chunk (default: the adapter's FRAMES_PER_CHUNK), rounded up to whole temporal patches.
    backend: the decoder (video.BACKENDS; STREAM_BACKEND by default).
    places: where the visual and DeepStack rows wait (written there chunk by chunk as they are encoded)
        and layer K's rows will, as the check before decoding placed them. Without it they are placed
        here by the same planner (fits.runtime_places, from ``encoded``: "auto", "device" or "host",
        for a stand-in question's prompt at ``layer`` in calls of ``prefill_chunk`` tokens).
    A clip that turns out damaged (check_damage) is refused after its last chunk.
    """
    adapter = model.adapter
    max_pixels = check_max_pixels(max_pixels)
    width, height = sample.size
    plan = adapter.plan_video(sample.num_frames, height, width, times=sample.clip_times(), max_pixels=max_pixels)
    if places is None:
        places = runtime_places(adapter, adapter.build_prompt(PLACE_QUESTION, plan), adapter.resolve_layer(layer)[0],
                                plan.num_frames, (width, height), prefill_chunk, encoded=encoded)
    step = adapter.chunk_frames(plan, chunk)
    stream = FrameStream(sample, step, backend, on_frame)
    stats: dict = {"time_video_decode": 0.0, "time_preprocess": 0.0, "time_vision": 0.0}
    video = adapter.encode_chunks(_TimedChunks(stream, stats, "time_video_decode"), plan, stats,
                                  places.encoded.device)
    info = stream.info
    times, assumed = frame_times(plan.num_frames, info.timestamps)
    plan = replace(plan, frame_times=times, times_assumed=assumed)
    key = ("file", sample.path, sample.identity, tuple(info.timestamps), sample.size, info.backend)
    return EncodedVideo(encoded=video, plan=plan, info=info, frame_size=(width, height), max_pixels=max_pixels,
                        key=key, owner=id(adapter), places=places,
                        stats={**stats, "frames_per_chunk": step,
                               **place_stats("encoded", places.encoded, place_name(video.visual))})
