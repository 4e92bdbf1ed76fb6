"""One model name everywhere: the command lines and the Python loader take every name that
Load Video LLM lists (built-in, local folder, catalog entry), folders, catalog repository
ids, and ``python -m adatp_core models`` lists them. Catalog downloads go to a fake hub on
127.0.0.1 (tests/fake_hub.py) that serves the tiny models under every catalog repository id."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from fake_hub import FakeHub, FakeRepo
from pack import pack_module
from test_folders import transformers5_copy

from adatp_core import cli
from adatp_core.errors import AdaTPInputError
from adatp_core.models import names
from adatp_core.models.catalog import CATALOG
from adatp_core.models.download import DownloadError
from adatp_core.models.tiny import TINY_MODEL_NAME, ensure_tiny_model
from adatp_core.models.tiny_qwen import (TINY_QWEN3_VL_NAME, ensure_tiny_qwen2_5_vl, ensure_tiny_qwen3_5,
                                        ensure_tiny_qwen3_5_moe, ensure_tiny_qwen3_vl, ensure_tiny_qwen3_vl_moe)

EXTRA_REPO = "adatp-test/tiny-qwen3-vl-v5"
BUILDERS = {"llava_onevision": ensure_tiny_model, "qwen2_5_vl": ensure_tiny_qwen2_5_vl,
            "qwen3_vl": ensure_tiny_qwen3_vl, "qwen3_5": ensure_tiny_qwen3_5, "qwen3_5_moe": ensure_tiny_qwen3_5_moe,
            "qwen3_vl_moe": ensure_tiny_qwen3_vl_moe}
RUN = ["--frames", "2", "--max-new-tokens", "2", "--device", "cpu", "--dtype", "float32", "--json"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("adatp-names-cache")


@pytest.fixture(scope="module")
def hub(cache, tmp_path_factory):
    """Every catalog repository, served with the tiny model of its family; one extra
    repository in transformers 5's processor layout."""
    folders = {family: build(cache) for family, build in BUILDERS.items()}
    v5 = transformers5_copy(folders["qwen3_vl"], tmp_path_factory.mktemp("v5") / "tiny-qwen3-vl-v5")
    repos = {e.repo_id: FakeRepo.from_folder(folders[e.model_type]) for e in CATALOG}
    repos[EXTRA_REPO] = FakeRepo.from_folder(v5)
    with FakeHub(repos, lifetime=900) as server:
        yield server


@pytest.fixture
def env(hub, cache, tmp_path, monkeypatch):
    """A models root with one local folder, the extra catalog entry, the fake hub, and the
    headless nodes looking at the same root as the command line."""
    root = tmp_path / "LLM"
    root.mkdir()
    shutil.copytree(ensure_tiny_model(cache), root / "my-llava")
    monkeypatch.setenv("ADATP_CACHE_DIR", str(cache))
    monkeypatch.setenv(names.MODEL_DIRS_ENV, str(root))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    extra = tmp_path / "catalog.json"
    extra.write_text(json.dumps([{"repo_id": EXTRA_REPO, "model_type": "qwen3_vl", "disk_gb": 0.002,
                                  "vram_bf16_gb": 0.1, "vram_4bit_gb": 0.05}]))
    monkeypatch.setenv("ADATP_EXTRA_CATALOG", str(extra))
    monkeypatch.setattr(pack_module("nodes.comfy_bridge").HEADLESS, "model_dirs", [root])
    monkeypatch.chdir(tmp_path)
    return root


def listed_names() -> list[str]:
    node = pack_module("nodes.load_model")
    return node.AdaTP_LoadVideoLLM.INPUT_TYPES()["required"]["model"][0]


def run_cli(capsys, *argv) -> dict:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_cli_runs_every_name_that_load_video_llm_lists(env, capsys):
    listed = listed_names()
    assert len(listed) == len(names.BUILTINS) + 1 + len(CATALOG) + 1  # built-in, local, catalog, the extra entry
    for name in listed:
        report = run_cli(capsys, "--model", name, *RUN)
        assert report["new_tokens"] >= 1 or report["answer"] == "", name
    # the catalog entries are downloaded now: the list names their folders, which work too
    downloaded = sorted(p.name for p in env.iterdir())
    assert downloaded == sorted(["my-llava", *(e.folder_name for e in CATALOG), "tiny-qwen3-vl-v5"])
    relisted = listed_names()
    assert not any(n.startswith("\u2b07") for n in relisted)
    for name in set(relisted) - set(listed):
        run_cli(capsys, "--model", name, *RUN)


def test_caption_cli_and_the_loader_take_the_same_names(env, capsys, tmp_path, frames):
    from adatp_core.models.loader import load_video_llm
    from adatp_core.samples import sample_video

    clips = tmp_path / "clips"
    clips.mkdir()
    shutil.copy(sample_video(), clips / "a.mp4")
    assert cli.main(["caption", str(clips), "--model", "adatp-tiny-qwen3-vl", "--frames", "2",
                     "--max-new-tokens", "2", "--device", "cpu", "--dtype", "float32"]) == 0
    assert (clips / "a.txt").is_file()
    capsys.readouterr()

    for name in ("adatp-tiny-qwen3-vl", TINY_QWEN3_VL_NAME, " adatp-tiny-qwen3-vl (built-in, random weights) "):
        assert load_video_llm(name, device="cpu", dtype="float32").name == TINY_QWEN3_VL_NAME
    assert load_video_llm("adatp-tiny", device="cpu").name == TINY_MODEL_NAME
    assert load_video_llm("adatp-tiny-llava-onevision", device="cpu").name == TINY_MODEL_NAME
    assert load_video_llm("my-llava", device="cpu").path == str(env / "my-llava")
    assert load_video_llm(str(env / "my-llava"), device="cpu").name == "my-llava"  # a folder
    llm = load_video_llm(EXTRA_REPO, device="cpu")  # a catalog repository id: downloaded
    assert llm.path == str(env / "tiny-qwen3-vl-v5")
    assert (env / "tiny-qwen3-vl-v5" / "processor_config.json").is_file()


def test_bad_names_are_explained(env, monkeypatch):
    with pytest.raises(AdaTPInputError, match="python -m adatp_core models lists"):
        names.resolve_model_name("no-such-model")
    with pytest.raises(AdaTPInputError, match="does not exist"):
        names.resolve_model_name(str(env / "missing"))
    with pytest.raises(AdaTPInputError, match="not in the model catalog"):
        names.resolve_model_name("\u2b07 nobody/nothing (1.0 GB)")
    with pytest.raises(AdaTPInputError, match="python -m adatp_core models lists"):
        names.resolve_model_name("nobody/nothing")  # not a catalog repository: never downloaded
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        names.resolve_model_name(CATALOG[0].repo_id)
    assert not (env / CATALOG[0].folder_name).exists()


def test_models_command_lists_builtin_local_and_catalog(env, capsys, cache):
    report = run_cli(capsys, "models", "--json")
    rows = {r["name"]: r for r in report["models"]}
    assert report["roots"][0] == str(env)
    for name in ("adatp-tiny", "adatp-tiny-qwen2.5-vl", "adatp-tiny-qwen3-vl"):
        assert rows[name]["kind"] == "built-in" and rows[name]["state"] == "built"  # the fixtures built them
    assert rows["my-llava"]["kind"] == "local" and rows["my-llava"]["state"] == "ready"
    assert 0.001 < rows["my-llava"]["size_gb"] < 0.01
    for e in CATALOG:
        assert rows[e.repo_id]["kind"] == "catalog" and rows[e.repo_id]["size_gb"] == e.disk_gb
        assert rows[e.repo_id]["state"].startswith("not downloaded")
    (env / "broken").mkdir()
    (env / "broken" / "config.json").write_text("{}")
    names.resolve_model_name(CATALOG[0].repo_id)  # downloads it
    rows = {r["name"]: r for r in run_cli(capsys, "models", "--json")["models"]}
    assert rows[CATALOG[0].repo_id]["state"].startswith("downloaded")
    assert rows["broken"]["state"].startswith("incomplete")
    assert cli.main(["models"]) == 0
    text = capsys.readouterr().out
    assert "adatp-tiny-qwen3-vl" in text and CATALOG[-1].repo_id in text and "my-llava" in text


def test_python_m_adatp_core_takes_a_listed_name(env, cache):
    """The installed entry point, as a user types it."""
    from conftest import ROOT

    out = subprocess.run([sys.executable, "-m", "adatp_core", "--model", "adatp-tiny (built-in, random weights)",
                          *RUN], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["new_tokens"] >= 1
