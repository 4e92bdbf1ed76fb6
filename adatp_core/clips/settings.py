"""A clips job's settings (``ClipsJob``): the sources, the output folder and its layout (the clips in
OUT/videos, the state in OUT/.adatp), the clip rules, the cut, the caption settings and the layouts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..caption import DEFAULT_PROMPT, CaptionJob, OptionError
from ..caption.files import printable
from ..paths import inside, resolved
from ..pipeline import PipelineConfig
from .cut import check_cut
from .outputs import LAYOUT_FILES, SUBTITLES_FOLDER
from .plan import ClipPlan, ClipRules
from .shots import check_threshold

CLIPS_FOLDER = "videos"  # OUT/videos: the clips (finetrainers' videos.txt lists them as videos/NAME.mp4)
STATE_FOLDER = ".adatp"  # OUT/.adatp: per-source plans, and the captions when no .txt layout is asked for
CLIP_SUFFIX = ".mp4"
LAYOUTS = ("txt", "finetrainers", "jsonl", "srt", "vtt")
DEFAULT_LAYOUTS = ("txt", "jsonl", "srt", "vtt")


@dataclass(frozen=True)
class ClipsJob:
    """A clips job. sources: files or folders (folders listed like the caption command's,
    with ``recursive``). out: the dataset folder. threshold: None for detect_shots' default.
    The caption fields are CaptionJob's. root: every source found in a folder must resolve
    inside it, and out_root every clip and caption (the node); None: any path (the CLI)."""

    sources: tuple
    out: Path
    rules: ClipRules = field(default_factory=ClipRules)
    threshold: float | None = None
    cut: str = "reencode"
    keep_audio: bool = False
    crf: int = 18
    layouts: tuple = DEFAULT_LAYOUTS
    recursive: bool = False
    prompt: str = DEFAULT_PROMPT
    prefix: str = ""
    suffix: str = ""
    overwrite: bool = False
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    workers: int = 2
    processes: bool = True
    batch_size: int = 1
    root: Path | None = None
    out_root: Path | None = None  # the clips and captions must resolve inside it (the node); None: any

    def __post_init__(self):
        if not str(self.out).strip():  # Path("") is "."; the dataset would land in the current folder
            raise OptionError("out", "the output folder is empty text; give a folder for the dataset")
        if any(not str(s).strip() for s in self.sources):
            raise OptionError("sources", "a source is empty text (which would be the current folder); give the "
                                         "videos or folders of videos")
        object.__setattr__(self, "sources", tuple(Path(s).expanduser() for s in self.sources))
        object.__setattr__(self, "out", Path(self.out).expanduser())
        if not self.sources:
            raise OptionError("sources", "no sources: give one or more videos or folders of videos")
        layouts = tuple(dict.fromkeys(self.layouts))
        unknown = [x for x in layouts if x not in LAYOUTS]
        if unknown or not layouts:
            raise OptionError("layout", f"layouts must be some of {', '.join(LAYOUTS)}, got {list(self.layouts)!r}")
        object.__setattr__(self, "layouts", layouts)
        check_cut(self.cut, self.crf)
        if self.threshold is not None:
            check_threshold(self.threshold)
        for parent in (self.out, *self.out.parents):
            if parent.exists() or parent.is_symlink():
                if not parent.is_dir():
                    raise OptionError("out", f"{printable(str(parent))} is a file, not a folder; give a folder "
                                             "for the clips.")
                break
        if self.out_root is not None:  # the node: nothing under the output folder may lead out of its root
            for folder in self.folders():
                if not inside(resolved(self.out_root), resolved(folder)):
                    raise OptionError("out", f"{printable(str(folder))} leads outside {printable(str(self.out_root))} "
                                             "(a link); remove the link or choose another output folder.")
        self.check_obstacles()

    def folders(self) -> tuple:
        """Every folder the job writes in: the node checks each resolves inside its output root."""
        return (self.out, self.clips_dir, self.state_dir, self.state_dir / "sources", self.state_dir / "replaced",
                self.state_dir / "replaced" / "captions", self.state_dir / "captions", self.caption_dir,
                self.out / SUBTITLES_FOLDER)

    def check_obstacles(self) -> None:
        """OptionError("out") naming what in the output folder is in the way: a file where the job
        keeps a folder, or a folder where a layout writes its file."""
        folders = {self.clips_dir: "the clips", self.state_dir: "its records", self.out / SUBTITLES_FOLDER:
                   "the subtitles", self.state_dir / "sources": "each source's record",
                   self.state_dir / "replaced": "the clips it sets aside", self.caption_dir: "the captions"}
        for folder, what in folders.items():
            if os.path.lexists(folder) and not folder.is_dir():
                raise OptionError("out", f"{printable(str(folder))} is a file, where the job keeps {what} in a "
                                         "folder; move or remove it, or choose another output folder.")
        if (self.state_dir / "sources").is_dir():  # a source's journals: met mid-run, they stopped the whole job
            with os.scandir(self.state_dir / "sources") as entries:
                for entry in entries:
                    if entry.name.endswith((".made.jsonl", ".aside.jsonl")) and not entry.is_file():
                        raise OptionError("out", f"{printable(entry.path)} is not a file, where the job keeps a "
                                                 "source's notes of its clips in one; move or remove it, or choose "
                                                 "another output folder.")
        files = [n for layout, names in LAYOUT_FILES.items() if layout in self.layouts for n in names]
        for name in files:
            if (self.out / name).is_dir():
                raise OptionError("out", f"{printable(str(self.out / name))} is a folder, where the layouts write a "
                                         "file; move or remove it, or choose another output folder.")

    @property
    def clips_dir(self) -> Path:
        return self.out / CLIPS_FOLDER

    @property
    def state_dir(self) -> Path:
        return self.out / STATE_FOLDER

    @property
    def caption_dir(self) -> Path:
        """Where each clip's caption (NAME.txt) is kept: beside the clip with the txt layout,
        else in the state folder (the other layouts are written from it)."""
        return self.clips_dir if "txt" in self.layouts else self.state_dir / "captions"

    def caption_job(self) -> CaptionJob:
        """The caption run over the clips folder, with this job's caption settings."""
        self.clips_dir.mkdir(parents=True, exist_ok=True)
        return CaptionJob(folder=self.clips_dir, out=None if "txt" in self.layouts else self.caption_dir,
                          prompt=self.prompt, prefix=self.prefix, suffix=self.suffix, overwrite=self.overwrite,
                          pipeline=self.pipeline, workers=self.workers, processes=self.processes,
                          root=self.out_root, batch_size=self.batch_size)


def parse_layouts(text: str) -> tuple:
    """'txt,jsonl' -> ("txt", "jsonl"); 'all' -> every layout. OptionError("layout") for others."""
    names = tuple(v.strip().lower() for v in str(text).split(",") if v.strip())
    if names == ("all",):
        return LAYOUTS
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown or not names:
        raise OptionError("layout", f"{text!r}: give some of {', '.join(LAYOUTS)} separated by commas, or 'all'")
    return names


def clip_path(job: ClipsJob, clip: ClipPlan) -> Path:
    return job.clips_dir / f"{clip.name}{CLIP_SUFFIX}"


def cut_settings(job: ClipsJob) -> dict:
    """What the cut settings make of a clip's file (crf only matters when re-encoding)."""
    return {"mode": job.cut, "crf": job.crf if job.cut == "reencode" else None, "keep_audio": job.keep_audio}
