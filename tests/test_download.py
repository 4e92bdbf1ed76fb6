"""Catalog downloads through the real huggingface_hub code path, against a fake hub
over HTTP on 127.0.0.1 (tests/fake_hub.py): no internet needed."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest
from conftest import QUESTION
from fake_hub import TOKEN, FakeHub, FakeRepo, SilentListener
from pack import pack_module

from adatp_core.errors import AdaTPInputError
from adatp_core.models import download as dl
from adatp_core.models.catalog import CATALOG, entry_from_label

REPO = "adatp-test/tiny-llava-onevision"
FORBIDDEN = {"pytorch_model.bin": b"\x80\x04pickle", "modeling_llava.py": b"import os\n",
             "weights.pt": b"\x80\x04", "extra/config.json": b"{}"}


class Stop(Exception):
    """Stands for ComfyUI's InterruptProcessingException."""


@pytest.fixture(scope="module")
def hub(tiny_dir):
    repos = {
        REPO: FakeRepo.from_folder(tiny_dir, extra=FORBIDDEN),
        "adatp-test/gated": FakeRepo.from_folder(tiny_dir, gated=True),
        "adatp-test/pickle-only": FakeRepo({"config.json": b"{}", "pytorch_model.bin": b"\x80\x04"}),
        "adatp-test/big": FakeRepo({"config.json": b"{}", "model.safetensors": bytes(range(256)) * 48 * 1024}),
    }
    with FakeHub(repos, lifetime=600) as server:
        yield server


@pytest.fixture
def env(hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    hub.release()
    hub.requests.clear()
    yield hub
    hub.release()  # a stalled request a test left behind ends, and its abandoned worker with it
    hub.throttle = 0.0


@pytest.fixture
def short_deadlines(monkeypatch):
    """Deadlines of a few seconds (the real ones are 10 s connect, 30 s read, 40 s and 120 s
    stalls); returns the longest."""
    monkeypatch.setattr(dl, "CONNECT_TIMEOUT", 1.0)
    monkeypatch.setattr(dl, "READ_TIMEOUT", 2.0)
    monkeypatch.setattr(dl, "STALL_SECONDS", 3.0)
    monkeypatch.setattr(dl, "STREAM_STALL_SECONDS", 3.0)
    return 3.0


def dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed when the block ends


def test_catalog_has_the_promised_models():
    assert {e.repo_id for e in CATALOG} == {
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "llava-hf/llava-onevision-qwen2-7b-ov-hf",
        "Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct",
        "Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-8B-Instruct",
        "Qwen/Qwen3.5-0.8B", "Qwen/Qwen3.5-2B", "Qwen/Qwen3.5-4B", "Qwen/Qwen3.5-9B", "Qwen/Qwen3.5-27B",
        "Qwen/Qwen3.6-27B", "Qwen/Qwen3.5-35B-A3B", "Qwen/Qwen3.6-35B-A3B", "Qwen/Qwen3-VL-30B-A3B-Instruct"}
    for e in CATALOG:
        assert 0 < e.vram_4bit_gb < e.vram_bf16_gb and e.disk_gb > 0
        assert entry_from_label(e.label) is e and e.label.endswith(f"({e.disk_gb:.1f} GB)")
        assert entry_from_label(e.label.replace(f"{e.disk_gb:.1f}", "99.9")) is e  # the size may be revised
    assert entry_from_label("\u2b07 Qwen/Qwen2.5-VL-7B-Instruct (16.6 GB)").folder_name == "Qwen2.5-VL-7B-Instruct"
    assert entry_from_label("\u2b07 nobody/nothing (1.0 GB)") is None and entry_from_label("my-llava") is None


def test_download_then_load_and_answer(env, tmp_path, tiny, tiny_dir, frames):
    from adatp_core.attention import extract_attention
    from adatp_core.generate import SamplingConfig, generate_answer
    from adatp_core.models.loader import load_video_llm

    seen = []
    folder = dl.download_model(REPO, tmp_path / "LLM", on_progress=lambda done, total: seen.append((done, total)))
    assert folder == tmp_path / "LLM" / "tiny-llava-onevision"
    visible = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert visible == sorted(p.name for p in tiny_dir.iterdir())
    assert not any(env.gets(name) for name in FORBIDDEN)  # never fetched
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no partial folder left
    total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert seen[-1] == (total, total) and all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))

    model = load_video_llm(folder, device="cpu", dtype="float32")
    cfg = SamplingConfig(max_new_tokens=4)
    answer = generate_answer(extract_attention(model, frames[:2], QUESTION, 2, "text"), cfg).text
    assert answer and answer == generate_answer(extract_attention(tiny, frames[:2], QUESTION, 2, "text"), cfg).text

    # Later runs use the local copy and never touch the network.
    env.requests.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", dead_endpoint())
        assert dl.download_model(REPO, tmp_path / "LLM") == folder
    assert env.requests == []


def test_interrupted_then_resumed(env, tmp_path):
    root = tmp_path / "LLM"
    env.throttle = 0.05  # the weights (last, most of it) stream for about a second

    def check():
        if env.gets("model.safetensors"):
            raise Stop()

    with pytest.raises(Stop):
        dl.download_model(REPO, root, check_interrupt=check)
    partial = root / ".tiny-llava-onevision.partial"
    assert not (root / "tiny-llava-onevision").exists()  # nothing that looks like a model
    assert (partial / "config.json").is_file() and not (partial / "model.safetensors").exists()
    assert env.gets("model.safetensors") == 1

    env.throttle = 0.0
    folder = dl.download_model(REPO, root)
    assert (folder / "model.safetensors").read_bytes() == env_repo(env).files["model.safetensors"]
    assert env.gets("config.json") == 1 and env.gets("tokenizer.json") == 1  # finished files were kept
    assert env.gets("model.safetensors") >= 2 and not partial.exists()


def env_repo(hub, repo=REPO):
    return hub.repos[repo]


def test_a_dropped_connection_resumes_with_a_range_request(env, tmp_path):
    data = env_repo(env, "adatp-test/big").files["model.safetensors"]
    env.drop_after["model.safetensors"] = len(data) - 1000  # past huggingface_hub's first 10 MB chunk
    try:
        folder = dl.download_model("adatp-test/big", tmp_path)  # huggingface_hub 2 retries at once
    except dl.DownloadError as exc:  # 1.x keeps the .incomplete file: the next run continues it
        assert "cannot reach" in str(exc) and not (tmp_path / "big").exists()
        folder = dl.download_model("adatp-test/big", tmp_path)
    assert (folder / "model.safetensors").read_bytes() == data
    ranges = [r for m, p, r in env.requests if m == "GET" and p.endswith("/model.safetensors") and r]
    assert ranges and int(ranges[0].removeprefix("bytes=").split("-")[0]) > 0


def test_offline_error_names_the_command_and_folder(env, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(dl.DownloadError, match="HF_HUB_OFFLINE") as err:
        dl.download_model(REPO, tmp_path / "LLM")
    target = tmp_path / "LLM" / "tiny-llava-onevision"
    assert f'hf download {REPO} --local-dir "{target}"' in str(err.value)
    assert env.requests == [] and not (tmp_path / "LLM").exists()


def test_network_error_names_the_command_and_folder(env, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", dead_endpoint())
    with pytest.raises(dl.DownloadError, match="cannot reach") as err:
        dl.download_model(REPO, tmp_path / "LLM")
    assert "hf download" in str(err.value) and str(tmp_path / "LLM" / "tiny-llava-onevision") in str(err.value)
    assert not (tmp_path / "LLM").exists()


def test_pickle_only_repository_is_refused_before_anything_is_written(env, tmp_path):
    with pytest.raises(AdaTPInputError, match="only has pickle weights"):
        dl.download_model("adatp-test/pickle-only", tmp_path / "LLM")
    assert not (tmp_path / "LLM").exists()
    assert [m for m, p, _ in env.requests if "/resolve/" in p] == []  # listed, nothing fetched


def test_gated_repository_needs_the_token(env, tmp_path, monkeypatch):
    with pytest.raises(dl.DownloadError, match="gated.*HTTP 401.*HF_TOKEN") as err:
        dl.download_model("adatp-test/gated", tmp_path / "LLM")
    assert "hf download adatp-test/gated" in str(err.value) and not (tmp_path / "LLM").exists()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert (dl.download_model("adatp-test/gated", tmp_path / "LLM") / "model.safetensors").is_file()


def test_disk_errors_are_explained(env, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(dl.DownloadError, match="cannot write") as err:
        dl.download_model(REPO, blocker / "LLM")
    assert "hf download" in str(err.value)

    class Full:
        free = 1000

    monkeypatch.setattr(dl.shutil, "disk_usage", lambda path: Full)
    with pytest.raises(dl.DownloadError, match="GB needed"):
        dl.download_model(REPO, tmp_path / "LLM")
    assert not (tmp_path / "LLM").exists()


def test_an_unfinished_folder_in_the_way_is_not_overwritten(env, tmp_path):
    (tmp_path / "tiny-llava-onevision").mkdir()
    (tmp_path / "tiny-llava-onevision" / "notes.txt").write_text("mine")
    with pytest.raises(dl.DownloadError, match="not a complete model folder"):
        dl.download_model(REPO, tmp_path)
    assert env.requests == []


@pytest.fixture
def catalog_node(env, tmp_path, monkeypatch, tiny_dir):
    """Load Video LLM with the fake hub's model as an extra catalog entry; returns (the node's
    module, comfy_bridge, the entry's label). Downloads go to tmp_path/LLM."""
    monkeypatch.setenv("ADATP_CACHE_DIR", str(tiny_dir.parent))
    extra = tmp_path / "catalog.json"
    extra.write_text(json.dumps([{"repo_id": REPO, "model_type": "llava_onevision", "disk_gb": 0.001,
                                  "vram_bf16_gb": 0.1, "vram_4bit_gb": 0.05}]))
    monkeypatch.setenv("ADATP_EXTRA_CATALOG", str(extra))
    bridge = pack_module("nodes.comfy_bridge")
    monkeypatch.setattr(bridge.HEADLESS, "model_dirs", [tmp_path / "LLM", tmp_path / "other"])
    return pack_module("nodes.load_model"), bridge, f"\u2b07 {REPO} (0.0 GB)"


def test_load_node_lists_downloads_and_then_uses_the_local_copy(env, tmp_path, monkeypatch, catalog_node):
    import os

    node, bridge, label = catalog_node
    models = node.AdaTP_LoadVideoLLM.INPUT_TYPES()["required"]["model"][0]
    assert models[-1] == label  # extra entries come after the built-in ones
    assert node.AdaTP_LoadVideoLLM.VALIDATE_INPUTS(label) is True and env.requests == []  # no network

    llm = node.AdaTP_LoadVideoLLM().load(label, "float32", "sdpa", "cpu", True)[0]
    assert llm.path == str(tmp_path / "LLM" / "tiny-llava-onevision") and llm.name == "tiny-llava-onevision"
    models = node.AdaTP_LoadVideoLLM.INPUT_TYPES()["required"]["model"][0]
    assert "tiny-llava-onevision" in models and label not in models

    env.requests.clear()
    monkeypatch.setenv("HF_ENDPOINT", dead_endpoint())
    assert node.AdaTP_LoadVideoLLM.VALIDATE_INPUTS(label) is True  # saved workflows keep working
    again = node.AdaTP_LoadVideoLLM().load(label, "float32", "sdpa", "cpu", True)[0]
    assert again.path == llm.path and env.requests == []
    assert os.listdir(tmp_path / "LLM") == ["tiny-llava-onevision"]


def test_readme_shows_the_catalog_and_the_manual_command():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for e in CATALOG:
        assert (f"| {e.label} |" in readme and f"| {e.disk_gb:.1f} GB | ~{e.vram_bf16_gb:g} GB | "
                f"~{e.vram_4bit_gb:g} GB |" in readme), e.repo_id
    target = "ComfyUI/models/LLM/Qwen2.5-VL-7B-Instruct"
    command = dl.manual_command("Qwen/Qwen2.5-VL-7B-Instruct", Path(target)).replace(f'"{target}"', target)
    assert command in " ".join(readme.replace("\\\n", " ").split())


def test_an_interruption_swallowed_inside_huggingface_hub_still_stops(env, tmp_path, monkeypatch):
    """hf_xet calls the progress back from its own code and may swallow what it raises: the
    abandoned worker's stop signal here. Cancel is seen in the caller's thread all the same."""
    import huggingface_hub

    real = huggingface_hub.hf_hub_download

    def swallowing(*args, tqdm_class=None, **kwargs):
        def quiet(**bar_kwargs):
            bar = tqdm_class(**bar_kwargs)
            update = bar.update

            def update_swallowing(n=1):
                try:
                    update(n)
                except Stop:
                    pass

            bar.update = update_swallowing
            return bar
        return real(*args, tqdm_class=quiet, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", swallowing)
    pressed = []

    def check():
        if pressed:
            pressed.clear()  # like ComfyUI: the flag is cleared as the exception is raised
            raise Stop()

    with pytest.raises(Stop):
        dl.download_model(REPO, tmp_path, on_progress=lambda done, total: pressed.append(1), check_interrupt=check)
    assert not (tmp_path / "tiny-llava-onevision").exists()


# ----- deadlines and Cancel on a hub that stalls ----------------------------------------------
STALLS = {  # where the hub stops answering: what it is set to, and how the error names the step
    "listing": ({"hang": "GET /api/models/"}, "listing the files of"),
    "access check": ({"hang": f"HEAD /{REPO}/resolve/"}, "checking access to"),
    "file midway": ({"stall_after": 4096}, "fetching model.safetensors of"),
}


def stall(hub, where: str) -> str:
    setting, step = STALLS[where]
    if "hang" in setting:
        hub.hang.add(setting["hang"])
    else:
        hub.stall_after["model.safetensors"] = setting["stall_after"]
    return step


def assert_explained(message: str, endpoint: str) -> None:
    assert message.startswith(f"cannot reach the Hugging Face Hub at {endpoint} to download ")
    for what in ("HF_ENDPOINT", "proxy", "firewall", "HF_HUB_OFFLINE=1", "hf download"):
        assert what in message, what


def test_a_silent_endpoint_is_a_clear_error_within_the_deadline(env, tmp_path, monkeypatch, short_deadlines):
    """The plainest stall: a listener that accepts and never answers (a hung proxy or mirror)."""
    with SilentListener(lifetime=60) as silent:
        monkeypatch.setenv("HF_ENDPOINT", silent.url)
        start = time.monotonic()
        with pytest.raises(dl.DownloadError) as err:
            dl.download_model(REPO, tmp_path / "LLM")
        elapsed = time.monotonic() - start
        assert silent.connections >= 1
    assert elapsed < short_deadlines + 2, elapsed
    assert_explained(str(err.value), silent.url)
    # httpx's read timeout on the listing, or the pack's deadline if the thread was slow to start
    assert re.search(r"(no answer in time|nothing received for 3 s) while listing the files of", str(err.value))
    assert not (tmp_path / "LLM").exists()


def test_the_cli_reports_a_silent_endpoint_and_exits_2(env, tmp_path, monkeypatch, capsys, short_deadlines):
    from adatp_core import cli

    monkeypatch.setenv("ADATP_MODEL_DIRS", str(tmp_path / "LLM"))
    with SilentListener(lifetime=60) as silent:
        monkeypatch.setenv("HF_ENDPOINT", silent.url)
        start = time.monotonic()
        code = cli.main(["--model", "Qwen/Qwen3-VL-2B-Instruct"])
        elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2 and elapsed < short_deadlines + 2, (code, elapsed)
    assert err.startswith("error: ") and "Traceback" not in err
    assert_explained(err.removeprefix("error: "), silent.url)
    assert "Qwen/Qwen3-VL-2B-Instruct" in err and str(tmp_path / "LLM" / "Qwen3-VL-2B-Instruct") in err


@pytest.mark.parametrize("where", list(STALLS))
def test_a_stall_is_given_up_at_the_deadline_and_the_next_run_resumes(env, tmp_path, short_deadlines, where):
    root = tmp_path / "LLM"
    step = stall(env, where)
    start = time.monotonic()
    with pytest.raises(dl.DownloadError) as err:
        dl.download_model(REPO, root)
    elapsed = time.monotonic() - start
    assert env.stalled.is_set() and elapsed < short_deadlines + 2, elapsed
    assert_explained(str(err.value), env.url)
    assert f"{step} {REPO}" in str(err.value)
    assert not (root / "tiny-llava-onevision").exists()
    if where == "file midway":  # the files before it are kept
        assert (root / ".tiny-llava-onevision.partial" / "config.json").is_file()

    env.release()  # the hub answers again: the next run completes
    folder = dl.download_model(REPO, root)
    assert (folder / "model.safetensors").read_bytes() == env_repo(env).files["model.safetensors"]
    assert env.gets("config.json") == 1 and not folder.with_name(".tiny-llava-onevision.partial").exists()


def press_cancel_when_stalled(hub, delay: float = 0.3):
    """A Cancel button pressed ``delay`` s into a stall; returns (check, the time it was pressed)."""
    pressed: list[float] = []
    cancel = threading.Event()

    def press():
        if hub.stalled.wait(30):
            time.sleep(delay)
            pressed.append(time.monotonic())
            cancel.set()

    threading.Thread(target=press, daemon=True).start()

    def check():
        if cancel.is_set():
            raise Stop()

    return check, pressed


@pytest.mark.parametrize("where", list(STALLS))
def test_cancel_stops_a_stalled_download_at_once(env, tmp_path, where):
    """With the real deadlines (40 s): Cancel is seen while the request waits."""
    root = tmp_path / "LLM"
    stall(env, where)
    check, pressed = press_cancel_when_stalled(env)
    seen = []
    start = time.monotonic()
    with pytest.raises(Stop):
        dl.download_model(REPO, root, check_interrupt=check, on_progress=lambda *a: seen.append(threading.get_ident()))
    stopped = time.monotonic()
    assert pressed and stopped - pressed[0] < 1.0 and stopped - start < 10, (stopped - start)
    assert not (root / "tiny-llava-onevision").exists()
    assert set(seen) <= {threading.get_ident()}  # progress is reported from the caller's thread
    if where == "file midway":
        assert (root / ".tiny-llava-onevision.partial" / "config.json").is_file()
        assert not (root / ".tiny-llava-onevision.partial" / "model.safetensors").exists()


def test_the_next_download_waits_for_a_cancelled_one_still_writing(env, tmp_path, monkeypatch):
    """A cancelled download's worker may still be inside huggingface_hub's request, and would write
    into the partial folder when the hub answers: the next download of that model waits for it to
    end (Cancel still works while it waits) instead of writing beside it."""
    root = tmp_path / "LLM"
    stall(env, "file midway")
    check, _ = press_cancel_when_stalled(env)
    with pytest.raises(Stop):
        dl.download_model(REPO, root, check_interrupt=check)
    partial = root / ".tiny-llava-onevision.partial"
    assert dl._abandoned_workers(partial)  # still waiting on the stalled hub
    import huggingface_hub

    fetched, real = [], huggingface_hub.hf_hub_download
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: fetched.append(a[1]) or real(*a, **k))
    later = time.monotonic() + 0.5
    with pytest.raises(Stop):  # waits, then Cancel: no file fetched meanwhile
        dl.download_model(REPO, root, check_interrupt=lambda: (_ for _ in ()).throw(Stop())
                          if time.monotonic() > later else None)
    assert fetched == []
    env.release()
    folder = dl.download_model(REPO, root)
    assert not dl._abandoned_workers(partial)
    assert (folder / "model.safetensors").read_bytes() == env_repo(env).files["model.safetensors"]


def test_a_slow_stream_is_not_a_stall(env, tmp_path, monkeypatch):
    """Once a file streams, only a gap between chunks counts, not the time since the request."""
    monkeypatch.setattr(dl, "STALL_SECONDS", 0.5)
    env.throttle = 0.005  # about 1 s for the 12 MB file, in 10 MB chunks as huggingface_hub reads it
    folder = dl.download_model("adatp-test/big", tmp_path)
    assert (folder / "model.safetensors").read_bytes() == env_repo(env, "adatp-test/big").files["model.safetensors"]


@pytest.mark.parametrize("where", ["listing", "file midway"])
def test_cancel_in_comfyui_stops_a_stalled_download_and_the_next_prompt_runs(env, tmp_path, monkeypatch,
                                                                             catalog_node, where):
    """Cancel (POST /interrupt sets ComfyUI's flag from the server's thread) ends the node within a
    second, as ComfyUI's InterruptProcessingException; the next prompt downloads and loads."""
    from comfy_stub import make_interrupts

    node, bridge, label = catalog_node
    mm = make_interrupts()
    monkeypatch.setattr(bridge, "model_management", mm)
    stall(env, where)
    pressed = []

    def press():
        if env.stalled.wait(30):
            time.sleep(0.3)
            pressed.append(time.monotonic())
            mm.interrupt_current_processing(True)

    threading.Thread(target=press, daemon=True).start()
    with pytest.raises(mm.InterruptProcessingException):
        node.AdaTP_LoadVideoLLM().load(label, "float32", "sdpa", "cpu", True)
    assert pressed and time.monotonic() - pressed[0] < 1.0
    assert not (tmp_path / "LLM" / "tiny-llava-onevision").exists()

    env.release()
    llm = node.AdaTP_LoadVideoLLM().load(label, "float32", "sdpa", "cpu", True)[0]
    assert llm.path == str(tmp_path / "LLM" / "tiny-llava-onevision")
