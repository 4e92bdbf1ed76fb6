"""AdaTP Load Video LLM: a model folder under models/LLM, a catalog model (downloaded on
first use), or the built-in tiny model."""

from __future__ import annotations

import logging
from pathlib import Path

from ..adatp_core.errors import AdaTPInputError
from ..adatp_core.models.catalog import DOWNLOAD_MARK, catalog, entry_from_label
from ..adatp_core.models.download import is_model_folder
from ..adatp_core.models import names
from ..adatp_core.models.loader import ATTENTIONS, DTYPES, load_video_llm
from ..adatp_core.models.placement import SPLIT_DEVICE
from ..adatp_core.models.quantize import QUANTIZED_DTYPES
from ..adatp_core.models.tiny import TINY_MODEL_NAME, ensure_tiny_model
from ..adatp_core.paths import bare_name, check_name
from . import comfy_bridge as bridge
from .inputs import checked, validation

log = logging.getLogger(__name__)

BUILTIN_TINY = names.BUILTIN_TINY  # the command line takes the same names (models/names.py)
# The other built-in tiny models, by their name in the list.
BUILTIN_TINY_QWEN = {name: build for name, (build, _, _) in names.BUILTINS.items() if name != BUILTIN_TINY}
DEVICES = ("auto", "cuda", "cpu", SPLIT_DEVICE)


def list_models() -> list[str]:
    """The built-in tiny model, every folder with a config.json under each models/LLM root,
    then the catalog models that are not downloaded yet ("⬇ owner/name (size)")."""
    names = set()
    for root in bridge.model_roots():
        if root.is_dir():
            # Hidden folders are never listed: a download in progress lives in one.
            names.update(p.name for p in root.iterdir() if not p.name.startswith(".") and is_model_folder(p))
    downloadable = [e.label for e in catalog() if e.folder_name not in names]
    return [BUILTIN_TINY, *BUILTIN_TINY_QWEN, *sorted(names), *downloadable]


def local_folder(name: str) -> Path | None:
    return next((root / name for root in bridge.model_roots() if is_model_folder(root / name)), None)


def resolve_model(name: str, download: bool = False) -> Path:
    """The folder of a model named in the combo; only direct children of a models/LLM root.

    A catalog entry resolves to its local copy; without one it is downloaded into the
    first models/LLM root when ``download`` is set (the node runs), else refused. A name no
    file system takes is refused first (paths.check_name).
    """
    name = check_name(name, "model")
    if name == BUILTIN_TINY:
        return ensure_tiny_model()
    if name in BUILTIN_TINY_QWEN:
        return BUILTIN_TINY_QWEN[name]()
    if name.startswith(DOWNLOAD_MARK):
        entry = entry_from_label(name)
        if entry is None:
            raise AdaTPInputError(f"{name!r} is not in the model catalog (any more); pick another model.")
        folder = local_folder(entry.folder_name)
        if folder is None and not download:
            raise AdaTPInputError(f"{entry.repo_id} is not downloaded yet.")
        return folder or bridge.download(entry.repo_id)
    if not bare_name(name) or name.startswith("."):  # no '/', '\\', ':' (C:name on Windows), '..' or NUL
        raise AdaTPInputError(f"model {name!r} is not a folder name under models/LLM; pick one from the list.")
    folder = local_folder(name)
    if folder is not None:
        return folder
    roots = ", ".join(str(r) for r in bridge.model_roots())
    raise AdaTPInputError(f"model folder {name!r} was not found under {roots}; download it there "
                          "(see the README) and press Refresh.")


def _check_model(name: str) -> None:
    """Load Video LLM's validation: a built-in or a catalog entry is good (a download happens when
    the node runs); any other name must be a model folder now."""
    if name not in (BUILTIN_TINY, *BUILTIN_TINY_QWEN) and not (name.startswith(DOWNLOAD_MARK) and entry_from_label(name)):
        resolve_model(name)


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


class AdaTP_LoadVideoLLM:
    DESCRIPTION = ("Loads a Video LLM (LLaVA-OneVision, Qwen2.5-VL or Qwen3-VL) from a folder under models/LLM: "
                   "local files only, safetensors only, no remote code. Entries marked \u2b07 are catalog models: "
                   "picking one downloads it (safetensors and config files only) into the first models/LLM folder "
                   "on its first run. The built-in tiny models have random weights and need no download: use them "
                   "to try the pack.")
    CATEGORY = "AdaTP"
    RETURN_TYPES = ("ADATP_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded model, for Extract Attention.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (list_models(), {"tooltip": "A model folder under models/LLM (for example "
                                                 "llava-onevision-qwen2-7b-ov-hf), a \u2b07 catalog model (downloaded "
                                                 "on first run, size shown), or a built-in tiny model."}),
            "dtype": (["auto", *DTYPES, *QUANTIZED_DTYPES], {
                "default": "auto", "tooltip": "Weight precision. auto: bfloat16 on recent GPUs, float16 on older "
                                              "ones, float32 on CPU. bnb-4bit / bnb-8bit: the LLM quantized with "
                                              "bitsandbytes (NVIDIA GPU and the bitsandbytes package needed), "
                                              "about 1/3 / 1/2 of the memory; the vision tower stays 16-bit."}),
            "attention": (list(ATTENTIONS), {"default": "sdpa", "tooltip": "Attention kernel: PyTorch's SDPA "
                                                                           "(its built-in FlashAttention-2 kernel where it applies). "
                                                                           "flash_attention_2 is kept for older workflows and runs "
                                                                           "as sdpa."}),
            "device": (list(DEVICES), {"default": "auto", "tooltip": "auto: ComfyUI's device (the GPU when "
                                                                     "there is one). multi-gpu: split a model too "
                                                                     "large for one card over all GPUs (stays loaded)."}),
            "keep_loaded": ("BOOLEAN", {"default": True, "tooltip": "Keep the model on the GPU between runs "
                                                                    "(ComfyUI still unloads it when memory is needed or on "
                                                                    "Unload models). Off: move it to the offload device after "
                                                                    "each answer."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model=None):
        return validation(cls, {"model": model}, lambda _, name: _check_model(name))

    @checked
    def load(self, model, dtype, attention, device, keep_loaded):
        folder = resolve_model(model, download=True)
        dev = bridge.compute_device(device)
        room_on = "cuda:0" if dev == SPLIT_DEVICE else dev  # split: its first GPU; else an indexed device
        bridge.make_room(weights_bytes(folder), room_on)
        llm = load_video_llm(folder, device=dev, dtype=dtype, attention=attention,
                             name=TINY_MODEL_NAME if model == BUILTIN_TINY else folder.name,
                             offload_device=None if keep_loaded else bridge.offload_device())
        bridge.manage(llm)
        return (llm,)
