"""Throwaway stand-ins for the `shots` helper's functions (adatp_core/clips/{shots,plan,cut}.py):
each one installed only while the real one is missing or still the skeleton's
``raise NotImplementedError``, on the real module and with its real dataclasses where they exist,
so the job is tested against the interface in /work/notes/clips_interface.md. Deleted once
`shots` has all of them."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


def _unimplemented(function) -> bool:
    import inspect

    try:
        return "raise NotImplementedError" in inspect.getsource(function)
    except (OSError, TypeError):
        return False


def _real(name: str, key: str):
    """The real module's class when it has one (the fakes build real dataclasses)."""
    return getattr(sys.modules[f"adatp_core.clips.{name}"], key)


def install() -> None:
    if getattr(sys.modules.get("adatp_core.clips.shots"), "_fakes_installed", False):
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from run_workflow import PACK_NAME
    from adatp_core.errors import AdaTPInputError

    @dataclass(frozen=True)
    class Shot:
        index: int
        start: float
        end: float
        transition: str

    def _frames(path):
        import av

        try:
            container = av.open(str(path))
            stream = container.streams.video[0]
        except Exception as exc:  # noqa: BLE001
            raise AdaTPInputError(f"{Path(path).name} is not a video this can read ({exc})") from None
        with container:
            for frame in container.decode(stream):
                yield float(frame.time), frame

    def detect_shots(path, *, threshold: float = 0.3, on_progress: Callable | None = None):
        times, cuts, last = [], [], None
        for t, frame in _frames(path):
            small = frame.to_ndarray(width=32, height=24, format="gray").astype(np.float32)
            if last is not None and np.abs(small - last).mean() / 255 > threshold * 0.5:
                cuts.append(t)
            last = small
            times.append(t)
        if not times:
            raise AdaTPInputError(f"{Path(path).name} has no frames")
        step = (times[-1] - times[0]) / max(len(times) - 1, 1) or 0.1
        duration = times[-1] + step
        bounds = [0.0, *cuts, duration]
        if on_progress:
            on_progress(duration, duration)
        shot = _real("shots", "Shot")
        return [shot(i, bounds[i], bounds[i + 1], "start" if i == 0 else "cut") for i in range(len(bounds) - 1)]

    @dataclass(frozen=True)
    class ClipRules:
        min_seconds: float = 1.0
        max_seconds: float = 5.0
        fps: float | None = 16.0
        frames: str = "4k+1"
        trim_frames: int = 0
        keep_short: bool = False
        max_side: int = 0

    @dataclass(frozen=True)
    class ClipPlan:
        source: Path
        shot: int
        index: int
        start: float
        frames: int
        fps: float
        width: int
        height: int
        name: str

        @property
        def end(self) -> float:
            return self.start + self.frames / self.fps

    def source_key(source: Path, root: Path | None) -> str:
        rel = Path(source).relative_to(root).as_posix() if root is not None else str(Path(source).resolve())
        return f"{Path(source).stem}-{hashlib.sha1(rel.encode()).hexdigest()[:6]}"

    def snap(n: int, rule: str) -> int:
        step = {"4k+1": 4, "8k+1": 8}.get(rule)
        return n if step is None else ((n - 1) // step) * step + 1

    def plan_clips(source, shots, rules, root=None):
        from adatp_core.video import probe_video

        probe = probe_video(source)
        fps = rules.fps or probe.fps
        w, h = probe.width, probe.height
        if rules.max_side and max(w, h) > rules.max_side:
            scale = rules.max_side / max(w, h)
            w, h = max(2, int(w * scale) // 2 * 2), max(2, int(h * scale) // 2 * 2)
        key, plans = source_key(source, root), []
        for shot in shots:
            first = math.ceil(shot.start * fps - 1e-6) + rules.trim_frames
            left = math.floor(shot.end * fps + 1e-6) - rules.trim_frames - first
            k = 0
            while left > 0:
                n = snap(min(left, int(rules.max_seconds * fps)), rules.frames)
                if n < 1 or (n < rules.min_seconds * fps and not rules.keep_short):
                    break
                start = first / fps
                plans.append(_real("plan", "ClipPlan")(Path(source), shot.index, k, start, n, fps, w, h,
                                      f"{key}_s{shot.index:03d}_{round(start * 1000):07d}-"
                                      f"{round((start + n / fps) * 1000):07d}"))
                first, left, k = first + n, left - n, k + 1
        return plans

    @dataclass(frozen=True)
    class CutResult:
        plan: ClipPlan
        path: Path | None
        skipped: bool
        error: str | None

    def cut_clips(source, plans, out_dir, *, mode="reencode", keep_audio=False, crf=18, on_clip=None):
        import os

        from adatp_core.samples import write_video

        decoded = list(_frames(source))
        results = []
        for p in plans:
            target = Path(out_dir) / f"{p.name}.mp4"
            if target.exists():
                result = _real("cut", "CutResult")(p, target, True, None)
            else:
                times = [p.start + (i + 0.5) / p.fps for i in range(p.frames)]
                pick = [max((f for f in decoded if f[0] <= t), key=lambda f: f[0], default=decoded[0])[1]
                        for t in times]
                frames = np.stack([f.to_ndarray(width=p.width, height=p.height, format="rgb24") for f in pick])
                tmp = Path(out_dir) / f".{p.name}.part.mp4"
                write_video(tmp, frames, fps=p.fps)
                os.replace(tmp, target)
                result = _real("cut", "CutResult")(p, target, False, None)
            results.append(result)
            if on_clip:
                on_clip(result)
        return results

    for name, values in (("shots", {"Shot": Shot, "detect_shots": detect_shots, "DEFAULT_THRESHOLD": 0.3}),
                         ("plan", {"ClipRules": ClipRules, "ClipPlan": ClipPlan, "plan_clips": plan_clips,
                                   "source_key": source_key, "FRAME_RULES": ("4k+1", "8k+1", "any")}),
                         ("cut", {"CutResult": CutResult, "cut_clips": cut_clips,
                                  "CUT_MODES": ("reencode", "copy")})):
        try:
            module = importlib.import_module(f"adatp_core.clips.{name}")
        except ModuleNotFoundError:
            module = types.ModuleType(f"adatp_core.clips.{name}")
            sys.modules[module.__name__] = module
        for key, value in values.items():
            current = getattr(module, key, None)
            if current is None or (callable(current) and not isinstance(current, type) and _unimplemented(current)):
                setattr(module, key, value)
        module._fakes_installed = True
        sys.modules[f"{PACK_NAME}.adatp_core.clips.{name}"] = module  # the pack as ComfyUI imports it
