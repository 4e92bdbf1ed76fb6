"""The safe loader (tests/test_loader.py) on the tiny Qwen model folders, and its model-type dispatch."""

from __future__ import annotations

import json

import pytest
from qwen_fixtures import *  # noqa: F401,F403  (tiny_dir, tiny: the Qwen models)
from test_loader import *  # noqa: F401,F403  (the same tests)

from adatp_core.errors import AdaTPInputError
from adatp_core.models.loader import ADAPTERS, SUPPORTED_MODEL_TYPES, check_model_folder, load_video_llm
from adatp_core.models.qwen2_5_vl import Qwen2_5_VLAdapter
from adatp_core.models.qwen3_vl import Qwen3VLAdapter


def test_model_types_dispatch_to_their_adapters(family, tiny, tiny_dir):
    assert {"llava_onevision", "qwen2_5_vl", "qwen3_vl"} <= set(SUPPORTED_MODEL_TYPES)
    _, config = check_model_folder(tiny_dir)
    assert config["model_type"] == family
    expected = {"qwen2_5_vl": Qwen2_5_VLAdapter, "qwen3_vl": Qwen3VLAdapter}[family]
    assert ADAPTERS[family] is expected and type(tiny.adapter) is expected
    assert type(tiny.model).__name__ == expected.model_class


def test_mismatched_preprocessor_is_refused(tiny_dir, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    cfg = json.loads((folder / "video_preprocessor_config.json").read_text())
    cfg["patch_size"] = 7
    (folder / "video_preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdaTPInputError, match="patch sizes"):
        load_video_llm(folder, device="cpu")
