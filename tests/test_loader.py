"""The safe loader: what it loads, and what it refuses before reading weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from adatp_core.errors import AdaTPInputError
from adatp_core.models.loader import check_model_folder, load_video_llm


@pytest.fixture
def copy_of(tiny_dir, tmp_path):
    def make():
        dst = tmp_path / "model"
        shutil.copytree(tiny_dir, dst)
        return dst
    return make


def test_round_trip_through_save_pretrained(tiny, tiny_dir):
    """The tiny model was saved with save_pretrained and loaded by the loader."""
    assert (tiny_dir / "model.safetensors").is_file()
    assert tiny.model.config.text_config._attn_implementation == "adatp_sdpa"
    assert tiny.model.config.vision_config._attn_implementation == "sdpa"
    assert tiny.dtype == torch.float32 and tiny.device.type == "cpu"


def test_unsupported_model_type_is_refused_before_weights(copy_of):
    folder = copy_of()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes(b"not even safetensors")
    with pytest.raises(AdaTPInputError, match="llava_onevision"):
        load_video_llm(folder, device="cpu")


def test_auto_map_is_refused(copy_of):
    folder = copy_of()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "evil.Model"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdaTPInputError, match="remote code"):
        check_model_folder(folder)


def test_pickle_only_weights_are_refused(copy_of):
    folder = copy_of()
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 pickle that must never be loaded")
    with pytest.raises(AdaTPInputError, match="pickle"):
        load_video_llm(folder, device="cpu")


def test_missing_config_and_tokenizer(copy_of, tmp_path):
    with pytest.raises(AdaTPInputError, match="does not exist"):
        check_model_folder(tmp_path / "absent")
    folder = copy_of()
    (folder / "tokenizer.json").unlink()
    with pytest.raises(AdaTPInputError, match="tokenizer"):
        check_model_folder(folder)
    (folder / "config.json").unlink()
    with pytest.raises(AdaTPInputError, match="config.json"):
        check_model_folder(folder)
