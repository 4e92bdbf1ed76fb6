"""AdaTP Load Video: sample frames from a video in the input directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..adatp_core.errors import AdaTPInputError
from ..adatp_core.paths import check_name, followed, inside
from ..adatp_core.samples import SAMPLE_VIDEO
from ..adatp_core.video import MAX_FRAMES, QWEN_VL_PRESET, SAMPLING_MODES, VIDEO_EXTENSIONS, load_video
from . import comfy_bridge as bridge
from .inputs import checked, validation

SAMPLE_NAME = "adatp_sample_video.mp4"


def ensure_sample_in_input() -> None:
    """Inside ComfyUI, put the pack's sample video into the input folder (once), so
    the frontend can preview it like any uploaded video."""
    if not bridge.in_comfyui():
        return
    target = bridge.input_directory() / SAMPLE_NAME
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(SAMPLE_VIDEO, target)
        except OSError:  # a read-only input folder: the built-in copy still resolves
            pass


def list_videos() -> list[str]:
    ensure_sample_in_input()
    root = bridge.input_directory()
    files = set()
    if root.is_dir():
        files = {f.name for f in root.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_EXTENSIONS}
    return [SAMPLE_NAME, *sorted(files - {SAMPLE_NAME})]


def input_path(name: str, what: str) -> tuple[Path, str]:
    """(the path that ``name`` means inside the input directory, symlinks resolved;
    the name without ComfyUI's " [input]" annotation): input_paths without the path as typed."""
    _, path, name = input_paths(name, what)
    return path, name


def input_paths(name: str, what: str) -> tuple[Path, Path, str]:
    """(the path as typed, made absolute in the input directory, links not followed; the same path
    with symlinks resolved; the name without ComfyUI's " [input]" annotation). Both inside the
    input directory.

    Refuses '..', absolute paths elsewhere, NUL bytes, URLs and names no file system
    takes (paths.check_name) without opening anything; ``what`` names the thing in
    messages ("video", "folder").
    """
    name = check_name(name, what)
    if not name or "\x00" in name:
        raise AdaTPInputError(f"the {what} name is empty or contains a NUL byte; pick a {what} from the list.")
    if "://" in name:
        raise AdaTPInputError(f"{name!r} is a URL; download the {what} into ComfyUI's input folder first.")
    if name.endswith(" [input]"):
        name = name[: -len(" [input]")]
    root = bridge.input_directory().resolve()
    typed = Path(os.path.abspath(root / name))  # checked before anything outside is touched (UNC on Windows)
    path = followed(typed, name, f"pick another {what}") if inside(root, typed) else typed
    if not inside(root, path):  # another drive (Windows) is outside too, not a bare ValueError
        raise AdaTPInputError(f"{name!r} points outside the input directory; put the {what} in {root}.")
    return typed, path, name


def resolve_video(name: str) -> Path:
    """The file a combo value names, inside the input directory (symlinks resolved).

    The sample's name falls back to the pack's own copy. Refuses '..', absolute
    paths elsewhere, NUL bytes and URLs without opening anything.
    """
    path, name = input_path(name, "video")
    # ComfyUI skips its "value not in list" check for inputs that VALIDATE_INPUTS names: the list
    # holds only video files in the input folder, so the same rule is applied here.
    if Path(name).suffix.lower() not in VIDEO_EXTENSIONS or path.suffix.lower() not in VIDEO_EXTENSIONS:
        raise AdaTPInputError(f"{name!r} is not a video file ({', '.join(VIDEO_EXTENSIONS)}); upload a video "
                              "or pick one from the list.")
    if not path.is_file():
        if name == SAMPLE_NAME:
            return SAMPLE_VIDEO
        raise AdaTPInputError(f"video {name!r} is not in {bridge.input_directory().resolve()}; "
                              "upload it or pick one from the list.")
    return path


class AdaTP_LoadVideo:
    DESCRIPTION = ("Samples frames from a video (decord, PyAV fallback) and decodes only those frames. "
                   "Works with frames from any loader too: Extract Attention takes any IMAGE batch.")
    CATEGORY = "AdaTP"
    RETURN_TYPES = ("IMAGE", "ADATP_VIDEO_INFO")
    RETURN_NAMES = ("frames", "video_info")
    OUTPUT_TOOLTIPS = ("The sampled frames, [T, H, W, 3].", "Source fps, duration, size and frame timestamps.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "video": (list_videos(), {"video_upload": True, "tooltip": "A video in ComfyUI's input folder "
                                                                     "(upload with the button); adatp_sample_video.mp4 ships with the pack."}),
            "num_frames": ("INT", {"default": 32, "min": 1, "max": MAX_FRAMES, "tooltip": (
                "Frames to sample (uniform), or the most frames to take (fps); not used by the Qwen-VL preset.")}),
            "sampling": (list(SAMPLING_MODES), {"default": "uniform", "tooltip": (
                "uniform: num_frames evenly spaced frames; fps: one frame every 1/fps seconds. "
                f"{QWEN_VL_PRESET}: as the video processor of Qwen3-VL, Qwen3.5 and Qwen3.6 samples (2 frames a "
                "second of the clip, at least 4 and at most 768, evenly spread; num_frames and fps not used). "
                "Many frames cost many visual tokens: see the README's tables.")}),
            "fps": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 240.0, "step": 0.1,
                              "tooltip": "Frames per second for fps sampling."}),
            "start_time": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e6, "step": 0.1,
                                     "tooltip": "Seconds from the start where sampling begins."}),
            "end_time": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e6, "step": 0.1,
                                   "tooltip": "Seconds where sampling ends; 0 means the end of the video."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, video=None):
        # Only `video` is named, so ComfyUI still range-checks the others; the core
        # re-checks every value anyway (headless runs skip ComfyUI's checks).
        return validation(cls, {"video": video}, lambda _, name: resolve_video(name))

    @classmethod
    def IS_CHANGED(cls, video, **_):
        try:
            return os.path.getmtime(resolve_video(video))
        except (AdaTPInputError, OSError):
            return float("nan")

    @checked
    def load(self, video, num_frames, sampling, fps, start_time, end_time):
        path = resolve_video(video)
        progress = bridge.Progress(num_frames)
        frames, info = load_video(path, num_frames, sampling, fps, start_time, end_time, on_frame=progress.step)
        return (frames, info)
