"""Synthetic videos with known shot changes, for the tests and bench/shots.py.

Each shot is a textured scene of its own colours panning under a moving disc (so there
is motion inside a shot, as in real footage), and shots are joined by hard cuts,
dissolves or fades through black. ``write_synthetic`` streams the frames into the
encoder one at a time, so a twenty-minute source costs no more memory than a short
one, and returns where each shot begins (``Truth``).
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

TRANSITIONS = ("cut", "dissolve", "fade")


@dataclass(frozen=True)
class Boundary:
    """Where a shot begins: ``time`` is the first frame of the new shot for a cut, the middle
    of the transition for a dissolve or a fade (``length`` seconds long)."""

    time: float
    kind: str  # "cut" | "dissolve" | "fade"
    length: float = 0.0


@dataclass(frozen=True)
class Truth:
    path: Path
    fps: float
    duration: float
    frames: int
    boundaries: tuple[Boundary, ...]


class Scene:
    """One shot's look: a texture of two colours (stripes at an angle over soft blobs),
    panned along a path, under a disc that moves across it."""

    def __init__(self, index: int, width: int, height: int, seed: int, motion: float = 1.0, light: float = 0.0):
        rng = np.random.default_rng(seed * 7919 + index)
        hue = (index * 0.618034 + seed * 0.1) % 1.0
        a = np.array(colorsys.hsv_to_rgb(hue, 0.75, 0.9)) * 255
        b = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.5, 0.35 + 0.3 * rng.random())) * 255
        self.pan = max(8, int(width // 4 * max(1.0, motion)))
        self.light = light  # brightness swing inside the shot (0.2: +-20 %)
        th, tw = height + self.pan, width + self.pan
        yy, xx = np.mgrid[0:th, 0:tw].astype(np.float32)
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(6, 24)
        stripes = 0.5 + 0.5 * np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
        coarse = rng.random((th // 16 + 2, tw // 16 + 2)).astype(np.float32)
        blobs = np.kron(coarse, np.ones((16, 16), np.float32))[:th, :tw]
        mix = (0.6 * stripes + 0.4 * blobs)[..., None]
        self.texture = (a * mix + b * (1 - mix)).astype(np.uint8)
        self.disc = np.array(colorsys.hsv_to_rgb((hue + 0.25) % 1.0, 0.3, 1.0)) * 255
        self.speed = rng.uniform(0.5, 2.0) * motion  # pixels a frame
        self.width, self.height = width, height
        self.yy, self.xx = np.mgrid[0:height, 0:width]

    def frame(self, k: int) -> np.ndarray:
        span = self.pan
        ox = int(abs((k * self.speed) % (2 * span) - span))  # back and forth
        oy = int(abs((k * self.speed * 0.5) % (2 * span) - span))
        img = self.texture[oy:oy + self.height, ox:ox + self.width].copy()
        cx = self.width * (0.5 + 0.35 * math.sin(k * 0.05 * self.speed))
        cy = self.height * (0.5 + 0.3 * math.cos(k * 0.07))
        r = max(4, self.height // 8)
        img[(self.xx - cx) ** 2 + (self.yy - cy) ** 2 < r * r] = self.disc
        if self.light:
            img = np.clip(img * (1 + self.light * math.sin(k * 0.04)), 0, 255).astype(np.uint8)
        return img


def shot_plan(shots: int, seconds: float = 4.0, transitions=TRANSITIONS, transition_seconds: float = 1.0,
              seed: int = 0) -> list[tuple[float, str, float]]:
    """``shots`` shots of about ``seconds`` each (varied by a third), joined in turn by each of
    ``transitions``: [(shot seconds, how it begins, transition seconds)]."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(shots):
        kind = "start" if i == 0 else transitions[(i - 1) % len(transitions)]
        out.append((seconds * rng.uniform(0.67, 1.33), kind, 0.0 if kind in ("start", "cut") else transition_seconds))
    return out


def write_synthetic(path, plan: list[tuple[float, str, float]], *, fps: float = 24.0, width: int = 320,
                    height: int = 180, seed: int = 0, codec: str = "libx264", pix_fmt: str = "yuv420p",
                    rotation: int = 0, pts_jitter: bool = False, gop: int | None = None,
                    preset: str = "ultrafast", audio: bool = False, motion: float = 1.0,
                    light: float = 0.0, flashes: tuple[float, ...] = ()) -> Truth:
    """Write the shots of ``plan`` (see ``shot_plan``) to ``path``; return where each begins.

    A transition of L seconds is centred on the boundary: the outgoing shot's last L/2 seconds
    and the incoming shot's first L/2 seconds are blended (dissolve) or pass through black
    (fade). rotation: display-matrix rotation in degrees (the pixels stay as written).
    pts_jitter: variable frame rate (every third frame comes half a frame late).
    audio: an AAC sine tone track as long as the video. motion: how fast the camera pans and the
    disc moves (1: 0.5-2 pixels a frame; 8: a fast pan). light: the brightness swing inside a shot.
    flashes: times (seconds) of single blown-out frames (a camera flash), which are not shot changes.
    """
    import av

    path = Path(path)
    scenes = [Scene(i, width, height, seed, motion, light) for i in range(len(plan))]
    starts = np.cumsum([0.0] + [s for s, _, _ in plan])
    total = int(round(starts[-1] * fps))
    boundaries = []
    for i, (_, kind, length) in enumerate(plan[1:], 1):
        t = round(starts[i] * fps) / fps
        boundaries.append(Boundary(t, kind, length))
    bounds = [int(round(starts[i] * fps)) for i in range(len(plan) + 1)]
    rate = Fraction(fps).limit_denominator(1001)
    jitter_base = 2 if pts_jitter else 1
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec == "libx264":
            stream.options = {"preset": preset}
        if gop is not None:
            stream.codec_context.gop_size = gop
        stream.codec_context.time_base = 1 / (rate * jitter_base)
        if rotation:
            stream.set_display_rotation(rotation)
        sound = container.add_stream("aac", rate=16000) if audio else None
        sent = 0  # audio samples written
        shot = 0
        for k in range(total):
            while shot + 1 < len(plan) and k >= bounds[shot + 1]:
                shot += 1
            img = scenes[shot].frame(k - bounds[shot]).astype(np.float32)
            # the transitions around this frame: the one that begins this shot, the one that ends it
            for nb, other in ((shot, shot - 1), (shot + 1, shot + 1)):
                if nb <= 0 or nb >= len(plan) or plan[nb][1] not in ("dissolve", "fade"):
                    continue
                half = plan[nb][2] * fps / 2
                d = k - bounds[nb] + 0.5  # frames from the boundary (frame centres)
                if abs(d) >= half:
                    continue
                w = (d + half) / (2 * half)  # 0 -> 1 across the transition: weight of the incoming shot
                if plan[nb][1] == "dissolve":
                    o = scenes[other].frame(k - bounds[other]).astype(np.float32)
                    incoming = img if other < shot else o
                    outgoing = o if other < shot else img
                    img = outgoing * (1 - w) + incoming * w
                else:  # fade out to black then in
                    img = img * abs(2 * w - 1)
            if any(k == int(round(f * fps)) for f in flashes):
                img = img * 0.3 + 180
            frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
            frame.pts = k * jitter_base + (1 if pts_jitter and k % 3 == 2 else 0)
            for packet in stream.encode(frame):
                container.mux(packet)
            while sound is not None and sent < (k + 1) / fps * 16000:
                tone = np.sin(2 * np.pi * 440 * (sent + np.arange(1024)) / 16000).astype(np.float32)[None]
                chunk = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = 16000, sent
                sent += 1024
                for packet in sound.encode(chunk):
                    container.mux(packet)
        for s in (stream, sound) if sound is not None else (stream,):
            for packet in s.encode():
                container.mux(packet)
    return Truth(path, fps, total / fps, total, tuple(boundaries))


def damage(path, at: float, seconds: float = 0.5) -> None:
    """Overwrite the video packets of ``seconds`` from ``at`` with noise, in place: a corrupt region
    in the middle of a file, the rest intact."""
    import av

    spans = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            if packet.pts is not None and packet.pos is not None and packet.pos >= 0 and \
                    at <= float(packet.pts * packet.time_base) < at + seconds:
                spans.append((packet.pos, packet.size))
    noise = np.random.default_rng(0)
    with open(path, "r+b") as f:
        for pos, size in spans:
            f.seek(pos + min(8, size // 2))
            f.write(noise.integers(0, 256, max(size - 8, 1), dtype=np.uint8).tobytes())
