"""Packaging facts that users and CI rely on."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ImportError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(req: str) -> str:
    return re.split(r"[<>=!~; \[]", req.strip(), maxsplit=1)[0].lower()


def test_requirements_match_pyproject_without_torch():
    project = _project()["project"]
    deps = {_name(d): d.replace(" ", "") for d in project["dependencies"]}
    reqs = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert "torch" not in {_name(r) for r in reqs}, "requirements.txt must never reinstall torch"
    assert {_name(r): r.replace(" ", "") for r in reqs} == {k: v for k, v in deps.items() if k != "torch"}


def test_comfy_registry_metadata():
    comfy = _project()["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line.strip() for line in readme[:40] if line.strip().startswith("bash scripts/")]
    assert commands[:2] == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_ci_tests_the_declared_minimum():
    """CI runs scripts/test_min.sh after the suite. The script reads the minimum from the
    `transformers>=X` line of requirements.txt (test_versions keeps it equal to pyproject.toml's and
    to hf/versions.py's MINIMUM), so that line must keep that form, and every test file the script names must exist."""
    assert "bash scripts/test_min.sh" in (ROOT / ".ci" / "run").read_text()
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    declared = [line for line in lines if _name(line) == "transformers"]
    assert len(declared) == 1 and re.fullmatch(r"transformers>=\d+(\.\d+)*,<\d+", declared[0]), declared
    script = (ROOT / "scripts" / "test_min.sh").read_text()
    listed = re.findall(r"tests/test_\w+\.py", script)
    assert len(listed) >= 10 and all((ROOT / path).is_file() for path in listed), listed


def test_core_never_imports_comfyui():
    for path in (ROOT / "adatp_core").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(comfy|folder_paths|server|nodes)\b", text, re.M), path


def test_supported_version_ranges():
    """The ranges the README promises: torch 2.11 through 2.15 (current at the time of writing),
    transformers 5.17 through 5.25 (current on 2026-12-05), PyAV 12 through 19, Python 3.10
    through 3.13."""
    project = _project()["project"]
    deps = {Requirement(d).name: Requirement(d).specifier for d in project["dependencies"]}
    for name, versions in {"torch": ("2.11.0", "2.13.0", "2.14.1", "2.15.0"),
                           "transformers": ("5.17.0", "5.24.0", "5.25.0"), "av": ("12.0.0", "19.0.2")}.items():
        assert all(deps[name].contains(v) for v in versions), (name, deps[name])
    assert not deps["torch"].contains("2.10.0") and not deps["transformers"].contains("4.57.6")
    python = project["requires-python"]
    assert all(Requirement(f"python{python}").specifier.contains(v) for v in ("3.10", "3.13"))
    quant = [Requirement(r) for r in project["optional-dependencies"]["quant"]]
    assert [r.name for r in quant] == ["bitsandbytes"], "bitsandbytes stays an optional extra"
    assert "bitsandbytes" not in deps


def test_pip_install_builds_the_core_only():
    """`pip install .` needs a build backend and one top-level package: setuptools' flat-layout
    discovery refuses a folder with nodes/, bench/, web/ beside adatp_core/. Every folder of the core
    with Python files must be a package, or the installed library misses it."""
    setuptools = pytest.importorskip("setuptools")
    config = _project()
    assert config["build-system"]["build-backend"] == "setuptools.build_meta"
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    found = set(setuptools.find_packages(str(ROOT), include=include))
    expected = {".".join(d.relative_to(ROOT).parts) for d in (ROOT / "adatp_core").rglob("*")
                if d.is_dir() and any(d.glob("*.py"))} | {"adatp_core"}
    assert found == expected


def test_importing_installs_and_downloads_nothing():
    """Import every core module and the pack (as ComfyUI does) with process spawning and network
    connections forbidden: nothing may pip-install or download at import time."""
    script = textwrap.dedent(f"""
        import os, pkgutil, importlib, socket, subprocess, sys
        def forbidden(*args, **kwargs):
            raise SystemExit(f"import-time side effect: {{args[:2]}}")
        subprocess.Popen.__init__ = forbidden
        os.system = os.execv = os.execvp = os.spawnv = forbidden
        socket.socket.connect = socket.create_connection = forbidden
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "scripts")!r}]
        import adatp_core
        for info in pkgutil.walk_packages(adatp_core.__path__, "adatp_core."):
            if not info.name.endswith(("__main__", "decode_worker")):
                importlib.import_module(info.name)
        from run_workflow import load_pack
        load_pack()
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_installed_library_makes_its_own_sample_video(tmp_path, monkeypatch):
    """`pip install .` leaves assets/ behind; the CLI's default video is then written to the cache."""
    from adatp_core import samples
    from adatp_core.video import probe_video

    monkeypatch.setattr(samples, "SAMPLE_VIDEO", tmp_path / "site-packages" / "assets" / "sample_video.mp4")
    monkeypatch.setenv("ADATP_CACHE_DIR", str(tmp_path / "cache"))
    path = samples.sample_video()
    assert path == tmp_path / "cache" / "sample_video.mp4"
    assert probe_video(path).frame_count == 96 and [p.name for p in path.parent.iterdir()] == [path.name]
    assert samples.sample_video() == path  # reused, not rewritten
