"""Packaging facts that users and CI rely on."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _name(req: str) -> str:
    return re.split(r"[<>=!~; \[]", req.strip(), maxsplit=1)[0].lower()


def test_requirements_match_pyproject_without_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {_name(d): d.replace(" ", "") for d in project["dependencies"]}
    reqs = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert "torch" not in {_name(r) for r in reqs}, "requirements.txt must never reinstall torch"
    assert {_name(r): r.replace(" ", "") for r in reqs} == {k: v for k, v in deps.items() if k != "torch"}


def test_comfy_registry_metadata():
    comfy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line.strip() for line in readme[:40] if line.strip().startswith("bash scripts/")]
    assert commands[:2] == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_core_never_imports_comfyui():
    for path in (ROOT / "adatp_core").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(comfy|folder_paths|server|nodes)\b", text, re.M), path
