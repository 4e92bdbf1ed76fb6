"""4-bit and 8-bit loading through bitsandbytes (an optional extra: ``pip install ".[quant]"``).

Only the LLM's decoder layers are quantized. The vision side and ``lm_head`` stay
in the compute dtype, as other packs do: the vision tower is small, and quantizing
it or the head costs accuracy for little memory. Each adapter names those modules
(``VideoLLMAdapter.unquantized_modules``) as module-name prefixes from the top of
the transformers model.

AdaTP needs nothing else: the attention probe reads the rotated queries and keys
that the attention function receives, never a layer's weights, so it works the
same on bitsandbytes' Linear4bit/Linear8bitLt layers.
"""

from __future__ import annotations

import importlib
import importlib.metadata

import torch
from packaging.version import Version

from ..errors import AdaTPEnvironmentError, AdaTPInputError

# dtype choices that load through bitsandbytes, and their bit width.
QUANTIZED_DTYPES = {"bnb-4bit": 4, "bnb-8bit": 8}
# transformers needs 0.46.1; moving an 8-bit model between devices (keep_loaded off) needs 0.48.
BITSANDBYTES_MIN_VERSION = "0.48"
INSTALL_HINT = ('install it into ComfyUI\'s Python with pip install "bitsandbytes>=0.48" '
                '(or pip install "comfyui-adatp[quant]"), or pick bfloat16')


def check_bitsandbytes(choice: str, device: torch.device) -> None:
    """Refuse a bitsandbytes dtype where it cannot run: no CUDA GPU, a CPU device,
    bitsandbytes missing, broken or too old. Reads no weight."""
    if not torch.cuda.is_available():
        raise AdaTPEnvironmentError(
            f"dtype {choice} quantizes with bitsandbytes, which needs an NVIDIA GPU, and none is "
            "available; pick auto, bfloat16 or float32.")
    if device.type != "cuda":
        raise AdaTPInputError(
            f"dtype {choice} runs on the GPU only, but device {device} was chosen; set device to "
            "auto or cuda, or pick another dtype.")
    try:
        importlib.import_module("bitsandbytes")
    except Exception as exc:  # ImportError, or a broken install failing at import (missing CUDA libs)
        raise AdaTPEnvironmentError(
            f"dtype {choice} needs the bitsandbytes package, which cannot be imported "
            f"({type(exc).__name__}: {exc}); {INSTALL_HINT}.") from exc
    version = importlib.metadata.version("bitsandbytes")
    if Version(version) < Version(BITSANDBYTES_MIN_VERSION):
        raise AdaTPEnvironmentError(
            f"dtype {choice} needs bitsandbytes >= {BITSANDBYTES_MIN_VERSION}, "
            f"found {version}; {INSTALL_HINT}.")


def bitsandbytes_config(choice: str, compute_dtype: torch.dtype, skip_modules: tuple[str, ...]):
    """transformers' BitsAndBytesConfig for a QUANTIZED_DTYPES choice.

    4-bit: NF4 with double quantization, computing in ``compute_dtype`` (QLoRA's
    recipe). 8-bit: LLM.int8(). ``skip_modules`` stay unquantized in ``compute_dtype``.
    """
    from transformers import BitsAndBytesConfig

    bits = QUANTIZED_DTYPES[choice]
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=list(skip_modules))
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip_modules))
