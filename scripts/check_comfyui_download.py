#!/usr/bin/env python3
"""Check a catalog download inside a real ComfyUI server, against a fake hub.

    python scripts/check_comfyui_download.py --comfyui ~/ComfyUI [--python ~/ComfyUI/venv/bin/python]

Needs aiohttp (ComfyUI's own requirement) in the interpreter that runs this
script. What it does, all on 127.0.0.1 and in a temporary base directory:
1. serves the built-in tiny model as ``adatp-test/tiny-llava-onevision`` from
   tests/fake_hub.py, and offers it through ADATP_EXTRA_CATALOG;
2. starts ComfyUI (``--cpu``, loopback, ``--base-directory`` with the pack
   symlinked into custom_nodes) with HF_ENDPOINT at the fake hub;
3. checks that Load Video LLM lists "⬇ adatp-test/tiny-llava-onevision (… GB)";
   makes the hub stop answering (the listing, then a file midway), queues the
   workflow with that entry and, behind it, the same workflow on the built-in
   tiny model, and presses Cancel during the stall: the first prompt must end as
   interrupted within 2 s and the second must answer;
   queues the shipped video QA workflow with that entry picked on a slowed-down
   hub and presses Cancel (POST /interrupt) during the download; then queues it
   again: the download continues (finished files are not fetched again), with
   the node's progress messages in bytes, and the workflow answers.
   Then presses "Unload models" (POST /free) and asks another question: ComfyUI's
   model management must unload the model and load it back;
4. stops the hub (the network is gone), restarts ComfyUI, and runs the same
   workflow again: it must answer from models/LLM/tiny-llava-onevision.
Exit status 0 only if every run answered, Cancel stopped each stalled download
within 2 s with the prompt behind it answering, the first run with byte progress,
the unload happened, and the last run made no request to the hub.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fake_hub import FakeHub, FakeRepo  # noqa: E402
from run_workflow import PACK_DIR, PACK_NAME, load_pack  # noqa: E402

REPO = "adatp-test/tiny-llava-onevision"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, path: str, payload=None):
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        body = resp.read()
    return json.loads(body) if body.strip() else None


class Server:
    """ComfyUI in a child process; its log goes to base/comfyui-<n>.log."""

    def __init__(self, comfyui: Path, python: str, base: Path, env: dict, n: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = base / f"comfyui-{n}.log"
        cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(base), "--disable-auto-launch", "--verbose", "DEBUG"]
        self.proc = subprocess.Popen(cmd, cwd=comfyui, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early; see {self.log}:\n{self.log.read_text()[-3000:]}")
            try:
                call(self.url, "/system_stats")
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s; see {self.log}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def run_prompt(url: str, prompt: dict, node: str, timeout: float, interrupt: bool = False) -> dict:
    """Queue a prompt and follow it over the websocket; returns progress, status and outputs.

    interrupt: press Cancel (POST /interrupt) once the node reports 2.5% done.
    """
    import aiohttp

    client = str(uuid.uuid4())
    progress, status = [], None
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url.replace('http', 'ws')}/ws?clientId={client}") as ws:
            queued = call(url, "/prompt", {"prompt": prompt, "client_id": client})
            pid = queued["prompt_id"]
            end = time.time() + timeout
            while time.time() < end and status is None:
                try:
                    msg = await ws.receive(timeout=max(1.0, end - time.time()))
                except asyncio.TimeoutError:
                    break
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(msg.data)
                data = event.get("data", {})
                if data.get("prompt_id") not in (None, pid):
                    continue
                if event["type"] == "progress" and str(data.get("node")) == node:
                    progress.append((data["value"], data["max"]))
                    if interrupt and 40 * data["value"] > data["max"]:  # configs done, weights coming
                        call(url, "/interrupt", {})
                        interrupt = False
                elif event["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    status = event["type"]
                    if status == "execution_error":
                        progress.append(("error", data.get("exception_message", "")[:2000]))
    # ComfyUI sends execution_success before its queue worker stores the history entry.
    history, end = {}, time.time() + 30
    while time.time() < end:
        history = (call(url, f"/history/{pid}") or {}).get(pid, {})
        if history.get("status", {}).get("completed") is not None:
            break
        await asyncio.sleep(0.2)
    return {"progress": progress, "status": status, "outputs": history.get("outputs", {})}


async def cancel_a_stall(url: str, stalled: dict, behind: dict, hub, timeout: float) -> dict:
    """Queue ``stalled`` (its download waits on a hub that stopped answering) and ``behind``
    after it; press Cancel 1 s into the stall. Returns the statuses of both prompts and the
    seconds from Cancel to the first one's end."""
    import aiohttp

    client = str(uuid.uuid4())
    status, pressed, stopped = {}, None, None
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{url.replace('http', 'ws')}/ws?clientId={client}") as ws:
            first = call(url, "/prompt", {"prompt": stalled, "client_id": client})["prompt_id"]
            second = call(url, "/prompt", {"prompt": behind, "client_id": client})["prompt_id"]
            end = time.time() + timeout
            while time.time() < end and len(status) < 2:
                if pressed is None and hub.stalled.is_set():
                    await asyncio.sleep(1.0)
                    pressed = time.monotonic()
                    call(url, "/interrupt", {})
                try:
                    msg = await ws.receive(timeout=0.2)
                except asyncio.TimeoutError:
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(msg.data)
                pid = event.get("data", {}).get("prompt_id")
                if event["type"] in ("execution_success", "execution_error", "execution_interrupted") and \
                        pid in (first, second):
                    status[pid] = event["type"]
                    if pid == first:
                        stopped = time.monotonic()
    return {"stalled": status.get(first), "behind": status.get(second),
            "cancel_seconds": None if pressed is None or stopped is None else stopped - pressed}


def wait_for_log(log: Path, text: str, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if text in log.read_text():
            return True
        time.sleep(0.5)
    return False


def answers(outputs: dict) -> list[str]:
    return [t for out in outputs.values() for t in out.get("text", [])]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI checkout (with main.py)")
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs ComfyUI")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--keep", action="store_true", help="keep the temporary base directory")
    args = p.parse_args(argv)

    pack = load_pack()
    headless = importlib.import_module(f"{PACK_NAME}.nodes.headless")
    ensure_tiny_model = importlib.import_module(f"{PACK_NAME}.adatp_core.models.tiny").ensure_tiny_model
    builtin_tiny = importlib.import_module(f"{PACK_NAME}.adatp_core.models.names").BUILTIN_TINY

    base = Path(tempfile.mkdtemp(prefix="adatp-comfy-download-"))
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_NAME).symlink_to(PACK_DIR, target_is_directory=True)
    extra = base / "extra_catalog.json"
    extra.write_text(json.dumps([{"repo_id": REPO, "model_type": "llava_onevision", "disk_gb": 0.0012,
                                  "vram_bf16_gb": 0.1, "vram_4bit_gb": 0.05}]))
    label = f"\u2b07 {REPO} (0.0 GB)"
    env = {**os.environ, "ADATP_EXTRA_CATALOG": str(extra), "HF_HOME": str(base / "hf_home"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_TOKEN", None)

    workflow = json.loads((PACK_DIR / "workflows" / "adatp_video_qa.json").read_text())
    prompt = headless.Workflow(workflow, pack.NODE_CLASS_MAPPINGS).to_api()
    load_id = next(k for k, v in prompt.items() if v["class_type"] == "AdaTP_LoadVideoLLM")
    prompt[load_id]["inputs"]["model"] = label
    folder = base / "models" / "LLM" / "tiny-llava-onevision"
    failed = []

    def check(what: str, passed) -> None:
        if not passed:
            failed.append(what)

    hub = FakeHub({REPO: FakeRepo.from_folder(ensure_tiny_model())}, lifetime=args.timeout * 3).start()
    print(f"fake hub at {hub.url} serving {REPO}; base directory {base}")
    env["HF_ENDPOINT"] = hub.url
    server = Server(args.comfyui, args.python, base, env, 1)
    try:
        server.wait_ready(120)
        choices = call(server.url, "/object_info/AdaTP_LoadVideoLLM")["AdaTP_LoadVideoLLM"]["input"]["required"]
        listed = choices["model"][0]
        print(f"run 1: model list {listed}")
        check("the catalog entry is listed", label in listed)

        # A hub that stops answering (at the listing, then midway through the weights): Cancel
        # stops the prompt at once, and the prompt queued behind it runs.
        behind = json.loads(json.dumps(prompt))
        behind[load_id]["inputs"]["model"] = builtin_tiny
        for where in ("listing", "file midway"):
            if where == "listing":
                hub.hang.add("GET /api/models/")
            else:
                hub.stall_after["model.safetensors"] = 4096
            result = asyncio.run(cancel_a_stall(server.url, prompt, behind, hub, args.timeout))
            hub.release()
            print(f"run S ({where} stalls): {result}")
            check(f"Cancel stops a download stalled at the {where} within 2 s, and the next prompt runs",
                  result["stalled"] == "execution_interrupted" and result["behind"] == "execution_success"
                  and result["cancel_seconds"] is not None and result["cancel_seconds"] < 2.0
                  and not folder.exists())

        # Cancel in the middle of a (slowed down) download, then run again: it must continue.
        loads_before = server.log.read_text().count("Requested to load _WeightsHolder")  # the runs behind
        hub.throttle = 0.2
        result = asyncio.run(run_prompt(server.url, prompt, load_id, args.timeout, interrupt=True))
        hub.throttle = 0.0
        partial = folder.with_name(f".{folder.name}.partial")
        kept = sorted(f.name for f in partial.iterdir() if f.is_file()) if partial.is_dir() else []
        print(f"run 0: Cancel after {result['progress'][-1] if result['progress'] else None} bytes: "
              f"{result['status']}; model folder exists: {folder.exists()}; kept in {partial.name}: {kept}")
        check("Cancel stops the download, leaving no model folder",
              result["status"] == "execution_interrupted" and not folder.exists() and partial.is_dir())
        start = time.time()
        result = asyncio.run(run_prompt(server.url, prompt, load_id, args.timeout))
        gets = [p for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p]
        print(f"run 1: {result['status']} in {time.time() - start:.1f} s; hub requests {len(hub.requests)} "
              f"({len(gets)} file GETs); load node progress {len(result['progress'])} messages: "
              f"{result['progress'][:2]} ... {result['progress'][-2:]}")
        for text in answers(result["outputs"]):
            print(f"run 1: text {text[:160]!r}")
        total = sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) if folder.is_dir() else -1
        check("run 1 answers", result["status"] == "execution_success" and bool(answers(result["outputs"])))
        check("progress in bytes up to the total", bool(result["progress"]) and result["progress"][-1] == (total, total))
        refetched = [name for name in kept if hub.gets(name) != 1]
        print(f"run 1: files kept from run 0 fetched again: {refetched}")
        check("the second try continues, and leaves no partial folder", not refetched and not partial.exists())
        print(f"run 1: {folder} holds {sorted(f.name for f in folder.iterdir()) if folder.is_dir() else None}")

        # "Unload models": ComfyUI's model management must unload the Video LLM, and the next
        # stage must load it back (the loader's output stays cached; only the question changes).
        # ComfyUI acts on the flag when its queue worker next wakes: after the next prompt.
        extract_id = next(k for k, v in prompt.items() if v["class_type"] == "AdaTP_ExtractAttention")
        call(server.url, "/free", {"unload_models": True})
        statuses = []
        for question in ("What moves first?", "What is left at the end?"):
            again = json.loads(json.dumps(prompt))
            again[extract_id]["inputs"]["question"] = question
            statuses.append(asyncio.run(run_prompt(server.url, again, load_id, args.timeout))["status"])
            if len(statuses) == 1:
                unloaded = wait_for_log(server.log, "Unloading _WeightsHolder", 60)
        loads = server.log.read_text().count("Requested to load _WeightsHolder") - loads_before
        print(f"run 1b: POST /free unload_models, two more questions: {statuses}; ComfyUI unloaded the model: "
              f"{unloaded}; it was loaded {loads} times in all")
        check("Unload models unloads it and the next stage loads it back",
              unloaded and statuses == ["execution_success"] * 2 and loads == 2)
    finally:
        server.stop()
        hub.close()

    requests_before = len(hub.requests)
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"  # the network is gone
    server = Server(args.comfyui, args.python, base, env, 2)
    try:
        server.wait_ready(120)
        listed = call(server.url, "/object_info/AdaTP_LoadVideoLLM")["AdaTP_LoadVideoLLM"]["input"]["required"][
            "model"][0]
        print(f"run 2 (hub stopped, HF_ENDPOINT {env['HF_ENDPOINT']}): model list {listed}")
        check("the list shows the local folder", "tiny-llava-onevision" in listed and label not in listed)
        start = time.time()
        result = asyncio.run(run_prompt(server.url, prompt, load_id, args.timeout))  # the saved label still works
        print(f"run 2: {result['status']} in {time.time() - start:.1f} s; hub requests since run 1: "
              f"{len(hub.requests) - requests_before}; load node progress messages {len(result['progress'])}")
        for text in answers(result["outputs"]):
            print(f"run 2: text {text[:160]!r}")
        check("run 2 answers offline", result["status"] == "execution_success" and bool(answers(result["outputs"])))
        check("run 2 makes no request to the hub", len(hub.requests) == requests_before)
    finally:
        server.stop()
        if not args.keep and not failed:
            import shutil

            shutil.rmtree(base, ignore_errors=True)
    for what in failed:
        print(f"FAIL: {what}")
    print("OK" if not failed else f"FAIL (logs in {base})")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
