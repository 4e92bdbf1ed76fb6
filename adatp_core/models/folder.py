"""A model folder, checked without reading a weight: a config.json of a supported model type
(``ADAPTERS``: one adapter per family), asking for no custom code, safetensors weights only
(every shard present), a tokenizer, a video processor config and a chat template.

The loader checks a folder here before it loads one; the name resolver (names.py) to say
whether a local model is ready.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import AdaTPInputError
from ..paths import bare_name
from .base import VideoLLMAdapter
from .chat import folder_chat_template
from .files import PICKLE_SUFFIXES
from .llava_onevision import LlavaOnevisionAdapter
from .preprocess import read_video_processor_config
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen3_5 import Qwen3_5Adapter, Qwen3_5MoeAdapter, Qwen3VLMoeAdapter
from .qwen3_vl import Qwen3VLAdapter

ADAPTERS: dict[str, type[VideoLLMAdapter]] = {
    t: cls for cls in (LlavaOnevisionAdapter, Qwen2_5_VLAdapter, Qwen3VLAdapter, Qwen3_5Adapter,
                          Qwen3_5MoeAdapter, Qwen3VLMoeAdapter) for t in cls.model_types
}
SUPPORTED_MODEL_TYPES = tuple(sorted(ADAPTERS))


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
