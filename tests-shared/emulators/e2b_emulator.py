"""A wire emulator of E2B: the control plane API and each sandbox's envd daemon, on one port.

Layer: tests-shared (emulators). Imports: the standard library, ``e2b_envd`` (emulated sandboxes)
and ``e2b_envd_routes`` (envd's HTTP side), both next to this file, and
``metaflow_extensions.sandbox.core`` (each sandbox is a core ``local`` sandbox under bubblewrap).

    python tests-shared/emulators/e2b_emulator.py --port PORT [--default-lifetime S] [faults...]

prints ``READY http://127.0.0.1:PORT`` once it accepts connections. Point the real ``e2b`` SDK at
it with ``E2B_API_URL=E2B_SANDBOX_URL=http://127.0.0.1:PORT`` and ``E2B_API_KEY=e2b_`` + 40 zeros.

It speaks what the SDK (2.7 to 2.63) sends: the REST control plane (``/sandboxes``, ``/v2/sandboxes``:
create, connect, info, list by metadata with pagination, timeout, kill), envd's Connect protocol
with the JSON codec (``process.Process/Start|Connect`` as streams of enveloped events over chunked
HTTP/1.1 with keepalives; ``List``, ``SendSignal`` unary) and the files API (``GET|POST /files``,
multipart or octet-stream, gzip). Sandboxes expire at their timeout like the real service (which
refuses timeouts over 24 h); ``--max-lifetime S`` silently caps every timeout to S seconds, so a
test can scale the lifetime down and check that long commands are kept alive.

Test hooks: ``GET /_emulator/state`` → ``{"live", "created", "destroyed"}``; faults from flags or
``POST /_emulator/faults`` (a JSON object with the same keys as ``E2BFaults``): latency, a fraction of
control-plane requests answered 429 or 503, the next N matching commands' sandboxes dying
mid-command, the next N matching command streams stalling (no events at all, the connection left
open) while the command runs on, the next N matching uploads stalling (body never read).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2b_envd import EmulatedSandbox
from e2b_envd_routes import EnvdRoutes
from emulator_faults import Faults

from metaflow_extensions.sandbox.core import get_backend

DEFAULT_API_KEY = "e2b_" + "0" * 40
ENVD_VERSION = "0.5.7"  # >= 0.4.0: default user, no Basic auth; >= 0.5.7: octet-stream uploads
CPU, MEMORY_MB, DISK_MB = 2, 512, 10240  # what E2B's base template reports
PLAN_MAX_TIMEOUT_S = 86400  # E2B refuses longer sandbox timeouts (24 h on Pro plans)


@dataclasses.dataclass
class E2BFaults(Faults):
    stall_upload_next: int = dataclasses.field(default=0, metadata={"help": "the next N matching uploads stall"})


class Emulator:
    def __init__(self, args: argparse.Namespace):
        self.api_key = args.api_key
        self.default_lifetime = args.default_lifetime
        self.max_lifetime = args.max_lifetime
        self.keepalive_s = args.keepalive_s
        self.templates = set(args.templates.split(","))
        self.faults = E2BFaults.from_flags(args)
        self.root = Path(tempfile.mkdtemp(prefix="e2b-emulator-"))
        self.local = get_backend("local", isolation="bwrap", root=self.root)
        self.sandboxes: dict[str, EmulatedSandbox] = {}
        self.lock = threading.Lock()
        self.created = self.destroyed = 0
        threading.Thread(target=self._expire, daemon=True).start()

    def lifetime(self, requested: Any) -> float:
        value = float(requested) if requested else float(self.default_lifetime)
        return min(value, float(self.max_lifetime))

    def remove(self, sandbox_id: str) -> bool:
        with self.lock:
            sbx = self.sandboxes.pop(sandbox_id, None)
            if sbx is not None:
                self.destroyed += 1
        if sbx is None:
            return False
        sbx.kill()
        return True

    def _expire(self) -> None:
        while True:
            time.sleep(0.2)
            now = time.time()
            for sbx in [s for s in list(self.sandboxes.values()) if s.deadline <= now]:
                self.remove(sbx.id)

    def state(self) -> dict[str, int]:
        with self.lock:
            return {"live": len(self.sandboxes), "created": self.created, "destroyed": self.destroyed}


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


class Handler(EnvdRoutes, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "e2b-emulator/1"
    emu: Emulator

    def log_message(self, format: str, *args: Any) -> None:
        if os.environ.get("E2B_EMULATOR_VERBOSE"):
            super().log_message(format, *args)

    # -- HTTP plumbing ---------------------------------------------------------------------------

    def body_chunks(self) -> Iterator[bytes]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                left = size
                while left:
                    data = self.rfile.read(min(left, 1 << 20))
                    if not data:
                        raise ConnectionError("client went away mid-body")
                    left -= len(data)
                    yield data
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                data = self.rfile.read(min(left, 1 << 20))
                if not data:
                    raise ConnectionError("client went away mid-body")
                left -= len(data)
                yield data

    def body(self) -> bytes:
        return b"".join(self.body_chunks())

    def reply(self, status: int, payload: Any = None, *, headers: dict[str, str] | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, status: int, message: str) -> None:
        self.reply(status, {"code": status, "message": message})

    def connect_error(self, status: int, code: str, message: str) -> None:
        self.reply(status, {"code": code, "message": message})

    def chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def drop(self) -> None:
        """Cut the connection mid-response, as a vanished sandbox does."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def client_gone(self) -> bool:
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    # -- dispatch --------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def do_DELETE(self) -> None:
        self.dispatch("DELETE")

    def dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        try:
            if path.startswith("/_emulator/"):
                return self.admin(method, path)
            faults = self.emu.faults
            if faults.latency_ms:
                time.sleep(faults.latency_ms / 1000)
            if path.startswith(("/process.Process/", "/filesystem.Filesystem/", "/files", "/health")):
                return self.envd(method, path, query)
            if self.headers.get("X-API-KEY") != self.emu.api_key:
                self.body()
                return self.error(401, "Invalid API key")
            refusal = faults.refusal()
            if refusal == 429:
                self.body()
                return self.error(429, "Rate limit exceeded (emulated)")
            if refusal == 503:
                self.body()
                return self.error(503, "Service busy (emulated)")
            return self.control(method, path, query)
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True

    def admin(self, method: str, path: str) -> None:
        if path == "/_emulator/state":
            return self.reply(200, self.emu.state())
        if path == "/_emulator/faults" and method == "POST":
            problem = self.emu.faults.update(json.loads(self.body() or b"{}"))
            if problem:
                return self.error(400, problem)
            return self.reply(200, self.emu.faults.as_dict())
        self.error(404, f"no emulator route {method} {path}")

    # -- control plane ---------------------------------------------------------------------------

    def control(self, method: str, path: str, query: dict[str, list[str]]) -> None:  # noqa: PLR0911 - a flat route table
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["v2"]:
            parts = parts[1:]
        if parts[:1] != ["sandboxes"]:
            self.body()
            return self.error(404, f"no route {method} {path}")
        if len(parts) == 1 and method == "POST":
            return self.create(json.loads(self.body() or b"{}"))
        if len(parts) == 1 and method == "GET":
            return self.list(query)
        sandbox_id = parts[1]
        body = json.loads(self.body() or b"{}") if method == "POST" else {}
        sbx = self.emu.sandboxes.get(sandbox_id)
        if sbx is None:
            return self.error(404, f"sandbox {sandbox_id} not found")
        if len(parts) == 2 and method == "GET":
            return self.reply(200, self.detail(sbx))
        if len(parts) == 2 and method == "DELETE":
            self.emu.remove(sandbox_id)
            return self.reply(204)
        if parts[2:] == ["timeout"] and method == "POST":
            if float(body.get("timeout") or 0) > PLAN_MAX_TIMEOUT_S:
                return self.error(400, "Timeout cannot be greater than 24 hours")
            sbx.set_timeout(self.emu.lifetime(body.get("timeout")))
            return self.reply(204)
        if parts[2:] == ["connect"] and method == "POST":
            deadline = time.time() + self.emu.lifetime(body.get("timeout"))
            sbx.deadline = max(sbx.deadline, deadline)  # connect only ever extends
            return self.reply(200, self.created_body(sbx))
        self.error(404, f"no route {method} {path}")

    def created_body(self, sbx: EmulatedSandbox) -> dict[str, Any]:
        return {
            "templateID": sbx.template,
            "sandboxID": sbx.id,
            "clientID": "emulator",
            "envdVersion": ENVD_VERSION,
            "envdAccessToken": sbx.access_token,
        }

    def detail(self, sbx: EmulatedSandbox) -> dict[str, Any]:
        return {
            **self.created_body(sbx),
            "startedAt": iso(sbx.started_at),
            "endAt": iso(sbx.deadline),
            "cpuCount": CPU,
            "memoryMB": MEMORY_MB,
            "diskSizeMB": DISK_MB,
            "state": "running",
            "metadata": sbx.metadata,
            "allowInternetAccess": sbx.network,
        }

    def create(self, body: dict[str, Any]) -> None:
        if float(body.get("timeout") or 0) > PLAN_MAX_TIMEOUT_S:
            return self.error(400, "Timeout cannot be greater than 24 hours")
        template = body.get("templateID") or "base"
        if template not in self.emu.templates:
            return self.error(404, f"template '{template}' not found")
        network = body.get("allow_internet_access", body.get("allowInternetAccess"))
        sbx = EmulatedSandbox(
            self.emu.local,
            f"i{uuid.uuid4().hex[:19]}",
            template=template,
            metadata=body.get("metadata") or {},
            env_vars=body.get("envVars") or {},
            network=network is not False,
            timeout_s=self.emu.lifetime(body.get("timeout")),
            access_token=uuid.uuid4().hex,
        )
        with self.emu.lock:
            self.emu.sandboxes[sbx.id] = sbx
            self.emu.created += 1
        self.reply(201, self.created_body(sbx))

    def list(self, query: dict[str, list[str]]) -> None:
        wanted: dict[str, str] = {}
        for raw in query.get("metadata", []):
            wanted.update({unquote(k): unquote(v[0]) for k, v in parse_qs(raw).items()})
        states = {s for raw in query.get("state", []) for s in raw.split(",")}
        found = sorted(
            (s for s in list(self.emu.sandboxes.values()) if wanted.items() <= s.metadata.items()),
            key=lambda s: s.id,
        )
        if states and "running" not in states:
            found = []
        start = int(query.get("nextToken", ["0"])[0] or 0)
        limit = int(query.get("limit", ["100"])[0] or 100)
        page = found[start : start + limit]
        headers = {"x-next-token": str(start + limit)} if start + limit < len(found) else {}
        self.reply(200, [self.detail(s) for s in page], headers=headers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    parser.add_argument("--templates", default="base", help="comma-separated template names that exist")
    parser.add_argument("--default-lifetime", type=float, default=300, help="seconds, when create sends none")
    parser.add_argument(
        "--max-lifetime",
        type=float,
        default=PLAN_MAX_TIMEOUT_S,
        help="silently cap every requested timeout to this (s): scaled-down lifetimes for tests",
    )
    parser.add_argument("--keepalive-s", type=float, default=0, help="keepalive ping interval cap (s)")
    E2BFaults.add_flags(parser)
    args = parser.parse_args()
    Handler.emu = Emulator(args)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    # Terminating the emulator (what test fixtures do) removes every sandbox it still holds.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"READY http://127.0.0.1:{args.port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        for sandbox_id in list(Handler.emu.sandboxes):
            Handler.emu.remove(sandbox_id)
        shutil.rmtree(Handler.emu.root, ignore_errors=True)


if __name__ == "__main__":
    main()
