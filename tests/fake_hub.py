"""A tiny stand-in for the Hugging Face Hub, over HTTP on 127.0.0.1, for tests.

It implements what huggingface_hub calls to download a model repository:
- ``GET /api/models/{owner}/{name}[/revision/{rev}]``: the repository's info, its
  commit (``sha``) and files (``siblings`` with sizes);
- ``HEAD`` and ``GET /{owner}/{name}/resolve/{rev}/{file}``: ``ETag``,
  ``Content-Length``, ``X-Repo-Commit``, and ``Range`` requests (206) for resuming;
- 401 with ``X-Error-Code: GatedRepo`` for a gated repository without the token,
  401 ``RepoNotFound`` for an unknown repository, 404 ``EntryNotFound`` for a file.

Every request is logged in ``hub.requests`` as (method, path, range header).
``drop_after[file] = n`` makes the next GET of that file send n bytes and drop
the connection (a network fault in the middle of a file); ``throttle`` slows
every file body down. Stalls (a proxy, mirror or firewall that hangs):
``hang`` holds substrings of "METHOD /path": a matching request is read and
never answered; ``stall_after[file] = n`` makes every GET of that file send its
headers and n bytes, then nothing. ``stalled`` is set when a stall begins, and
``release()`` ends the stalls (their connections close). The server binds an
ephemeral port, and stops on ``close()``, at the end of a ``with`` block, or
by itself after ``lifetime`` seconds.

``SilentListener`` is the plainest stall: it accepts connections and never
answers, not even with an HTTP status line.

Run it by hand (used by scripts/check_comfyui_download.py):
    python tests/fake_hub.py --repo adatp-test/tiny-llava-onevision=/path/to/model/folder
    python tests/fake_hub.py --silent          # accepts, never answers
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

TOKEN = "hf_fake_token_for_tests"


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    gated: bool = False
    sha: str = ""

    def __post_init__(self):
        if not self.sha:
            digest = hashlib.sha1()
            for name in sorted(self.files):
                digest.update(name.encode() + b"\0" + self.files[name])
            self.sha = digest.hexdigest()

    @classmethod
    def from_folder(cls, folder, extra: dict[str, bytes] | None = None, gated: bool = False) -> "FakeRepo":
        files = {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}
        return cls({**files, **(extra or {})}, gated=gated)


class _Served:
    """``with`` support for a server with start() and close()."""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class FakeHub(_Served):
    repos: dict[str, FakeRepo]
    lifetime: float = 300.0
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    drop_after: dict[str, int] = field(default_factory=dict)
    throttle: float = 0.0  # seconds to wait before each 64 KiB of a file body (a slow network)
    hang: set[str] = field(default_factory=set)  # substrings of "METHOD /path": never answered
    stall_after: dict[str, int] = field(default_factory=dict)  # file: bytes sent before the body stalls

    def __post_init__(self):
        hub = self
        self.stalled = threading.Event()  # a stall has begun
        self._released = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._handle(self, body=False)

            def do_GET(self):
                hub._handle(self, body=True)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is fine
                    super().handle_error(request, client_address)

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)
        self._timer = threading.Timer(self.lifetime, self.close)
        self._timer.daemon = True
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        self._thread.start()
        self._timer.start()
        return self

    def close(self) -> None:
        self._timer.cancel()
        self._released.set()
        self._server.shutdown()
        self._server.server_close()

    def release(self) -> None:
        """End the stalls in progress (their connections close) and stop stalling."""
        self.hang.clear()
        self.stall_after.clear()
        self.stalled.clear()
        released, self._released = self._released, threading.Event()
        released.set()

    def _stall(self, h: BaseHTTPRequestHandler) -> None:
        released = self._released
        self.stalled.set()
        released.wait(self.lifetime)
        h.close_connection = True

    def gets(self, filename: str) -> int:
        """How many GET requests fetched a file (by its path in the repository)."""
        return sum(1 for m, p, _ in self.requests
                   if m == "GET" and "/resolve/" in p and p.split("/resolve/", 1)[1].split("/", 1)[-1] == filename)

    # ----- request handling -------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        with self._lock:
            self.requests.append((h.command, path, h.headers.get("Range")))
        if any(s in f"{h.command} {path}" for s in list(self.hang)):
            return self._stall(h)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return self._info(h, "/".join(parts[2:4]), body)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._file(h, "/".join(parts[:2]), "/".join(parts[4:]), body)
        self._error(h, 404, "Not found", None, body)

    def _error(self, h, status: int, message: str, code: str | None, body: bool) -> None:
        data = json.dumps({"error": message}).encode()
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    def _info(self, h, repo_id: str, body: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 401, "Repository not found", "RepoNotFound", body)
        info = {
            "id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
            "gated": "manual" if repo.gated else False, "disabled": False, "tags": [],
            "siblings": [{"rfilename": n, "size": len(d), "blobId": hashlib.sha1(d).hexdigest()}
                         for n, d in sorted(repo.files.items())],
        }
        data = json.dumps(info).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    def _file(self, h, repo_id: str, filename: str, body: bool) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 401, "Repository not found", "RepoNotFound", body)
        if repo.gated and h.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._error(h, 401, f"Access to model {repo_id} is restricted. You must have access to it "
                                       "and be authenticated to access it. Please log in.", "GatedRepo", body)
        data = repo.files.get(filename)
        if data is None:
            return self._error(h, 404, "Entry not found", "EntryNotFound", body)
        start, status = 0, 200
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes=") and rng[6:].split("-")[0].isdigit():
            start, status = int(rng[6:].split("-")[0]), 206
        chunk = data[start:]
        h.send_response(status)
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("X-Repo-Commit", repo.sha)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(chunk)))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if not body:
            return
        with self._lock:
            drop = self.drop_after.pop(filename, None)
            stall = self.stall_after.get(filename)
        if stall is not None:
            h.wfile.write(chunk[:stall])
            h.wfile.flush()
            return self._stall(h)
        if drop is not None and drop < len(chunk):
            h.wfile.write(chunk[:drop])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)  # the peer sees a body shorter than Content-Length
            return
        for i in range(0, len(chunk), 65536) if self.throttle else (0,):
            time.sleep(self.throttle)
            h.wfile.write(chunk[i:i + 65536] if self.throttle else chunk)


class SilentListener(_Served):
    """Accepts connections on 127.0.0.1 and never answers (a hung proxy or mirror).

    ``connections`` counts the connections accepted, and ``stalled`` is set at the first (as
    FakeHub's). Stops on ``close()``, at the end of a ``with`` block, or by itself after
    ``lifetime`` seconds; its connections close then.
    """

    def __init__(self, lifetime: float = 300.0):
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self._sock.settimeout(0.1)
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self.stalled = threading.Event()
        self._deadline = time.monotonic() + lifetime
        self._thread = threading.Thread(target=self._accept, daemon=True)
        host, port = self._sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"

    @property
    def connections(self) -> int:
        return len(self._held)

    def _accept(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                break
            self._held.append(conn)  # kept open, never read from or written to
            self.stalled.set()
        for conn in self._held:
            conn.close()

    def start(self) -> "SilentListener":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Serve model folders as a fake Hugging Face Hub.")
    p.add_argument("--repo", action="append", default=[], help="OWNER/NAME=FOLDER (repeatable)")
    p.add_argument("--silent", action="store_true", help="accept connections and never answer")
    p.add_argument("--lifetime", type=float, default=600, help="seconds before it stops by itself")
    p.add_argument("--url-file", help="write the hub's URL into this file once it serves")
    args = p.parse_args(argv)
    if args.silent:
        listener = SilentListener(lifetime=args.lifetime).start()
        if args.url_file:
            Path(args.url_file).write_text(listener.url)
        print(listener.url, flush=True)
        listener._thread.join()
        return
    if not args.repo:
        p.error("give --repo OWNER/NAME=FOLDER, or --silent")
    repos = {spec.split("=", 1)[0]: FakeRepo.from_folder(spec.split("=", 1)[1]) for spec in args.repo}
    hub = FakeHub(repos, lifetime=args.lifetime).start()
    if args.url_file:
        Path(args.url_file).write_text(hub.url)
    print(hub.url, flush=True)
    seen = 0
    try:
        while hub._thread.is_alive():
            time.sleep(0.2)
            for method, path, rng in hub.requests[seen:]:
                print(f"{method} {path}" + (f" Range: {rng}" if rng else ""), flush=True)
            seen = len(hub.requests)
    except KeyboardInterrupt:
        hub.close()


if __name__ == "__main__":
    main()
