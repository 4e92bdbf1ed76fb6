"""The training-set layouts a clips job writes, chosen by name (``--layout``):

- ``txt``: ``videos/NAME.txt`` beside each ``videos/NAME.mp4`` (musubi-tuner, diffusion-pipe,
  ai-toolkit, SimpleTuner). The caption run itself writes these; nothing more to do here.
- ``finetrainers``: ``prompts.txt`` and ``videos.txt``, line n of one for line n of the other
  (``videos/NAME.mp4``, relative to the output folder, finetrainers' data_root).
- ``jsonl``: ``clips.jsonl``, one object per captioned clip: ``video_path`` and ``caption``
  (musubi-tuner's JSONL dataset), then ``path`` (relative), ``source`` (with ``source_b64``, its exact bytes,
  when its path is not UTF-8), ``shot``, ``clip``,
  ``start``, ``end`` (seconds on the source), ``frames``, ``fps``, ``width``, ``height``: what the
  clip's file holds (the cut's record of it; copy mode's clips start at a keyframe, at the source's
  rate and size), the plan's values for a clip cut before that was recorded.
- ``srt`` / ``vtt``: ``subtitles/KEY.srt`` and ``.vtt`` per source: one cue per shot that has a
  captioned clip, spanning the shot, with its clips' captions (chapters, scene descriptions); a
  source with no captioned clip has none (an earlier one is removed).

Every file is written atomically (caption's write_atomic) and only when its text changes, so a
rerun that changes nothing writes nothing. Only clips with a caption are listed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..caption.files import name_record, shown, write_atomic  # not the package: it loads the model side (torch)

JSONL_NAME = "clips.jsonl"
PROMPTS_NAME, VIDEOS_NAME = "prompts.txt", "videos.txt"
SUBTITLES_FOLDER = "subtitles"
LAYOUT_FILES = {"jsonl": (JSONL_NAME,), "finetrainers": (PROMPTS_NAME, VIDEOS_NAME)}  # files in OUT, by layout


@dataclass(frozen=True)
class DatasetClip:
    """One clip on disk: its plan (a ClipPlan), its file, its caption (None: none yet), and what
    the file holds (cut.MADE_FIELDS; None: not known, the plan's values stand in)."""

    plan: object
    path: Path
    caption: str | None
    made: dict | None = None

    def value(self, name: str):
        """What the clip's file holds for ``name`` (start, frames, fps, width, height), else the plan's."""
        if self.made is not None and self.made.get(name) is not None:
            return self.made[name]
        return getattr(self.plan, name)


@dataclass(frozen=True)
class DatasetSource:
    """One source of the dataset: how it is shown, its path, its key, its shots, its clips."""

    name: str
    path: str
    key: str
    shots: list
    clips: list


def one_line(text: str) -> str:
    """A caption on one line (line-based formats): every run of white space becomes one space."""
    return " ".join(text.split())


def readable(obj):
    """``obj`` (dicts, lists, text) with every text valid Unicode (caption's ``shown``: a file name's
    undecodable bytes as \\xNN), so it can be written as UTF-8 JSON or printed."""
    if isinstance(obj, str):
        return shown(obj)
    if isinstance(obj, dict):
        return {readable(k): readable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [readable(v) for v in obj]
    return obj


def source_fields(path: str) -> dict:
    """``source`` (readable) and, when the path is not valid UTF-8, ``source_b64`` (its exact bytes),
    as the caption manifest gives ``path`` and ``path_b64``."""
    return {k.replace("path", "source"): v for k, v in name_record(str(path)).items()}


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` atomically unless it already holds exactly that; True if written."""
    try:
        with open(path, "rb") as f:
            if f.read(len(text.encode("utf-8")) + 1) == text.encode("utf-8"):
                return False
    except OSError:
        pass
    write_atomic(path, text)
    return True


def clip_record(out: Path, clip: DatasetClip, source: DatasetSource) -> dict:
    """The clip as its file holds it (copy mode's clips start at a keyframe, at the source's rate and size)."""
    p = clip.plan
    start, frames, fps = clip.value("start"), clip.value("frames"), clip.value("fps")
    return {"video_path": str(Path(os.path.abspath(clip.path))), "caption": clip.caption,
            "path": clip.path.relative_to(out).as_posix(), **source_fields(source.path), "shot": p.shot,
            "clip": p.index,
            "start": round(start, 6), "end": round(start + frames / fps, 6), "frames": frames, "fps": fps,
            "width": clip.value("width"), "height": clip.value("height")}


def jsonl_text(out: Path, sources: list[DatasetSource]) -> str:
    return "".join(json.dumps(clip_record(out, c, s), ensure_ascii=False, allow_nan=False) + "\n"
                   for s in sources for c in s.clips if c.caption is not None)


def finetrainers_texts(out: Path, sources: list[DatasetSource]) -> tuple[str, str]:
    clips = [c for s in sources for c in s.clips if c.caption is not None]
    return ("".join(one_line(c.caption) + "\n" for c in clips),
            "".join(c.path.relative_to(out).as_posix() + "\n" for c in clips))


def timestamp(seconds: float, mark: str) -> str:
    """HH:MM:SS,mmm (SRT, mark ",") or HH:MM:SS.mmm (WebVTT, mark ".")."""
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{mark}{ms:03d}"


def cues(source: DatasetSource) -> list[tuple[float, float, str]]:
    """(start, end, text) per shot with a captioned clip: the shot's span, its clips' captions
    one a line (a blank line would end the cue)."""
    by_shot: dict[int, list[str]] = {}
    for c in source.clips:
        if c.caption is not None and one_line(c.caption):
            by_shot.setdefault(c.plan.shot, []).append(one_line(c.caption))
    return [(s.start, s.end, "\n".join(by_shot[s.index])) for s in source.shots if s.index in by_shot]


def srt_text(source: DatasetSource) -> str:
    return "".join(f"{i}\n{timestamp(a, ',')} --> {timestamp(b, ',')}\n{text.replace('-->', '->')}\n\n"
                   for i, (a, b, text) in enumerate(cues(source), start=1))


def vtt_text(source: DatasetSource) -> str:
    body = "".join(f"shot-{i}\n{timestamp(a, '.')} --> {timestamp(b, '.')}\n{text.replace('-->', '->')}\n\n"
                   for i, (a, b, text) in enumerate(cues(source), start=1))
    return "WEBVTT\n\n" + body


def write_outputs(out: Path, sources: list[DatasetSource], layouts) -> list[Path]:
    """Write ``layouts`` for ``sources`` under ``out``; the files written (changed) this time."""
    files: dict[Path, str] = {}
    if "jsonl" in layouts:
        files[out / JSONL_NAME] = jsonl_text(out, sources)
    if "finetrainers" in layouts:
        files[out / PROMPTS_NAME], files[out / VIDEOS_NAME] = finetrainers_texts(out, sources)
    for kind, text_of in (("srt", srt_text), ("vtt", vtt_text)):
        if kind in layouts:
            for s in sources:
                path = out / SUBTITLES_FOLDER / f"{s.key}.{kind}"
                if cues(s):
                    files[path] = text_of(s)
                elif os.path.isfile(path) and not os.path.islink(path):  # its captioned clips are gone
                    os.unlink(path)
    written = []
    for path, text in files.items():
        try:
            if write_if_changed(path, text):
                written.append(path)
        except OSError as exc:  # the error names write_atomic's temp file: name the file it was for
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
    return written
