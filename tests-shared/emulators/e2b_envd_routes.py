"""The envd half of the E2B emulator's HTTP handler: process RPCs and the files API.

Layer: tests-shared (emulators). Imports: the standard library and ``e2b_envd`` (next to this file).

A mixin of ``e2b_emulator.Handler``, which provides the HTTP plumbing used here (``body``,
``reply``, ``error``, ``connect_error``, ``chunk``, ``drop``, ``client_gone``) and ``emu``, the
emulator's state. Streaming RPCs (``process.Process/Start|Connect``) answer with Connect
envelopes (JSON codec) over chunked HTTP/1.1: a start event, data events as output arrives,
keepalives when the process is silent, the end event and the end-of-stream envelope.
"""

from __future__ import annotations

import base64
import json
import mmap
import queue
import re
import struct
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

from e2b_envd import DATA, DEAD, END, EmulatedSandbox, SandboxFileNotFound, resolve


def envelope(payload: dict[str, Any], flags: int = 0) -> bytes:
    data = json.dumps(payload).encode()
    return struct.pack(">BI", flags, len(data)) + data


class EnvdRoutes:
    """envd's routes, for a sandbox named by the ``E2b-Sandbox-Id`` header."""

    emu: Any
    headers: Any

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
