"""Safe loading of a local model folder into a ``VideoLLM`` handle.

Policy: local files only, safetensors only, never ``trust_remote_code``, and an
unsupported model type is refused from config.json alone, before any weight is
read. Downloading is never done here (see README: it is an explicit user step).
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..errors import AdaTPEnvironmentError, AdaTPInputError, AdaTPOutOfMemoryError, is_out_of_memory
from ..paths import bare_name
from ..prefix_cache import PrefixStore
from ..static_decode import StaticDecoders
from ..hf.attention_hook import register_attention, wrapped_attention_name
from ..hf.versions import DOCTOR, UNEXPECTED, raised_in_transformers, tested_range, transformers_error, warn_if_untested
from ..hf.versions import installed as installed_transformers
from .base import VideoLLMAdapter
from .chat import folder_chat_template
from .llava_onevision import LlavaOnevisionAdapter
from .placement import SPLIT_DEVICE, check_split_device, split_device_map
from .preprocess import read_video_processor_config
from .quantize import QUANTIZED_DTYPES, bitsandbytes_config, check_bitsandbytes
from .qwen2_5_vl import Qwen2_5_VLAdapter
from ..hf.kernels import FROM_PRETRAINED_KWARGS, load_hub_kernels
from ..hf.kernels import check_device as check_linear_kernels
from .qwen3_5 import Qwen3_5Adapter, Qwen3_5MoeAdapter, Qwen3VLMoeAdapter
from .qwen3_vl import Qwen3VLAdapter

log = logging.getLogger(__name__)

ADAPTERS: dict[str, type[VideoLLMAdapter]] = {
    t: cls for cls in (LlavaOnevisionAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter, Qwen3_5Adapter,
                          Qwen3_5MoeAdapter, Qwen3VLMoeAdapter) for t in cls.model_types
}
SUPPORTED_MODEL_TYPES = tuple(sorted(ADAPTERS))
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The attention choices a saved workflow may hold. Every one runs PyTorch's SDPA (see
# ``attention_kernel``): "flash_attention_2" stays accepted so that old workflows load.
ATTENTIONS = ("sdpa", "flash_attention_2")


@dataclass(frozen=True, eq=False)
class VideoLLM:
    """A loaded model: what the ADATP_MODEL socket carries.

    Holds no per-query or pruning setting; every stage gets those per call.
    """

    model: torch.nn.Module
    tokenizer: object
    adapter: VideoLLMAdapter
    name: str
    path: str
    compute_device: torch.device
    dtype: torch.dtype
    attention: str
    offload_device: torch.device | None = None  # None: keep the model loaded
    quantization: str | None = None  # a QUANTIZED_DTYPES choice (dtype is then the compute dtype)
    # Static decoding's buffers and CUDA graphs, reused across answers (static_decode.py).
    static_decoders: StaticDecoders = field(default_factory=StaticDecoders, repr=False)
    # Videos' question-independent prefills, reused by the next question (prefix_cache.py, attention.py).
    prefix_cache: PrefixStore = field(default_factory=PrefixStore, repr=False)

    @property
    def device(self) -> torch.device:
        """Where the weights are now (the compute device, or the offload device)."""
        return self.adapter.device

    def __repr__(self) -> str:
        precision = self.quantization or str(self.dtype).removeprefix("torch.")
        return f"VideoLLM({self.name!r}, {self.compute_device}, {precision})"


def activate(llm: VideoLLM) -> None:
    """Move the weights to the compute device if they were offloaded."""
    if llm.device != llm.compute_device:
        llm.model.to(llm.compute_device)


def release(llm: VideoLLM) -> bool:
    """Offload the weights if the model's policy says so. Returns whether it did."""
    if llm.offload_device is None or llm.device == llm.offload_device:
        return False
    llm.static_decoders.clear()  # their KV buffers live on the compute device
    llm.prefix_cache.clear()
    llm.model.to(llm.offload_device)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return True


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise AdaTPInputError(
            f"{folder} has no config.json; point the loader at a model folder downloaded "
            "from Hugging Face (for example llava-hf/llava-onevision-qwen2-0.5b-ov-hf).")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdaTPInputError(f"{path} is not valid JSON ({exc}); download it again.") from exc
    if not isinstance(config, dict):
        raise AdaTPInputError(f"{path} does not hold a JSON object; download it again.")
    return config


def _contains_auto_map(obj) -> bool:
    if isinstance(obj, dict):
        return "auto_map" in obj or any(_contains_auto_map(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_contains_auto_map(v) for v in obj)
    return False


def check_model_folder(folder) -> tuple[Path, dict]:
    """Validate a model folder without reading any weight. Returns (folder, config).

    Raises AdaTPInputError naming what is missing or refused, and what to do.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise AdaTPInputError(f"model folder {folder} does not exist; put the model under models/LLM.")
    config = _read_config(folder)
    if _contains_auto_map(config):
        raise AdaTPInputError(
            f"{folder}/config.json asks for custom code (auto_map); remote code is never run. "
            f"Use a transformers-native checkpoint of one of: {', '.join(SUPPORTED_MODEL_TYPES)}.")
    model_type = config.get("model_type")
    if model_type not in ADAPTERS:
        raise AdaTPInputError(
            f"model type {model_type!r} in {folder} is not supported; supported types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (for example llava-hf/llava-onevision-qwen2-7b-ov-hf).")
    _check_weights(folder)
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
    if not has_tokenizer:
        raise AdaTPInputError(
            f"{folder} has no tokenizer (tokenizer.json); copy the tokenizer files from the "
            "model's Hugging Face repository into the folder.")
    read_video_processor_config(folder)  # raises, naming the files it looked for
    if folder_chat_template(folder) is None:
        raise AdaTPInputError(
            f"{folder} has no chat template (chat_template.jinja or chat_template.json); copy it from the "
            "model's Hugging Face repository into the folder.")
    return folder, config


def _check_weights(folder: Path) -> None:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError, UnicodeDecodeError) as exc:
            raise AdaTPInputError(f"{index} is damaged ({exc}); download it again.") from exc
        # Only plain *.safetensors names in this folder: no path, no '..', no drive, no pickle.
        bad = sorted(repr(s) for s in shards if not (bare_name(s) and s.endswith(".safetensors")))
        if bad:
            raise AdaTPInputError(
                f"the weight index {index} names {', '.join(bad[:3])}: every weight_map entry must be the name "
                "of a .safetensors file in the model folder itself (no path, no pickle weights). "
                "Download the model again from its Hugging Face repository.")
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise AdaTPInputError(
                f"{folder} is missing weight shard(s) {', '.join(missing)}; the download is "
                "incomplete, download them again.")
        return
    if (folder / "model.safetensors").is_file():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdaTPInputError(
            f"{folder} only has pickle weights ({', '.join(pickles[:3])}); they are never loaded "
            "because unpickling can run arbitrary code. Download the safetensors version "
            "(model*.safetensors) of the model.")
    raise AdaTPInputError(f"{folder} has no model.safetensors weights; download the model again.")


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
        from .names import resolve_model_name

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
