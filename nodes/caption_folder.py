"""AdaTP Caption Folder: a caption .txt beside every clip of a folder (video LoRA datasets)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ..adatp_core.batching import MAX_BATCH_SIZE
from ..adatp_core.caption import DEFAULT_PROMPT, CaptionJob, caption_folder
from ..adatp_core.errors import AdaTPInputError
from ..adatp_core.runtime import activate, release
from ..adatp_core.paths import check_inside, check_name, inside, resolved
from ..adatp_core.pipeline import PipelineConfig
from ..adatp_core.samples import SAMPLE_VIDEO
from ..adatp_core.sampling import WIDGETS, settings_text, widget_sampling
from ..adatp_core.video import MAX_FRAMES
from . import comfy_bridge as bridge
from .inputs import checked, validation
from .load_video import SAMPLE_NAME, input_path

log = logging.getLogger(__name__)

SAMPLE_FOLDER = "adatp_caption_samples"
ROOTS_ENV = "ADATP_CAPTION_ROOTS"  # extra folders a server owner allows (os.pathsep-separated)
ROOTS_FILE = bridge.PACK_DIR / "caption_roots.txt"  # the same, one folder a line (not in git)
DECODE_WORKERS = 2


def ensure_sample_folder(folder: Path) -> None:
    """The shipped workflow's folder: the pack's sample video in a folder of its own."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / SAMPLE_NAME).exists():
            shutil.copyfile(SAMPLE_VIDEO, folder / SAMPLE_NAME)
    except OSError as exc:
        raise AdaTPInputError(f"cannot create the sample folder {folder} ({exc}); type a folder of your clips.") from exc


OUTPUT_MARK = " [output]"  # ComfyUI's annotation for a name in the output folder ("video [output]")


def caption_roots() -> list[Path]:
    """The folders Caption Folder may read and write: ComfyUI's input and output
    directories (Save Video's clips are in the output one), then the server owner's extra
    roots: ADATP_CAPTION_ROOTS (absolute folders separated by os.pathsep) and the lines of
    caption_roots.txt in the pack's folder. Never a node input, a ComfyUI setting or anything
    under the user folder: clients can change those.
    A file-system root or a relative path is ignored with a warning."""
    extra = os.environ.get(ROOTS_ENV, "").split(os.pathsep)
    try:
        extra += [line.split("#", 1)[0] for line in ROOTS_FILE.read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("cannot read %s (%s); only the input directory is allowed", ROOTS_FILE, exc)
    roots = [bridge.input_directory(), bridge.output_directory()]
    for entry in (e.strip() for e in extra):
        if not entry:
            continue
        path = Path(entry).expanduser()
        if not path.is_absolute() or path == Path(path.anchor):
            log.warning("ignoring caption root %r: give an absolute folder that is not a file-system root", entry)
            continue
        roots.append(path)
    return roots


def resolve_folder(name: str) -> Path:
    """A folder under ComfyUI's input directory (the Load Video rules: no '..', no
    symlink out), ``NAME [output]`` under its output directory (Save Video's clips), or an
    absolute path inside one of ``caption_roots()``. Names no file system takes are refused
    first (paths.check_name), without opening anything."""
    name = check_name(name, "folder").strip()
    if name.startswith("~"):  # the same answer for every user name
        raise AdaTPInputError(f"{name!r}: '~' is not expanded here; give a folder under ComfyUI's input "
                              "directory or an absolute path inside a folder the server owner allowed.")
    if "\x00" not in name and name.endswith(OUTPUT_MARK):
        sub = name[: -len(OUTPUT_MARK)].strip()
        path = check_inside([bridge.output_directory()], bridge.output_directory() / sub, "node", shown=name)
    elif name and "\x00" not in name and Path(name).is_absolute():
        path = check_inside(caption_roots(), name, "node", shown=name)
    else:
        path, name = input_path(name, "folder")
        if name == SAMPLE_FOLDER and not path.exists():
            ensure_sample_folder(path)
    if not path.is_dir():
        raise AdaTPInputError(f"clip folder {name!r} does not exist ({path}); give a folder under ComfyUI's "
                              "input directory or an absolute path inside a folder the server owner allowed.")
    return path


def root_of(path: Path) -> Path:
    """The caption root that holds ``path`` (resolve_folder has checked there is one)."""
    return next(r for r in caption_roots() if inside(resolved(r), path))


class AdaTP_CaptionFolder:
    DESCRIPTION = ("Captions every video clip in a folder with AdaTP and writes clip.txt beside clip.mp4 "
                   "(prefix + caption + suffix, for video LoRA training). Clips that already have a .txt are "
                   "skipped unless overwrite is on, so a stopped run continues where it stopped. Frames of the "
                   "next clips are decoded while the model works, and up to batch_size captions are decoded "
                   "together. Cancel stops between steps and keeps what is written.")
    CATEGORY = "AdaTP"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("captions", "summary")
    OUTPUT_IS_LIST = (True, False)
    OUTPUT_TOOLTIPS = ("Every clip's caption (written now or found), one list item per clip, in file order.",
                       "Clips captioned, skipped and failed (with reasons), clips per minute.")
    OUTPUT_NODE = True
    FUNCTION = "caption"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("ADATP_MODEL", {"tooltip": "From Load Video LLM."}),
            "folder": ("STRING", {"default": SAMPLE_FOLDER, "tooltip": "A folder under ComfyUI's input directory, "
                                  "NAME [output] for one under its output directory (Save Video's clips: "
                                  "video [output]), or an absolute path inside a folder the server owner allowed "
                                  "(README). adatp_caption_samples holds the pack's sample video."}),
            "prompt": ("STRING", {"multiline": True, "default": DEFAULT_PROMPT,
                                  "tooltip": "The captioning instruction given with every clip."}),
            "prefix": ("STRING", {"default": "", "tooltip": "Put before every caption: a trigger word, "
                                                           "for example 'mystyle, '."}),
            "suffix": ("STRING", {"default": "", "tooltip": "Put after every caption."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Caption clips that already have a .txt "
                                                                   "again. Off: skip them (resume)."}),
            "recursive": ("BOOLEAN", {"default": False, "tooltip": "Include clips in subfolders; each .txt goes "
                                                                   "beside its clip."}),
            "frames": ("INT", {"default": 32, "min": 1, "max": MAX_FRAMES,
                               "tooltip": "Frames sampled uniformly from each clip."}),
            "retention": ("FLOAT", {"default": 0.25, "min": 0.01, "max": 1.0, "step": 0.01,
                                    "tooltip": "Fraction of visual tokens kept (1.0: the vanilla model)."}),
            "layer": ("INT", {"default": 2, "min": 0, "max": 128, "tooltip": "K: prune after this many LLM "
                                                                             "layers (0: before the LLM)."}),
        }, "optional": {
            "max_new_tokens": ("INT", {"default": 256, "min": 1, "max": 8192,
                                       "tooltip": "The longest caption, in tokens."}),
            **WIDGETS,  # repetition_penalty, top_k: the model's unless set; sampling as the model says
            "save_caption": ("BOOLEAN", {"default": True, "tooltip": "Write each caption as clip.txt beside its "
                                         "clip. For clips made in ComfyUI, point folder at Save Video's folder "
                                         "('video [output]'): the captions land beside them in the output folder. "
                                         "Off: only output the captions, write nothing."}),
            "batch_size": ("INT", {"default": 0, "min": 0, "max": MAX_BATCH_SIZE,
                                   "tooltip": "Clips decoded together: many times the clips per minute on a "
                                              "GPU, the same captions. 0: auto (from free memory); 1: one at a "
                                              "time."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, folder=None, repetition_penalty=None):
        # repetition_penalty: a tiny one passes ComfyUI's range check (0 is the model's); naming it skips
        # that check, which validation() then makes itself.
        def check(name, value):
            return resolve_folder(value) if name == "folder" else widget_sampling(repetition_penalty=value)

        return validation(cls, {"folder": folder, "repetition_penalty": repetition_penalty}, check)

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")  # the folder's contents may change between runs

    @checked
    def caption(self, model, folder, prompt, prefix, suffix, overwrite, recursive, frames, retention, layer,
                max_new_tokens=256, repetition_penalty=0.0, top_k=-1, save_caption=True, batch_size=0):
        sampling = widget_sampling(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty, top_k=top_k)
        cfg = PipelineConfig(num_frames=frames, layer=layer, retention=retention, generation=sampling)
        path = resolve_folder(folder)
        job = CaptionJob(folder=path, prompt=prompt, prefix=prefix, suffix=suffix,
                         overwrite=overwrite, recursive=recursive, pipeline=cfg, workers=DECODE_WORKERS,
                         processes=False,  # threads: spawned processes would re-import ComfyUI's main.py
                         root=root_of(path), save=save_caption, batch_size=batch_size)
        progress = {}
        bridge.check_interrupt()
        activate(model)
        try:
            summary = caption_folder(
                model, job, on_plan=lambda n: progress.setdefault("bar", bridge.Progress(n)),
                on_clip=lambda *_: progress["bar"].step(), on_step=bridge.check_interrupt)
        finally:
            if release(model):
                bridge.soft_empty_cache()
        effective = sampling.resolve(getattr(model.model, "generation_config", None)).settings()
        text = f"{summary.text()}\nGeneration: {settings_text(effective)} (unset: the model's generation_config.json)"
        if summary.model_error:
            raise RuntimeError(text)
        captions = list(summary.captions.values())
        return {"ui": {"text": [text]}, "result": (captions, text)}
