"""ComfyUI's facilities when they are importable, plain fallbacks when not.

Inside ComfyUI: folder_paths for the input directory and models/LLM,
comfy.model_management for the device, offloading, freeing VRAM and
interrupts, comfy.utils.ProgressBar for progress, and a ModelPatcher that hands
each loaded Video LLM to ComfyUI's model management (so "Unload models", "Free
memory" and other packs' memory requests release it). Outside (tests, the
headless runner): the runner's directories, "auto" device, a no-op progress bar
and an interrupt flag the runner can set.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import weakref
from pathlib import Path

import torch

from ..adatp_core.errors import AdaTPInterrupted
from ..adatp_core import runtime
from ..adatp_core.models import loader
from ..adatp_core.models.download import download_model

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
    import comfy.model_patcher as model_patcher  # type: ignore
except ImportError:
    model_patcher = None
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
        self.temp_dir: Path = Path(tempfile.gettempdir())
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


def temp_directory() -> Path:
    if folder_paths is not None:
        return Path(folder_paths.get_temp_directory())
    return HEADLESS.temp_dir


def has_video_type() -> bool:
    """Whether this ComfyUI has the VIDEO type (0.3.30 and later: core Load Video, Create Video,
    Save Video). Outside ComfyUI (tests, the headless runner) it is the runner's stand-in."""
    if folder_paths is None:
        return True
    try:
        from comfy_api.input import VideoInput  # type: ignore  # noqa: F401
    except ImportError:
        return False
    return True


def compute_device(choice: str) -> str | torch.device:
    """"auto" means ComfyUI's device inside ComfyUI, else CUDA when available. Always an
    indexed device ("cuda" is the current GPU, cuda:N): ComfyUI's model management
    matches models to devices by equality, and cuda != cuda:0. The split choice
    (placement.SPLIT_DEVICE) passes through."""
    if choice == loader.SPLIT_DEVICE:
        return choice
    if choice == "auto" and model_management is not None:
        return loader.resolve_device(model_management.get_torch_device())
    return loader.resolve_device(choice)


def offload_device() -> torch.device:
    if model_management is not None:
        return model_management.unet_offload_device()
    return torch.device("cpu")


def make_room(num_bytes: int, device) -> None:
    """Ask ComfyUI to unload its own models until ``num_bytes`` fit on ``device``."""
    device = loader.resolve_device(device)
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

    def set(self, value: int) -> None:
        """Move the bar to ``value`` of its total (progress that is not a count of steps)."""
        check_interrupt()
        if self.bar is not None:
            self.bar.update_absolute(value)


def download(repo_id: str) -> Path:
    """Download a catalog repository into the first LLM folder, with ComfyUI's progress bar
    in bytes and its Cancel button. Returns the model folder."""
    bar = None

    def on_progress(done: int, total: int) -> None:
        nonlocal bar
        if _ComfyProgressBar is not None:
            bar = bar or _ComfyProgressBar(max(total, 1))
            bar.update_absolute(done, max(total, 1))

    return download_model(repo_id, model_roots()[0], on_progress=on_progress, check_interrupt=check_interrupt)


# ----- ComfyUI model management ------------------------------------------------------------
# Each loaded VideoLLM gets a ModelPatcher that ComfyUI's model management tracks like its
# own models: it frees the VRAM (moves the weights to the offload device) on "Unload models",
# "Free memory" and whenever another model needs room, and the next stage loads it back.
# The patcher lives as long as the VideoLLM does (weak keys), so dropping the node's output
# drops the weights too.
_PATCHERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _WeightsHolder(torch.nn.Module):
    """What the patcher holds: the transformers model, under a module that accepts the
    ``device`` attribute ComfyUI sets (a transformers model's ``device`` is read-only)."""

    def __init__(self, model: torch.nn.Module, static_decoders, prefix_cache=None):
        super().__init__()
        self.llm = model
        self.static_decoders = static_decoders  # the VideoLLM's (static_decode.StaticDecoders)
        self.prefix_cache = prefix_cache  # the VideoLLM's (cache.PrefixStore)


def _weights_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _movable(llm) -> bool:
    """Whether the whole model can move between devices with .to() (not split, not quantized)."""
    device_map = getattr(llm.model, "hf_device_map", None) or {}
    return len(set(map(str, device_map.values()))) <= 1 and not getattr(llm.model, "is_quantized", False)


_PATCHER_CLASS = None


def _patcher_class():
    """A ModelPatcher that always moves the whole model: partial (lowvram) loading only works
    for ComfyUI's own layers, which cast their weights on the fly."""
    global _PATCHER_CLASS
    if _PATCHER_CLASS is None:
        class VideoLLMPatcher(model_patcher.ModelPatcher):
            def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
                device_to = device_to if device_to is not None else self.load_device
                self.model.to(device_to)
                self.model.device = device_to
                self.model.model_lowvram = False
                self.model.lowvram_patch_counter = 0
                self.model.model_loaded_weight_memory = self.model_size()
                self.model.current_weight_patches_uuid = self.patches_uuid

            def detach(self, unpatch_all=True):
                # Static decoding's buffers and CUDA graphs are sized for this model, and the videos'
                # prefixes sit on its compute device: free them when the weights go. ComfyUI also
                # detaches a loaded model with unpatch_all=False before every load_models_gpu of it
                # (it is its own clone); the weights stay, and so does what was kept for them.
                if unpatch_all:
                    self.model.static_decoders.clear()
                    if self.model.prefix_cache is not None:
                        self.model.prefix_cache.clear()
                return super().detach(unpatch_all)

            def partially_unload(self, device_to, memory_to_free=0):
                freed = self.loaded_size()
                self.detach()
                return freed

        _PATCHER_CLASS = VideoLLMPatcher
    return _PATCHER_CLASS


def manage(llm) -> None:
    """Hand a freshly loaded model to ComfyUI's model management (no-op outside ComfyUI)."""
    if model_management is None or model_patcher is None:
        return
    if not _movable(llm):
        log.info("%s is split over devices or quantized: ComfyUI's model management does not move it; "
                 "it is freed when its Load Video LLM output is (Free memory, or a new model)", llm.name)
        return
    holder = _WeightsHolder(llm.model, llm.static_decoders, llm.prefix_cache)
    holder.device = llm.device
    patcher = _patcher_class()(holder, load_device=llm.compute_device, offload_device=offload_device(),
                               size=_weights_bytes(llm.model))
    holder.model_loaded_weight_memory = patcher.model_size() if llm.device == llm.compute_device else 0
    holder.current_weight_patches_uuid = patcher.patches_uuid
    _PATCHERS[llm] = patcher
    model_management.load_models_gpu([patcher])


def activate(llm) -> None:
    """Put the weights on the compute device before a stage runs (ComfyUI makes room first)."""
    patcher = _PATCHERS.get(llm)
    if patcher is not None:
        model_management.load_models_gpu([patcher])
    else:
        runtime.activate(llm)


def release(llm) -> bool:
    """After an answer: offload the weights if keep_loaded is off. Returns whether it did."""
    patcher = _PATCHERS.get(llm)
    if patcher is None:
        return runtime.release(llm)
    if llm.offload_device is None or patcher.loaded_size() == 0:
        return False
    patcher.detach()
    return True
