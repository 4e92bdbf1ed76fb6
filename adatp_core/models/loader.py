"""Safe loading of a local model folder into a ``VideoLLM`` handle.

Policy: local files only, safetensors only, never ``trust_remote_code``, and an
unsupported model type is refused from config.json alone, before any weight is
read. Downloading is never done here (see README: it is an explicit user step).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..errors import AdaTPEnvironmentError, AdaTPInputError, AdaTPOutOfMemoryError, is_out_of_memory
from ..hf.attention_hook import register_attention, wrapped_attention_name
from ..hf.kernels import FROM_PRETRAINED_KWARGS, load_hub_kernels
from ..hf.kernels import check_device as check_linear_kernels
from ..hf.versions import DOCTOR, UNEXPECTED, raised_in_transformers, tested_range, transformers_error, warn_if_untested
from ..hf.versions import installed as installed_transformers
from ..runtime import VideoLLM
from ..runtime import activate, release  # noqa: F401  (their home is runtime.py; they stay importable from here)
from .folder import ADAPTERS, check_model_folder
from .folder import SUPPORTED_MODEL_TYPES  # noqa: F401  (its home is folder.py; it stays importable from here)
from .names import resolve_model_name
from .placement import SPLIT_DEVICE, check_split_device, split_device_map
from .quantize import QUANTIZED_DTYPES, bitsandbytes_config, check_bitsandbytes

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The attention choices a saved workflow may hold. Every one runs PyTorch's SDPA (see
# ``attention_kernel``): "flash_attention_2" stays accepted so that old workflows load.
ATTENTIONS = ("sdpa", "flash_attention_2")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The device to load on, always indexed on CUDA ("cuda" is the current GPU,
    cuda:N): ComfyUI's model management compares devices, and cuda != cuda:0."""
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise AdaTPInputError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise AdaTPInputError(f"device {device!r} cannot run a model; use auto, cpu, cuda, cuda:N or mps")
    for kind, name in (("mps", "Apple MPS"), ("xpu", "Intel XPU")):
        backend = getattr(torch.backends, kind, None) if kind == "mps" else getattr(torch, kind, None)
        if dev.type == kind and not (backend is not None and backend.is_available()):
            raise AdaTPEnvironmentError(f"device {kind} was asked for but no {name} device is available; use cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise AdaTPEnvironmentError("device cuda was asked for but no CUDA GPU is available; use cpu")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (Ampere and later). Pre-Ampere
    GPUs (T4, V100, RTX 20xx) only emulate it: slow GEMMs, and SDPA falls back to the
    math kernel, O(L^2) memory in prefill. ``torch.cuda.is_bf16_supported()`` counts
    emulation unless told not to (older torch has no such argument), and it asks
    about the current GPU only."""
    if torch.version.hip:
        return bool(torch.cuda.is_bf16_supported())
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index == torch.cuda.current_device():
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # an older torch: ask the compute capability, as it does
            pass
    return tuple(torch.cuda.get_device_capability(index)) >= (8, 0)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if native_bf16(device) else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise AdaTPInputError(f"unknown dtype {dtype!r}; use auto, {', '.join((*DTYPES, *QUANTIZED_DTYPES))}")
    return DTYPES[dtype]


def attention_kernel(choice: str) -> str:
    """The attention implementation that runs for an ATTENTIONS choice: always "sdpa".

    "flash_attention_2" cannot run through AdaTP's wrapper: transformers sends any
    implementation name containing "flash" to its hub-kernel loader, not to the
    installed flash-attn, and static decoding's 4-D bool mask would reach flash's
    unpadding path, whose host sync fails a CUDA graph capture. PyTorch's SDPA already
    runs its own FlashAttention-2 kernel where it applies (prefill and default
    decoding in fp16/bf16 on Ampere and later); static steps use its memory-efficient
    kernel (sdpa.py). A saved workflow holding flash_attention_2 loads, with a log line.
    """
    if choice not in ATTENTIONS:
        raise AdaTPInputError(f"unknown attention {choice!r}; use one of {', '.join(ATTENTIONS)}")
    if choice != "sdpa":
        log.warning("attention %s runs as sdpa (PyTorch's SDPA, which uses its built-in FlashAttention-2 "
                    "kernel where it applies); the flash-attn package is not used", choice)
    return "sdpa"


# Words in a from_pretrained error that point at the files, not at the environment.
_WEIGHT_ERROR_WORDS = ("safetensors", "size mismatch", "shape", "checkpoint", "header", "deserializ",
                       "weight", "incomplete", "truncated", "no such file", "corrupt")


# Errors of code, never of the downloaded files: from from_pretrained they count only when
# transformers' own code raised them (versions.raised_in_transformers); elsewhere they are bugs, raised as they are.
_CODE_ERRORS = (AttributeError, TypeError, NotImplementedError)


def _load_error(folder: Path, family: str, exc: BaseException) -> Exception:
    """The pack's error for a failed from_pretrained: damaged or incomplete weights
    (download them again); transformers' own code failing (versions.transformers_error: the
    family, the installed and tested versions, what to do); or anything else (bitsandbytes,
    an attention implementation, the driver), which downloading again would not fix either."""
    detail = f"{type(exc).__name__}: {str(exc)[:300]}"
    text = str(exc).lower()
    if isinstance(exc, (SafetensorError, OSError, pickle.UnpicklingError)) or (
            not isinstance(exc, _CODE_ERRORS) and any(word in text for word in _WEIGHT_ERROR_WORDS)):
        return AdaTPInputError(f"the weights in {folder} cannot be loaded ({detail}); "
                               "the download may be incomplete or damaged: download them again.")
    if isinstance(exc, UNEXPECTED) and raised_in_transformers(exc):
        return transformers_error(exc, family, f"building the model from {folder.name} (not a problem with "
                                               "the downloaded files)")
    return AdaTPEnvironmentError(
        f"transformers {installed_transformers()} cannot build {folder.name} ({detail}). This is not a "
        "problem with the downloaded files: check the installed transformers, torch and bitsandbytes "
        f"versions against the pack's requirements (transformers tested: {tested_range()}; run "
        f"`{DOCTOR}`), or pick dtype auto and attention sdpa.")


def load_video_llm(folder, device="auto", dtype="auto", attention: str = "sdpa",
                   name: str | None = None, offload_device=None) -> VideoLLM:
    """Load a model safely. See the module docstring for the policy.

    folder: a directory with config.json, model*.safetensors, the tokenizer, a
        chat template and a video preprocessor config; or a model name (names.py):
        a built-in tiny model, a folder under a models root, or a catalog repository
        id, downloaded on first use with the node's rules (the only download done here,
        and only when named so).
    attention: an ATTENTIONS choice. Every layer runs PyTorch's SDPA (``attention_kernel``);
        the text model gets AdaTP's wrapper of it, which can score one layer per call.
    offload_device: where ``release`` moves the weights between runs (None: keep loaded).
    """
    if not (isinstance(folder, Path) or Path(str(folder)).expanduser().is_dir()):
        resolved = resolve_model_name(str(folder))
        folder, name = resolved.folder, name or resolved.name
    folder, config = check_model_folder(folder)
    kernel = attention_kernel(attention)
    split = isinstance(device, str) and device == SPLIT_DEVICE  # over every GPU; dev is the first
    dev = check_split_device() if split else resolve_device(device)
    adapter_cls = ADAPTERS[config["model_type"]]
    warn_if_untested()  # once per process, outside the tested transformers range
    quantization = None
    if dtype in QUANTIZED_DTYPES:  # refused here, before any weight is read, where it cannot run
        check_bitsandbytes(dtype, dev)
        torch_dtype = resolve_dtype("auto", dev)
        quantization = bitsandbytes_config(dtype, torch_dtype, adapter_cls.unquantized_modules)
    else:
        torch_dtype = resolve_dtype(dtype, dev)
    import transformers
    from transformers import AutoTokenizer

    model_cls = getattr(transformers, adapter_cls.model_class)
    if adapter_cls.linear_attention:  # before any weight is read, from what the imported class runs:
        check_linear_kernels(dev.type)  # a kernel package that fails to import is not used

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise AdaTPInputError(f"the tokenizer in {folder} cannot be loaded ({exc}); download it again.") from exc
    register_attention(kernel)
    device_map = {"": dev} if dev.type == "cuda" else None
    if split:
        model_config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        device_map = split_device_map(model_cls, model_config, torch_dtype, adapter_cls.input_modules,
                                      quantization=quantization)
        if offload_device is not None:
            log.warning("a model split over GPUs stays loaded (keep_loaded off is not supported for it)")
            offload_device = None
    try:
        model = model_cls.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False, use_safetensors=True,
            dtype=torch_dtype, device_map=device_map,
            attn_implementation={"text_config": wrapped_attention_name(kernel),
                                 "vision_config": kernel, "": kernel},
            quantization_config=quantization, **FROM_PRETRAINED_KWARGS,  # no code fetched at load
        )
    except (OSError, SafetensorError, pickle.UnpicklingError, RuntimeError, *UNEXPECTED) as exc:
        if is_out_of_memory(exc):  # torch.OutOfMemoryError, and the driver's "CUDA error: out of memory"
            raise AdaTPOutOfMemoryError(
                f"not enough {dev.type} memory to load {folder.name}; free memory or use a smaller model") from exc
        if isinstance(exc, _CODE_ERRORS) and not raised_in_transformers(exc):
            raise
        raise _load_error(folder, config["model_type"], exc) from exc
    if device_map is None:  # else placed already (and bitsandbytes refuses some moves)
        model = model.to(dev)
    model.eval()
    load_hub_kernels(model, dev.type)  # only where the server owner opted in (hf/kernels.py)
    adapter = adapter_cls(model, tokenizer, folder)
    log.info("loaded %s on %s as %s", folder.name, SPLIT_DEVICE if split else dev,
             dtype if quantization is not None else torch_dtype)
    return VideoLLM(model=model, tokenizer=tokenizer, adapter=adapter, name=name or folder.name,
                    path=str(folder), compute_device=dev, dtype=torch_dtype, attention=kernel,
                    offload_device=torch.device(offload_device) if offload_device is not None else None,
                    quantization=dtype if quantization is not None else None)
