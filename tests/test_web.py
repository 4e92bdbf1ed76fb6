"""The web extension: its pure logic runs under node's own test runner."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from pack import ROOT

WEB = ROOT / "web"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_test_runner_passes():
    out = subprocess.run(["node", "--test", str(WEB / "tests")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "# fail 0" in out.stdout and "# pass 0" not in out.stdout


def test_comfyui_loads_only_the_extension_modules():
    """ComfyUI imports every .js under WEB_DIRECTORY; tests are .mjs so they are never loaded."""
    assert sorted(p.name for p in WEB.rglob("*.js")) == ["adatp.js", "adatp_display.js"]
    assert 'from "../../scripts/app.js"' in (WEB / "adatp.js").read_text()
    assert "scripts/app.js" not in (WEB / "adatp_display.js").read_text()
