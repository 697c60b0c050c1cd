"""A wire emulator of E2B: the control plane API and each sandbox's envd daemon, on one port.

Layer: tests-shared (emulators). Imports: the standard library, ``e2b_envd`` (next to this file) and
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
``POST /_emulator/faults`` (a JSON object with the same keys as ``Faults``): latency, a fraction of
control-plane requests answered 429 or 503, the next N matching commands' sandboxes dying
mid-command, the next N matching command streams stalling (no events at all, the connection left
open) while the command runs on, the next N matching uploads stalling (body never read).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import mmap
import os
import queue
import random
import re
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2b_envd import DATA, DEAD, END, EmulatedSandbox, SandboxFileNotFound, resolve

from metaflow_extensions.sandbox.core import get_backend

DEFAULT_API_KEY = "e2b_" + "0" * 40
ENVD_VERSION = "0.5.7"  # >= 0.4.0: default user, no Basic auth; >= 0.5.7: octet-stream uploads
CPU, MEMORY_MB, DISK_MB = 2, 512, 10240  # what E2B's base template reports
PLAN_MAX_TIMEOUT_S = 86400  # E2B refuses longer sandbox timeouts (24 h on Pro plans)


@dataclasses.dataclass
class Faults:
    latency_ms: float = 0.0
    rate_429: float = 0.0
    rate_503: float = 0.0
    die_next: int = 0
    die_after_s: float = 0.5
    stall_next: int = 0
    stall_upload_next: int = 0
    match: str = ""

    def take(self, kind: str, command: str) -> bool:
        """Consume one ``die``/``stall`` fault if one is pending for ``command``."""
        with _FAULT_LOCK:
            left = getattr(self, f"{kind}_next")
            if left > 0 and self.match in command:
                setattr(self, f"{kind}_next", left - 1)
                return True
        return False


_FAULT_LOCK = threading.Lock()


class Emulator:
    def __init__(self, args: argparse.Namespace):
        self.api_key = args.api_key
        self.default_lifetime = args.default_lifetime
        self.max_lifetime = args.max_lifetime
        self.keepalive_s = args.keepalive_s
        self.templates = set(args.templates.split(","))
        self.faults = Faults(
            latency_ms=args.latency_ms,
            rate_429=args.rate_429,
            rate_503=args.rate_503,
            die_next=args.die_next,
            die_after_s=args.die_after_s,
            stall_next=args.stall_next,
            stall_upload_next=args.stall_upload_next,
            match=args.fault_match,
        )
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


def envelope(payload: dict[str, Any], flags: int = 0) -> bytes:
    data = json.dumps(payload).encode()
    return struct.pack(">BI", flags, len(data)) + data


class Handler(BaseHTTPRequestHandler):
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
            roll = random.random()
            if roll < faults.rate_429:
                self.body()
                return self.error(429, "Rate limit exceeded (emulated)")
            if roll < faults.rate_429 + faults.rate_503:
                self.body()
                return self.error(503, "Service busy (emulated)")
            return self.control(method, path, query)
        except (ConnectionError, BrokenPipeError):
            self.close_connection = True

    def admin(self, method: str, path: str) -> None:
        if path == "/_emulator/state":
            return self.reply(200, self.emu.state())
        if path == "/_emulator/faults" and method == "POST":
            update = json.loads(self.body() or b"{}")
            faults = self.emu.faults
            with _FAULT_LOCK:
                for key, value in update.items():
                    if not hasattr(faults, key):
                        return self.error(400, f"unknown fault {key!r}")
                    setattr(faults, key, type(getattr(faults, key))(value))
            return self.reply(200, dataclasses.asdict(faults))
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

    # -- envd ------------------------------------------------------------------------------------

    def envd(self, method: str, path: str, query: dict[str, list[str]]) -> None:  # noqa: PLR0911 - a flat route table
        sbx = self.emu.sandboxes.get(self.headers.get("E2b-Sandbox-Id", ""))
        if sbx is None or not sbx.alive:
            self.body()
            # What E2B's edge proxy answers for a sandbox that is not running.
            return self.error(502, "The sandbox was not found: it may have been killed or timed out")
        if path == "/health":
            return self.reply(204)
        if self.headers.get("X-Access-Token") != sbx.access_token:
            self.body()
            return self.error(401, "invalid access token")
        if path == "/files":
            return self.files_get(sbx, query) if method == "GET" else self.files_post(sbx, query)
        service_method = path.strip("/")
        if service_method in ("process.Process/Start", "process.Process/Connect"):
            return self.stream(sbx, service_method.split("/")[1])
        request = json.loads(self.body() or b"{}")
        if service_method == "process.Process/List":
            processes = [
                {"config": p.config, "pid": p.pid, **({"tag": p.tag} if p.tag else {})}
                for p in list(sbx.processes.values())
            ]
            return self.reply(200, {"processes": processes})
        if service_method == "process.Process/SendSignal":
            pid = int((request.get("process") or {}).get("pid") or 0)
            if not sbx.signal(pid):
                return self.connect_error(404, "not_found", f"process with pid {pid} not found")
            return self.reply(200, {})
        self.connect_error(501, "unimplemented", f"{service_method} is not emulated")

    def stream(self, sbx: EmulatedSandbox, method: str) -> None:
        raw = self.body()
        flags, length = struct.unpack(">BI", raw[:5])
        if flags & 0x01:
            raw = raw[:5] + zlib.decompress(raw[5:], 16 + zlib.MAX_WBITS)
        request = json.loads(raw[5 : 5 + length] if not flags & 0x01 else raw[5:])
        timeout_ms = self.headers.get("Connect-Timeout-Ms")
        if timeout_ms and not timeout_ms.isdigit():
            # connect-go (envd) accepts only an integer of at most 10 digits.
            return self.connect_error(400, "invalid_argument", f"invalid Connect-Timeout-Ms {timeout_ms!r}")
        timeout_s = int(timeout_ms) / 1000 if timeout_ms else None
        if method == "Start":
            config = request.get("process") or {}
            command = " ".join(str(a) for a in config.get("args") or [])
            stall = self.emu.faults.take("stall", command)
            proc, events = sbx.start(config, request.get("tag", ""), timeout_s, stall=stall)
            if self.emu.faults.take("die", command):
                threading.Timer(self.emu.faults.die_after_s, self.emu.remove, args=(sbx.id,)).start()
        else:
            pid = int((request.get("process") or {}).get("pid") or 0)
            found = sbx.processes.get(pid)
            if found is None:
                return self.connect_error(404, "not_found", f"process with pid {pid} not found")
            proc, events = found, found.subscribe()
        interval = float(self.headers.get("Keepalive-Ping-Interval") or 50)
        if self.emu.keepalive_s:
            interval = min(interval, self.emu.keepalive_s)
        self.send_response(200)
        self.send_header("Content-Type", "application/connect+json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            self.chunk(envelope({"event": {"start": {"pid": proc.pid}}}))
            if proc.stall:
                return self.stalled(sbx)
            self.pump(events, interval)
        finally:
            proc.unsubscribe(events)

    def pump(self, events: queue.Queue[tuple[Any, ...]], interval: float) -> None:
        while True:
            try:
                event = events.get(timeout=interval)
            except queue.Empty:
                self.chunk(envelope({"event": {"keepalive": {}}}))
                continue
            kind = event[0]
            if kind == DATA:
                data = base64.b64encode(event[2]).decode()
                self.chunk(envelope({"event": {"data": {event[1]: data}}}))
                continue
            if kind == DEAD:
                return self.drop()
            if kind == END:
                code, status = event[1], event[2]
                end = {"exitCode": code, "exited": True, "status": status}
                if code != 0:
                    end["error"] = status
                self.chunk(envelope({"event": {"end": end}}))
                self.chunk(envelope({}, flags=0x02))
            else:  # DEADLINE
                error = {"code": "deadline_exceeded", "message": "the command's deadline passed"}
                self.chunk(envelope({"error": error}, flags=0x02))
            self.chunk(b"")
            return

    def stalled(self, sbx: EmulatedSandbox) -> None:
        """Say nothing more until the client hangs up or the sandbox goes away."""
        while sbx.alive and not self.client_gone():
            time.sleep(0.2)
        self.drop()

    def files_get(self, sbx: EmulatedSandbox, query: dict[str, list[str]]) -> None:
        path = query.get("path", [""])[0]
        with tempfile.TemporaryDirectory(prefix="e2b-emu-get-") as tmp:
            local = Path(tmp) / "file"
            try:
                sbx.read_file(path, local)
            except SandboxFileNotFound:
                return self.error(404, f"path '{resolve(path)}' does not exist")
            size = local.stat().st_size
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            with local.open("rb") as f:
                while data := f.read(1 << 20):
                    self.wfile.write(data)

    def files_post(self, sbx: EmulatedSandbox, query: dict[str, list[str]]) -> None:
        if self.emu.faults.take("stall_upload", query.get("path", [""])[0]):
            return self.stalled(sbx)  # never reads the body nor answers
        content_type = self.headers.get("Content-Type", "")
        gzipped = self.headers.get("Content-Encoding", "").lower() == "gzip"
        with tempfile.TemporaryDirectory(prefix="e2b-emu-post-") as tmp:
            body = Path(tmp) / "body"
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None
            with body.open("wb") as f:
                for data in self.body_chunks():
                    f.write(inflate.decompress(data) if inflate else data)
                if inflate:
                    f.write(inflate.flush())
            if content_type.startswith("multipart/form-data"):
                boundary = re.search(r'boundary="?([^";]+)"?', content_type)
                if boundary is None:
                    return self.error(400, "multipart body without a boundary")
                parts = split_multipart(body, boundary.group(1).encode(), Path(tmp))
            else:
                parts = [(query.get("path", [""])[0], body)]
            written = []
            for name, file in parts:
                path = query.get("path", [name])[0] if len(parts) == 1 else name
                if not path:
                    return self.error(400, "no path for the uploaded file")
                target = sbx.write_file(file, path)
                written.append({"name": Path(target).name, "type": "file", "path": target})
        self.reply(200, written)


def split_multipart(body: Path, boundary: bytes, tmp: Path) -> list[tuple[str, Path]]:
    """The ``file`` parts of a multipart body as (filename, file holding the content)."""
    parts = []
    with body.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        delimiter = b"--" + boundary
        pos = data.find(delimiter)
        while pos >= 0 and data[pos + len(delimiter) : pos + len(delimiter) + 2] != b"--":
            head_end = data.find(b"\r\n\r\n", pos)
            head = data[pos + len(delimiter) : head_end].decode("utf-8", "replace")
            end = data.find(b"\r\n" + delimiter, head_end + 4)
            name = re.search(r'filename="([^"]*)"', head)
            part = tmp / f"part-{len(parts)}"
            with part.open("wb") as out:
                for offset in range(head_end + 4, end, 1 << 20):
                    out.write(data[offset : min(end, offset + (1 << 20))])
            parts.append((name.group(1) if name else "", part))
            pos = end + 2
    return parts


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
    parser.add_argument("--latency-ms", type=float, default=0)
    parser.add_argument("--rate-429", type=float, default=0)
    parser.add_argument("--rate-503", type=float, default=0)
    parser.add_argument("--die-next", type=int, default=0, help="the next N matching commands' sandboxes die")
    parser.add_argument("--die-after-s", type=float, default=0.5)
    parser.add_argument("--stall-next", type=int, default=0, help="the next N matching command streams stall")
    parser.add_argument("--stall-upload-next", type=int, default=0, help="the next N matching uploads stall")
    parser.add_argument("--fault-match", default="", help="faults hit only commands/paths containing this")
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
