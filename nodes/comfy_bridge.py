"""ComfyUI's facilities when they are importable, plain fallbacks when not.

Inside ComfyUI: folder_paths for the input directory and models/LLM,
comfy.model_management for the device, offloading, freeing VRAM and
interrupts, comfy.utils.ProgressBar for progress. Outside (tests, the headless
runner): the runner's directories, "auto" device, a no-op progress bar and an
interrupt flag the runner can set.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

from ..adatp_core.errors import AdaTPInterrupted

log = logging.getLogger(__name__)

try:  # ComfyUI's modules; absent in tests and headless runs
    import folder_paths  # type: ignore
except ImportError:
    folder_paths = None
try:
    import comfy.model_management as model_management  # type: ignore
except ImportError:
    model_management = None
try:
    from comfy.utils import ProgressBar as _ComfyProgressBar  # type: ignore
except ImportError:
    _ComfyProgressBar = None

LLM_FOLDER = "LLM"
PACK_DIR = Path(__file__).resolve().parent.parent


class HeadlessSettings:
    """Directories and the interrupt flag used when ComfyUI is not running."""

    def __init__(self):
        self.input_dir: Path = Path.cwd() / "input"
        self.output_dir: Path = Path.cwd() / "output"
        self.model_dirs: list[Path] = [Path.cwd() / "models" / LLM_FOLDER]
        self.interrupt = threading.Event()


HEADLESS = HeadlessSettings()


def in_comfyui() -> bool:
    return folder_paths is not None


def register_model_folder() -> None:
    """Add models/LLM to ComfyUI's model folders (extra_model_paths.yaml may add more)."""
    if folder_paths is not None:
        folder_paths.add_model_folder_path(LLM_FOLDER, os.path.join(folder_paths.models_dir, LLM_FOLDER))


def model_roots() -> list[Path]:
    if folder_paths is not None:
        try:
            return [Path(p) for p in folder_paths.get_folder_paths(LLM_FOLDER)]
        except KeyError:
            return [Path(folder_paths.models_dir) / LLM_FOLDER]
    return list(HEADLESS.model_dirs)


def input_directory() -> Path:
    if folder_paths is not None:
        return Path(folder_paths.get_input_directory())
    return HEADLESS.input_dir


def output_directory() -> Path:
    if folder_paths is not None:
        return Path(folder_paths.get_output_directory())
    return HEADLESS.output_dir


def compute_device(choice: str) -> str | torch.device:
    """"auto" means ComfyUI's device inside ComfyUI, else CUDA when available."""
    if choice == "auto" and model_management is not None:
        return model_management.get_torch_device()
    return choice


def offload_device() -> torch.device:
    if model_management is not None:
        return model_management.unet_offload_device()
    return torch.device("cpu")


def make_room(num_bytes: int, device) -> None:
    """Ask ComfyUI to unload its own models until ``num_bytes`` fit on ``device``."""
    device = torch.device(device)
    if model_management is not None and device.type != "cpu":
        model_management.free_memory(num_bytes, device)


def soft_empty_cache() -> None:
    if model_management is not None:
        model_management.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_interrupt() -> None:
    """Raise if the user pressed Cancel (ComfyUI) or the runner was interrupted."""
    if model_management is not None:
        model_management.throw_exception_if_processing_interrupted()
    elif HEADLESS.interrupt.is_set():
        HEADLESS.interrupt.clear()
        raise AdaTPInterrupted("interrupted")


class Progress:
    """ComfyUI's progress bar when available; also checks for interrupts."""

    def __init__(self, total: int):
        self.bar = _ComfyProgressBar(total) if _ComfyProgressBar is not None else None

    def step(self, *_args) -> None:
        check_interrupt()
        if self.bar is not None:
            self.bar.update(1)
