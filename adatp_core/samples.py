"""Synthetic videos: the pack's sample video and the small videos that tests make.

``python -m adatp_core.samples`` rewrites assets/sample_video.mp4 (shipped, so
the default workflow runs anywhere). It has three scenes with clear cuts, so
segmentation has something to find.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from .paths import default_cache_dir

SAMPLE_VIDEO = Path(__file__).resolve().parent.parent / "assets" / "sample_video.mp4"


def write_video(path, frames: np.ndarray, fps: float = 8.0, codec: str = "libx264",
                time_base_fps: float | None = None, pts: list[int] | None = None,
                gop: int | None = None) -> Path:
    """Encode uint8 frames [T, H, W, 3] (H, W even) into ``path`` with PyAV.

    pts: optional explicit presentation times in units of 1/time_base_fps, for
    variable-frame-rate test videos. gop: keyframe interval.
    """
    import av
    from fractions import Fraction

    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
        if pts is not None:
            stream.time_base = Fraction(1, int(time_base_fps or fps))
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            if pts is not None:
                frame.pts = pts[i]
                frame.time_base = stream.time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def scene_frames(num_frames: int = 96, width: int = 320, height: int = 240, scenes: int = 3) -> np.ndarray:
    """Frames of ``scenes`` visually distinct scenes, each with a moving shape."""
    backgrounds = [(30, 60, 160), (40, 140, 60), (25, 25, 30), (150, 90, 40)]
    shapes = [(220, 40, 40), (240, 220, 60), (235, 235, 235), (60, 200, 220)]
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    per_scene = max(1, -(-num_frames // scenes))
    for i in range(num_frames):
        s, k = divmod(i, per_scene)
        phase = k / per_scene
        img = frames[i]
        img[:] = backgrounds[s % len(backgrounds)]
        img[:, :, :] += (yy[..., None] * 40 // height).astype(np.uint8)  # vertical gradient
        cx, cy = int(40 + phase * (width - 80)), int(height / 2 + np.sin(phase * 6.28) * height / 4)
        if s % 2 == 0:  # a square
            img[max(cy - 20, 0):cy + 20, max(cx - 20, 0):cx + 20] = shapes[s % len(shapes)]
        else:  # a disc
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < 22 ** 2] = shapes[s % len(shapes)]
    return frames


def sample_video() -> Path:
    """The pack's sample video. Where the core is installed as a library
    (``pip install .``) the pack's assets folder is absent, so the same clip
    is written into the cache folder on first use."""
    if SAMPLE_VIDEO.is_file():
        return SAMPLE_VIDEO
    path = default_cache_dir() / SAMPLE_VIDEO.name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}-{os.getpid()}{path.suffix}")  # renamed into place: never half-written
        write_video(tmp, scene_frames(), fps=8.0)
        os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    out = Path(argv[0]) if argv else SAMPLE_VIDEO
    out.parent.mkdir(parents=True, exist_ok=True)
    write_video(out, scene_frames(), fps=8.0)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
