"""ComfyUI's VIDEO classes for tests: the real ones when a ComfyUI checkout is importable
(ADATP_COMFYUI=/path/to/ComfyUI, with its requirements installed), else stand-ins that keep
their contract (comfy_api/latest/_input/video_types.py and _input_impl/video_types.py,
ComfyUI 0.3.64, and the trim and crop API of later releases). Written from ComfyUI's
behaviour, not copied from it.

- VideoInput: an ABC whose default get_stream_source() encodes the video into a BytesIO.
- VideoFromFile(file): a path or a BytesIO; get_stream_source() returns it (a BytesIO
  rewound), get_components() decodes every frame.
- VideoFromComponents(VideoComponents(images [T, H, W, 3], frame_rate Fraction)): frames in
  memory (Create Video); it has no stream of its own.
- TrimmedVideoFromFile: a later release's VideoFromFile with a trim window
  (get_active_trim_window) and a crop (as_cropped, get_dimensions of the crop).
"""

from __future__ import annotations

import io
import os
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from fractions import Fraction

import torch
from pack import pack_module


def real_classes():
    """(VideoFromFile, VideoFromComponents, VideoComponents) from ComfyUI, or None."""
    root = os.environ.get("ADATP_COMFYUI")
    if not root:
        return None
    sys.path.insert(0, root)
    try:
        from comfy_api.input_impl import VideoFromComponents, VideoFromFile
        from comfy_api.util import VideoComponents
    except ImportError:
        return None
    finally:
        sys.path.remove(root)
    return VideoFromFile, VideoFromComponents, VideoComponents


@dataclass
class VideoComponents:
    images: torch.Tensor
    frame_rate: Fraction
    audio: dict | None = None
    metadata: dict | None = None


class VideoInput(ABC):
    @abstractmethod
    def get_components(self) -> VideoComponents: ...

    @abstractmethod
    def save_to(self, path, format="auto", codec="auto", metadata=None): ...

    def get_stream_source(self):
        buffer = io.BytesIO()
        self.save_to(buffer)
        buffer.seek(0)
        return buffer

    def get_dimensions(self) -> tuple[int, int]:
        images = self.get_components().images
        return images.shape[2], images.shape[1]


class VideoFromFile(pack_module("nodes.headless").VideoFromFile, VideoInput):
    """The runner's stand-in (path or BytesIO, decoded only on request) as a VideoInput."""

    def save_to(self, path, format="auto", codec="auto", metadata=None):
        source = self.get_stream_source()
        data = source.read() if hasattr(source, "read") else open(source, "rb").read()
        if hasattr(path, "write"):
            path.write(data)
        else:
            with open(path, "wb") as out:
                out.write(data)


class VideoFromComponents(VideoInput):
    def __init__(self, components: VideoComponents):
        self._components = components

    def get_components(self) -> VideoComponents:
        c = self._components
        return VideoComponents(images=c.images, frame_rate=c.frame_rate, audio=c.audio)

    def save_to(self, path, format="auto", codec="auto", metadata=None):
        raise AssertionError("the pack must never encode a video held in memory")


class TrimmedVideoFromFile(VideoFromFile):
    """A later ComfyUI's VideoFromFile(file, start_time=, duration=, crop=)."""

    def __init__(self, file, start_time: float = 0.0, duration: float = 0.0, crop=None):
        super().__init__(file)
        self._trim, self._crop = (float(start_time), float(duration)), crop

    def get_active_trim_window(self) -> tuple[float, float]:
        return self._trim

    def get_dimensions(self) -> tuple[int, int]:
        return (self._crop[2], self._crop[3]) if self._crop else super().get_dimensions()

    def get_components(self) -> VideoComponents:
        c = super().get_components()
        rate = float(c.frame_rate)
        start, duration = self._trim
        first = round(start * rate)
        last = round((start + duration) * rate) if duration else c.images.shape[0]
        images = c.images[first:last]
        if self._crop:
            x, y, w, h = self._crop
            images = images[:, y:y + h, x:x + w]
        return VideoComponents(images=images, frame_rate=c.frame_rate)

    def as_cropped(self, x=0, y=0, width=0, height=0):
        return TrimmedVideoFromFile(self._file, *self._trim, crop=(x, y, width, height))
