"""Placing a model too large for one GPU over all of them (the "multi-gpu" device).

accelerate computes a balanced device map from the model's shapes (on the meta
device: no weight is read), splitting only between decoder layers. The vision
side and the token embeddings, which the adapter calls piece by piece, are
pinned together on the first device, so a frame never crosses GPUs inside the
vision tower. The core then follows each layer's own device (models/base.py).
"""

from __future__ import annotations

import logging

import torch

from ..errors import AdaTPEnvironmentError

log = logging.getLogger(__name__)

SPLIT_DEVICE = "multi-gpu"
ADVICE = "use a smaller model, or dtype bnb-4bit to quarter the weights"
# What to suggest when even the chosen bitsandbytes width does not fit, by bit width.
QUANTIZED_ADVICE = {8: "use a smaller model, or dtype bnb-4bit to halve the weights again",
                    4: "use a smaller model, or more or larger GPUs"}
# transformers keeps 10% of each GPU free when it quantizes with bitsandbytes (buffers made
# while quantizing); the map is planned with the same margin.
QUANTIZED_MEMORY_SHARE = 0.9


def check_split_device() -> torch.device:
    """The input device of a split model (the first GPU); refuses without a GPU."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        raise AdaTPEnvironmentError(
            f"device {SPLIT_DEVICE} splits the model over the GPUs, and none is available; use auto or cpu.")
    if torch.cuda.device_count() == 1:
        log.info("device %s with one GPU: the model goes on it whole (and spills to CPU memory if "
                 "it does not fit)", SPLIT_DEVICE)
    return torch.device("cuda", 0)


def pin_together(device_map: dict, names: tuple[str, ...]) -> dict:
    """A copy of ``device_map`` with the modules or parameters ``names`` (and all
    under them) on the device of the first entry of the map."""
    if not device_map or not names:
        return dict(device_map)
    target = next(iter(device_map.values()))
    pinned = {}
    for key, device in device_map.items():
        if not any(key == name or key.startswith(name + ".") for name in names):
            pinned[key] = device
    for name in names:
        covering = [key for key in pinned if name.startswith(key + ".")]
        if covering and pinned[covering[0]] != target:
            raise AdaTPEnvironmentError(f"cannot place {name} with the vision side; {ADVICE}")
        if not covering:
            pinned[name] = target
    return pinned


def split_device_map(model_cls, config, dtype: torch.dtype, keep_together: tuple[str, ...],
                     max_memory: dict | None = None, quantization=None) -> dict:
    """A balanced device map of ``model_cls(config)`` over the GPUs (CPU memory as
    overflow), with ``keep_together`` on the first device.

    max_memory: accelerate's per-device budget ({0: "20GiB", "cpu": "60GiB"});
        None measures the free memory. Refuses a map that would need the disk.
    """
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory, get_max_memory

    with init_empty_weights():
        empty = model_cls(config)
    dtype, special_dtypes = quantized_sizes(empty, dtype, quantization)
    if quantization is not None:
        max_memory = {k: v if k == "cpu" else int(v * QUANTIZED_MEMORY_SHARE)
                      for k, v in get_max_memory(max_memory).items()}
    no_split = set(empty._no_split_modules or ())
    for name in keep_together:  # keep each whole module unsplit, whatever the class says
        try:
            no_split.add(type(empty.get_submodule(name)).__name__)
        except AttributeError:  # a parameter (LLaVA-OV's image_newline), placed by pin_together
            pass
    budget = get_balanced_memory(empty, max_memory=max_memory, no_split_module_classes=sorted(no_split),
                                 dtype=dtype, special_dtypes=special_dtypes)
    device_map = infer_auto_device_map(empty, max_memory=budget, no_split_module_classes=sorted(no_split),
                                       dtype=dtype, special_dtypes=special_dtypes)
    spilled = {v for v in device_map.values() if v in ("cpu", "disk")}
    if "disk" in spilled or (spilled and quantization is not None):
        why = "" if quantization is None else " (quantized layers cannot wait in CPU memory)"
        advice = ADVICE if quantization is None else QUANTIZED_ADVICE[_bits(quantization)]
        raise AdaTPEnvironmentError(f"the model does not fit in the GPUs' memory{why}; {advice}.")
    if spilled:
        log.warning("the model does not fit in the GPUs: some layers wait in CPU memory and run slowly")
    return pin_together(device_map, keep_together)


def _bits(quantization) -> int:
    return 4 if getattr(quantization, "load_in_4bit", False) else 8


def quantized_sizes(model: torch.nn.Module, dtype: torch.dtype, quantization):
    """(dtype, special_dtypes) with which accelerate sizes ``model``'s parameters.

    Without quantization: everything at ``dtype``. With bitsandbytes (a
    BitsAndBytesConfig): the weights of the Linear layers that get quantized at 4 or
    8 bits, and every other parameter (biases, norms, embeddings, the modules in
    ``llm_int8_skip_modules``: the vision side and lm_head) at the compute ``dtype``.
    Sizing all at ``dtype`` would count a 4-bit model four times over.
    """
    if quantization is None:
        return dtype, None
    from accelerate.utils import CustomDtype

    low = CustomDtype.INT4 if _bits(quantization) == 4 else torch.int8
    skip = tuple(getattr(quantization, "llm_int8_skip_modules", None) or ())
    special = {}
    for module_name, module in model.named_modules():
        quantized = isinstance(module, torch.nn.Linear) and not any(
            module_name == s or module_name.startswith(s + ".") for s in skip)
        for param_name, _ in module.named_parameters(recurse=False):
            if not (quantized and param_name == "weight"):
                special[f"{module_name}.{param_name}" if module_name else param_name] = dtype
    return low, special
