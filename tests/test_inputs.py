"""Issue 32, items 4 and 5: floors on the settings that divide the logits, and a clear error for
every input a client controls (a ComfyUI server may be on a network: every node input is a
stranger's). Each case goes through the node functions, ComfyUI's own prompt validation (the
comfy_stub emulation of it), the headless runner or the command line, as a client would.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from comfy_stub import make_folder_paths
from pack import ROOT, load_pack, pack_module

from adatp_core import caption_cli, cli

FLOOR_MESSAGE = "at least 0.01"


@pytest.fixture(scope="module")
def pack(tiny_dir):
    import os

    os.environ["ADATP_CACHE_DIR"] = str(tiny_dir.parent)  # the built-in model is already built there
    return load_pack()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A ComfyUI layout (folder_paths from comfy_stub) with one clip folder, input/set."""
    from adatp_core.samples import sample_video

    bridge = pack_module("nodes.comfy_bridge")
    fp = make_folder_paths(tmp_path / "comfy")
    monkeypatch.setattr(bridge, "folder_paths", fp)
    monkeypatch.delenv("ADATP_CAPTION_ROOTS", raising=False)
    monkeypatch.setattr(pack_module("nodes.caption_folder"), "ROOTS_FILE", tmp_path / "no_roots.txt")
    inp = tmp_path / "comfy" / "input"
    (inp / "set").mkdir(parents=True)
    (inp / "set" / "a.mp4").write_bytes(sample_video().read_bytes())
    return inp


def node(name: str):
    return load_pack().NODE_CLASS_MAPPINGS[name]


def caption_args(model, folder="set", **changes):
    return {"model": model, "folder": folder, "prompt": "Describe.", "prefix": "", "suffix": "", "overwrite": False,
            "recursive": False, "frames": 2, "retention": 0.5, "layer": 2, "max_new_tokens": 2, **changes}


# ---------------------------------------------------------------------------------------
# 4. Floors on the settings that divide the logits
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["--repetition-penalty", "1e-40", "--do-sample"], ["--repetition-penalty", "1e-40"],
    ["--temperature", "1e-40", "--do-sample"], ["--temperature", "nan"], ["--repetition-penalty", "inf"],
])
def test_command_lines_refuse_tiny_values_before_the_model_loads(argv, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and FLOOR_MESSAGE in err
    (tmp_path / "clips").mkdir()
    monkeypatch.setattr(caption_cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert caption_cli.main([str(tmp_path / "clips"), *argv]) == 2
    assert FLOOR_MESSAGE in capsys.readouterr().err


def test_the_program_exits_2_with_a_message_and_no_traceback():
    out = subprocess.run([sys.executable, "-m", "adatp_core", "--repetition-penalty", "1e-40", "--do-sample"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "repetition_penalty must be" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------
# 5. Names: too long, not valid Unicode, not text
# ---------------------------------------------------------------------------------------
LONG = "a" * 256


@pytest.mark.parametrize("name, message", [
    (LONG, "has a part 256 bytes long"),
    ("set/" + LONG, "has a part 256 bytes long"),
    ("/" + LONG, "has a part 256 bytes long"),
    (LONG + " [output]", "has a part 265 bytes long"),
    ("é" * 128, "has a part 256 bytes long"),  # bytes, not characters
    ("/".join(["a" * 200] * 21), "at most 4096 bytes"),
    ("set\ud800", "lone surrogate"),
    ("\udcff", "lone surrogate"),
    ("\ud800 [output]", "lone surrogate"),
    (5, "must be text"),
])
def test_caption_folder_names(pack, server, tiny, name, message):
    cls = node("AdaTP_CaptionFolder")
    answer = cls.VALIDATE_INPUTS(name)
    assert answer is not True and message in answer
    with pytest.raises(ValueError, match=message):
        cls().caption(**caption_args(tiny, folder=name))
    assert cls.VALIDATE_INPUTS("set") is True
    assert "does not exist" in cls.VALIDATE_INPUTS("set/" + "b" * 255)  # 255 bytes make a name


@pytest.mark.parametrize("name, message", [(LONG + ".mp4", "has a part 260 bytes long"),
                                           ("clip\ud800.mp4", "lone surrogate")])
def test_load_video_names(pack, server, name, message):
    cls = node("AdaTP_LoadVideo")
    assert message in cls.VALIDATE_INPUTS(name)
    assert math.isnan(cls.IS_CHANGED(name))  # never an exception
    with pytest.raises(ValueError, match=message):
        cls().load(name, 4, "uniform", 1.0, 0.0, 0.0)


@pytest.mark.parametrize("name, message", [
    ("m" * 256, "has a part 256 bytes long"), ("model\ud800", "lone surrogate"),
])
def test_load_video_llm_names(pack, name, message):
    cls = node("AdaTP_LoadVideoLLM")
    assert message in cls.VALIDATE_INPUTS(name)
    with pytest.raises(ValueError, match=message):
        cls().load(name, "float32", "sdpa", "cpu", True)


def test_a_link_loop_in_the_input_folder_is_a_clear_error(pack, server):
    (server / "loop").symlink_to(server / "loop")
    (server / "loop.mp4").symlink_to(server / "loop.mp4")
    assert "link that cannot be followed" in node("AdaTP_CaptionFolder").VALIDATE_INPUTS("loop")
    assert "link that cannot be followed" in node("AdaTP_CaptionFolder").VALIDATE_INPUTS(str(server / "loop"))
    assert "link that cannot be followed" in node("AdaTP_LoadVideo").VALIDATE_INPUTS("loop.mp4")
