"""Issue 32, items 4 and 5: floors on the settings that divide the logits, and a clear error for
every input a client controls (a ComfyUI server may be on a network: every node input is a
stranger's). Each case goes through the node functions, ComfyUI's own prompt validation (the
comfy_stub emulation of it), the headless runner or the command line, as a client would.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from pack import ROOT

from adatp_core import caption_cli, cli

FLOOR_MESSAGE = "at least 0.01"


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
