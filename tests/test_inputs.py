"""Issue 32, items 4 and 5: floors on the settings that divide the logits, and a clear error for
every input a client controls (a ComfyUI server may be on a network: every node input is a
stranger's). Each case goes through the node functions, ComfyUI's own prompt validation (the
comfy_stub emulation of it), the headless runner or the command line, as a client would.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from comfy_stub import make_folder_paths, validate_node
from pack import ROOT, load_pack, pack_module

from adatp_core import caption_cli, cli

FLOOR_MESSAGE = "at least 0.01"


@pytest.fixture(scope="module")
def pack(tiny_dir):
    with pytest.MonkeyPatch.context() as mp:  # for this module's tests only
        mp.setenv("ADATP_CACHE_DIR", str(tiny_dir.parent))  # the built-in model is already built there
        yield load_pack()


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
TINY_VALUES = [0.0099, 1e-40, 5e-324, math.nan, math.inf, -1.0]


@pytest.mark.parametrize("value", TINY_VALUES)
@pytest.mark.parametrize("setting", ["temperature", "repetition_penalty"])
def test_generate_answer_validation_refuses_tiny_and_nonfinite_values(pack, setting, value):
    cls = node("AdaTP_GenerateAnswer")
    message = cls.VALIDATE_INPUTS(**{setting: value})
    assert message is not True and setting in message
    # As ComfyUI validates an API-format prompt: the literal reaches VALIDATE_INPUTS, which refuses it.
    inputs = {"state": ["6", 0], "max_new_tokens": 8, "do_sample": True, "temperature": 1.0, "top_p": 1.0, "seed": 0,
              setting: value}
    errors, _ = validate_node(cls, inputs)
    assert errors and setting in errors[0]


def test_generate_answer_validation_keeps_comfyuis_ranges_and_good_values(pack):
    cls = node("AdaTP_GenerateAnswer")
    for kwargs in ({}, {"temperature": 0.01, "top_p": 0.9, "repetition_penalty": 0.01},
                   {"repetition_penalty": 0.0}, {"temperature": 5.0, "repetition_penalty": 3.0}):
        assert cls.VALIDATE_INPUTS(**kwargs) is True, kwargs
    # Named in VALIDATE_INPUTS, these lose ComfyUI's own min/max check: the node makes it.
    assert "from 0.01 to 5.0" in cls.VALIDATE_INPUTS(temperature=6.0)
    assert "from 0.0 to 3.0" in cls.VALIDATE_INPUTS(repetition_penalty=3.5)
    assert "from 0.01 to 1.0" in cls.VALIDATE_INPUTS(top_p=0.005)
    errors, _ = validate_node(cls, {"state": ["6", 0], "max_new_tokens": 8, "do_sample": False, "temperature": 9,
                                    "top_p": 1.0, "seed": 0})
    assert errors and "5.0" in errors[0]


def test_validation_passes_over_inputs_it_does_not_declare(pack):
    """A hidden input, or one a newer ComfyUI hands over, has no widget range to check: no KeyError."""
    validation = pack_module("nodes.inputs").validation
    cls = node("AdaTP_GenerateAnswer")
    assert validation(cls, {"temperature": 0.7, "unique_id": "12", "unknown": object()}) is True
    assert "from 0.01 to 5.0" in validation(cls, {"temperature": 6.0, "unknown": 1})


def test_the_shipped_workflows_stay_valid(pack):
    """A min was not raised: every saved Generate Answer and Caption Folder passes validation."""
    for path in sorted((ROOT / "workflows").glob("*.json")):
        for saved in json.loads(path.read_text())["nodes"]:
            if saved["type"] == "AdaTP_GenerateAnswer":
                # max_new_tokens, do_sample, temperature, top_p, seed (+ its control), repetition_penalty, ...
                _, _, temperature, top_p, _, _, penalty, *_ = saved["widgets_values"]
                assert node("AdaTP_GenerateAnswer").VALIDATE_INPUTS(temperature, top_p, penalty) is True, path.name
            if saved["type"] == "AdaTP_CaptionFolder":
                penalty = saved["widgets_values"][10]
                assert node("AdaTP_CaptionFolder").VALIDATE_INPUTS(repetition_penalty=penalty) is True, path.name


@pytest.mark.parametrize("setting", ["temperature", "repetition_penalty"])
def test_generate_answer_refuses_a_tiny_value_before_decoding(pack, tiny, frames, monkeypatch, setting):
    """A linked value skips ComfyUI's checks: the node run refuses it, before any token."""
    from adatp_core.attention import extract_attention

    state = extract_attention(tiny, frames[:1], "What?")
    module = pack_module("nodes.generate_answer")
    monkeypatch.setattr(module, "generate_answer", lambda *a, **k: pytest.fail("decoding started"))
    kwargs = {"temperature": 1.0, "repetition_penalty": 0.0, setting: 1e-40}
    with pytest.raises(ValueError, match=f"{setting} must be a finite number of {FLOOR_MESSAGE}"):
        module.AdaTP_GenerateAnswer().generate(state, 4, True, kwargs["temperature"], 1.0, 0,
                                               repetition_penalty=kwargs["repetition_penalty"])


def test_caption_folder_refuses_a_tiny_penalty_before_any_clip(pack, server, tiny):
    cls = node("AdaTP_CaptionFolder")
    assert FLOOR_MESSAGE in cls.VALIDATE_INPUTS(folder="set", repetition_penalty=1e-40)
    assert cls.VALIDATE_INPUTS(folder="set", repetition_penalty=1.05) is True
    with pytest.raises(ValueError, match=FLOOR_MESSAGE):
        cls().caption(**caption_args(tiny, repetition_penalty=1e-40))
    assert sorted(p.name for p in (server / "set").iterdir()) == ["a.mp4"]  # nothing captioned, nothing failed


def test_headless_runner_refuses_a_tiny_penalty_before_anything_runs(pack):
    headless = pack_module("nodes.headless")
    ran = []
    with pytest.raises(headless.WorkflowError, match=rf"#5 .*repetition_penalty.*{FLOOR_MESSAGE}"):
        headless.run_workflow(ROOT / "workflows" / "fastv_baseline.json", pack.NODE_CLASS_MAPPINGS,
                              {(5, "repetition_penalty"): 1e-40}, log=ran.append)
    assert ran == []


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
    (["1", 0, 2], "must be text"),
])
def test_caption_folder_names(pack, server, tiny, name, message):
    cls = node("AdaTP_CaptionFolder")
    answer = cls.VALIDATE_INPUTS(folder=name)
    assert answer is not True and message in answer
    with pytest.raises(ValueError, match=message):
        cls().caption(**caption_args(tiny, folder=name))
    assert cls.VALIDATE_INPUTS(folder="set") is True
    assert "does not exist" in cls.VALIDATE_INPUTS(folder="set/" + "b" * 255)  # 255 bytes make a name


@pytest.mark.parametrize("name, message", [
    (LONG + ".mp4", "has a part 260 bytes long"), ("clip\ud800.mp4", "lone surrogate"),
    (7, "must be one of its choices"), (None, None),
])
def test_load_video_names(pack, server, name, message):
    cls = node("AdaTP_LoadVideo")
    answer = cls.VALIDATE_INPUTS(video=name)
    if message is None:  # None: a linked value, checked when the node runs
        assert answer is True
        message = "must be one of its choices"
    else:
        assert answer is not True and message in answer
        assert math.isnan(cls.IS_CHANGED(name))  # never an exception
    with pytest.raises(ValueError, match=message):
        cls().load(name, 4, "uniform", 1.0, 0.0, 0.0)


@pytest.mark.parametrize("name, message", [
    ("m" * 256, "has a part 256 bytes long"), ("model\ud800", "lone surrogate"), (3, "must be one of its choices"),
])
def test_load_video_llm_names(pack, name, message):
    cls = node("AdaTP_LoadVideoLLM")
    assert message in cls.VALIDATE_INPUTS(model=name)
    with pytest.raises(ValueError, match=message):
        cls().load(name, "float32", "sdpa", "cpu", True)


def test_a_link_loop_in_the_input_folder_is_a_clear_error(pack, server):
    (server / "loop").symlink_to(server / "loop")
    (server / "loop.mp4").symlink_to(server / "loop.mp4")
    assert "link that cannot be followed" in node("AdaTP_CaptionFolder").VALIDATE_INPUTS(folder="loop")
    assert "link that cannot be followed" in node("AdaTP_CaptionFolder").VALIDATE_INPUTS(folder=str(server / "loop"))
    assert "link that cannot be followed" in node("AdaTP_LoadVideo").VALIDATE_INPUTS(video="loop.mp4")


# ---------------------------------------------------------------------------------------
# 5. Wrong types in the API format
# ---------------------------------------------------------------------------------------
def _socket_inputs():
    sockets = ("ADATP_MODEL", "ADATP_STATE", "ADATP_VIDEO_INFO", "IMAGE", "VIDEO")
    cases = []
    for key, cls in load_pack().NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            cases += [(key, name, kind) for name, (kind, *_) in spec.get(group, {}).items() if kind in sockets]
    return cases


SOCKET_INPUTS = _socket_inputs()
JUNK = ["abc", 5, 2.5, True, ["1"], {"a": 1}, torch.zeros(3, 4)]


def test_every_node_function_checks_its_inputs(pack):
    for key, cls in pack.NODE_CLASS_MAPPINGS.items():
        function = getattr(cls, cls.FUNCTION)
        assert getattr(function, "__wrapped__", None) is not None, f"{key}.{cls.FUNCTION} is not @checked"
    assert {kind for _, _, kind in SOCKET_INPUTS} == {"ADATP_MODEL", "ADATP_STATE", "ADATP_VIDEO_INFO", "IMAGE",
                                                      "VIDEO"}


@pytest.mark.parametrize("key, name, kind", SOCKET_INPUTS)
def test_a_wrong_value_in_a_socket_input(pack, key, name, kind):
    inputs = pack_module("nodes.inputs")
    cls = pack.NODE_CLASS_MAPPINGS[key]
    optional = name in cls.INPUT_TYPES().get("optional", {})
    for junk in JUNK + ([] if optional else [None]):
        with pytest.raises(ValueError, match=rf"input '{name}' must be .*\({kind}\), got .*; connect "):
            inputs.check_inputs(cls, {name: junk})
    if optional:
        assert inputs.check_inputs(cls, {name: None}) == {name: None}  # nothing connected


@pytest.mark.parametrize("frames, shown", [
    (torch.zeros(4, 8, 8), "shape [4, 8, 8]"), (torch.zeros(0, 8, 8, 3), "shape [0, 8, 8, 3]"),
    (torch.zeros(2, 8, 8, 1), "shape [2, 8, 8, 1]"), (torch.zeros(2, 8, 8, 3, dtype=torch.int64), "int64 tensor"),
])
def test_image_inputs_are_frames(pack, frames, shown):
    with pytest.raises(ValueError, match=rf"input 'frames' must be frames.*got a .*{re.escape(shown)}"):
        node("AdaTP_FrameTimes")().times(frames, 24.0)
    assert node("AdaTP_FrameTimes")().times(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), 24.0)[0].frame_count == 2


def test_a_literal_where_the_api_format_wants_the_model_or_the_state(pack, tiny, frames):
    """ComfyUI converts nothing in a socket input and lets the literal through; the node refuses it."""
    extract, generate = node("AdaTP_ExtractAttention"), node("AdaTP_GenerateAnswer")
    errors, values = validate_node(extract, {"model": "abc", "frames": ["2", 0], "question": "Q?", "layer": 2,
                                             "query": "text"})
    assert errors == []
    with pytest.raises(ValueError, match=r"input 'model' must be a loaded Video LLM \(ADATP_MODEL\), got str 'abc'; "
                                         r"connect Load Video LLM's model output \(in the API format a link is"):
        extract().extract(**{**values, "frames": frames})
    errors, values = validate_node(generate, {"state": {"grid": 1}, "max_new_tokens": 4, "do_sample": False,
                                              "temperature": 1.0, "top_p": 1.0, "seed": 0})
    assert errors == []
    with pytest.raises(ValueError, match=r"input 'state' must be an AdaTP state \(ADATP_STATE\), got dict"):
        generate().generate(**values)
    for key, call in [("AdaTP_PruneTokens", lambda c: c.prune("x", 0.5)),
                      ("AdaTP_GlobalDebias", lambda c: c.debias(7, 0.9, 1.0)),
                      ("AdaTP_LocalDebias", lambda c: c.debias(None, 1)),
                      ("AdaTP_PreviewTokens", lambda c: c.preview("x", frames)),
                      ("AdaTP_CaptionFolder", lambda c: c.caption(**caption_args("abc"))),
                      ("AdaTP_SampleVideo", lambda c: c.sample("clip.mp4", 4, "uniform", 1.0, 0.0, 0.0)),
                      ("AdaTP_ExtractAttention", lambda c: c.extract(tiny, "frames", "Q?", 2, "text"))]:
        with pytest.raises(ValueError, match=r"input '\w+' must be .*; connect "):
            call(node(key)())


@pytest.mark.parametrize("name, value, message", [
    ("overwrite", "false", "must be true or false, got str 'false'"),  # a truthy string would overwrite
    ("recursive", 1, "must be true or false"),
    ("frames", "32", "must be a whole number, got str '32'"),
    ("frames", 2.5, "must be a whole number"),
    ("retention", math.nan, "must be a finite number, got float nan"),
    ("retention", "0.5", "must be a finite number"),
    ("prompt", None, "must be text"),
    ("prefix", ["x"], "must be text"),
])
def test_a_wrong_value_in_a_widget_input(pack, server, tiny, name, value, message):
    cls = node("AdaTP_CaptionFolder")
    with pytest.raises(ValueError, match=rf"input '{name}' {message}"):
        cls().caption(**caption_args(tiny, **{name: value}))
    assert sorted(p.name for p in (server / "set").iterdir()) == ["a.mp4"]


def test_numbers_from_other_nodes_are_taken_as_pythons(pack):
    inputs = pack_module("nodes.inputs")
    cls = node("AdaTP_CaptionFolder")
    out = inputs.check_inputs(cls, {"frames": np.int64(4), "layer": 2.0, "retention": np.float32(0.5),
                                    "overwrite": np.bool_(False)})
    assert out == {"frames": 4, "layer": 2, "retention": 0.5, "overwrite": False}
    assert [type(v) for v in out.values()] == [int, int, float, bool]


def test_headless_runner_a_literal_for_a_link(pack):
    """An override replaces a link as a literal in an API-format prompt does; the node refuses it."""
    headless = pack_module("nodes.headless")
    with pytest.raises(ValueError, match=r"input 'state' must be an AdaTP state \(ADATP_STATE\), got str 'x'"):
        headless.run_workflow(ROOT / "workflows" / "fastv_baseline.json", pack.NODE_CLASS_MAPPINGS,
                              {(2, "num_frames"): 1, (5, "state"): "x"}, log=lambda m: None)


def test_headless_runner_validates_names_before_anything_runs(pack, tmp_path, monkeypatch):
    headless = pack_module("nodes.headless")
    monkeypatch.setattr(pack_module("nodes.comfy_bridge").HEADLESS, "input_dir", tmp_path)
    ran = []
    with pytest.raises(headless.WorkflowError, match=r"#2 .*: the folder name .* has a part 300 bytes long"):
        headless.run_workflow(ROOT / "workflows" / "caption_folder.json", pack.NODE_CLASS_MAPPINGS,
                              {(2, "folder"): "f" * 300}, log=ran.append)
    assert ran == []
