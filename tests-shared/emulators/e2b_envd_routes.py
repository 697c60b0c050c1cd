"""The envd half of the E2B emulator's HTTP side: process RPCs and the files API, on aiohttp.

Layer: tests-shared (emulators). Imports: the standard library, ``aiohttp`` and ``e2b_envd`` (next
to this file).

``add_envd_routes`` adds envd's routes to the emulator's application (``request.app["emu"]`` is the
``e2b_emulator.Emulator``). Streaming RPCs (``process.Process/Start|Connect``) answer with Connect
envelopes (JSON codec) over chunked HTTP/1.1: a start event, data events as output arrives,
keepalives when the process is silent, the end event and the end-of-stream envelope. A sandbox
that dies cuts its streams (the connection closes mid-body); a stalled stream or upload says
nothing until the client hangs up or the sandbox goes away.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import mmap
import re
import struct
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Any

from aiohttp import web
from e2b_envd import DATA, DEAD, END, EmulatedSandbox, Event, SandboxFileNotFound, resolve

# What envd serves (the edge proxy routes by the ``E2b-Sandbox-Id`` header, not by path).
ENVD_PATHS = ("/process.Process/", "/filesystem.Filesystem/", "/files", "/health")


def add_envd_routes(router: web.UrlDispatcher) -> None:
    for path in ("/process.Process/{method}", "/filesystem.Filesystem/{method}", "/files", "/health"):
        router.add_route("*", path, envd)


def envelope(payload: dict[str, Any], flags: int = 0) -> bytes:
    data = json.dumps(payload).encode()
    return struct.pack(">BI", flags, len(data)) + data


def connect_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)


async def envd(request: web.Request) -> web.StreamResponse:  # noqa: PLR0911 - a flat route table
    """envd's routes, for a sandbox named by the ``E2b-Sandbox-Id`` header."""
    emu = request.app["emu"]
    sbx = emu.find(request.headers.get("E2b-Sandbox-Id", ""))
    if sbx is None or not sbx.alive:
        await request.read()
        # What E2B's edge proxy answers for a sandbox that is not running.
        return emu.error(502, "The sandbox was not found: it may have been killed or timed out")  # type: ignore[no-any-return]
    if request.path == "/health":
        return web.Response(status=204)
    if request.headers.get("X-Access-Token") != sbx.access_token:
        await request.read()
        return emu.error(401, "invalid access token")  # type: ignore[no-any-return]
    if request.path == "/files":
        return await (files_get if request.method == "GET" else files_post)(emu, sbx, request)
    service_method = request.path.strip("/")
    if service_method in ("process.Process/Start", "process.Process/Connect"):
        return await stream(emu, sbx, request, service_method.split("/")[1])
    body = json.loads(await request.read() or b"{}")
    if service_method == "process.Process/List":
        processes = [
            {"config": p.config, "pid": p.pid, **({"tag": p.tag} if p.tag else {})}
            for p in list(sbx.processes.values())
        ]
        return web.json_response({"processes": processes})
    if service_method == "process.Process/SendSignal":
        pid = int((body.get("process") or {}).get("pid") or 0)
        if not sbx.signal(pid):
            return connect_error(404, "not_found", f"process with pid {pid} not found")
        return web.json_response({})
    return connect_error(501, "unimplemented", f"{service_method} is not emulated")


async def stream(emu: Any, sbx: EmulatedSandbox, request: web.Request, method: str) -> web.StreamResponse:
    raw = await request.read()
    flags, length = struct.unpack(">BI", raw[:5])
    if flags & 0x01:
        raw = raw[:5] + zlib.decompress(raw[5:], 16 + zlib.MAX_WBITS)
    message = json.loads(raw[5 : 5 + length] if not flags & 0x01 else raw[5:])
    timeout_ms = request.headers.get("Connect-Timeout-Ms")
    if timeout_ms and not timeout_ms.isdigit():
        # connect-go (envd) accepts only an integer of at most 10 digits.
        return connect_error(400, "invalid_argument", f"invalid Connect-Timeout-Ms {timeout_ms!r}")
    timeout_s = int(timeout_ms) / 1000 if timeout_ms else None
    # The process's thread publishes events; this stream takes them on the event loop.
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def sink(event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the emulator is stopping
            loop.call_soon_threadsafe(events.put_nowait, event)

    if method == "Start":
        config = message.get("process") or {}
        command = " ".join(str(a) for a in config.get("args") or [])
        stall = emu.faults.take("stall", command)
        proc = sbx.start(config, message.get("tag", ""), timeout_s, stall=stall, sink=sink)
        if emu.faults.take("die", command):
            threading.Timer(emu.faults.die_after_s, emu.remove, args=(sbx.id,)).start()
    else:
        pid = int((message.get("process") or {}).get("pid") or 0)
        found = sbx.processes.get(pid)
        if found is None:
            return connect_error(404, "not_found", f"process with pid {pid} not found")
        proc = found
        proc.subscribe(sink)
    interval = float(request.headers.get("Keepalive-Ping-Interval") or 50)
    if emu.keepalive_s:
        interval = min(interval, emu.keepalive_s)
    response = web.StreamResponse(headers={"Content-Type": "application/connect+json"})
    response.enable_chunked_encoding()
    try:
        await response.prepare(request)
        await response.write(envelope({"event": {"start": {"pid": proc.pid}}}))
        if proc.stall:
            await stalled(sbx, request)
        else:
            await pump(events, interval, request, response)
    except ConnectionError:
        drop(request)  # the client went away
    finally:
        proc.unsubscribe(sink)
    return response


async def pump(
    events: asyncio.Queue[Event], interval: float, request: web.Request, response: web.StreamResponse
) -> None:
    while True:
        try:
            event = await asyncio.wait_for(events.get(), interval)
        except asyncio.TimeoutError:
            await response.write(envelope({"event": {"keepalive": {}}}))
            continue
        kind = event[0]
        if kind == DATA:
            data = base64.b64encode(event[2]).decode()
            await response.write(envelope({"event": {"data": {event[1]: data}}}))
            continue
        if kind == DEAD:
            return drop(request)
        if kind == END:
            code, status = event[1], event[2]
            end = {"exitCode": code, "exited": True, "status": status}
            if code != 0:
                end["error"] = status
            await response.write(envelope({"event": {"end": end}}))
            await response.write(envelope({}, flags=0x02))
        else:  # DEADLINE
            error = {"code": "deadline_exceeded", "message": "the command's deadline passed"}
            await response.write(envelope({"error": error}, flags=0x02))
        await response.write_eof()
        return


def drop(request: web.Request) -> None:
    """Cut the connection mid-response, as a vanished sandbox does (what was written still goes)."""
    if request.transport is not None:
        request.transport.close()


def client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


async def stalled(sbx: EmulatedSandbox, request: web.Request) -> None:
    """Say nothing more until the client hangs up or the sandbox goes away."""
    while sbx.alive and not client_gone(request):
        await asyncio.sleep(0.2)
    drop(request)


async def files_get(emu: Any, sbx: EmulatedSandbox, request: web.Request) -> web.StreamResponse:
    path = request.query.get("path", "")
    with tempfile.TemporaryDirectory(prefix="e2b-emu-get-") as tmp:
        local = Path(tmp) / "file"
        try:
            await asyncio.to_thread(sbx.read_file, path, local)
        except SandboxFileNotFound:
            return emu.error(404, f"path '{resolve(path)}' does not exist")  # type: ignore[no-any-return]
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = local.stat().st_size
        await response.prepare(request)
        with local.open("rb") as f:
            while data := f.read(1 << 20):
                await response.write(data)
        await response.write_eof()
    return response


async def files_post(emu: Any, sbx: EmulatedSandbox, request: web.Request) -> web.StreamResponse:
    if emu.faults.take("stall_upload", request.query.get("path", "")):
        await stalled(sbx, request)  # never reads the body nor answers
        return web.Response(status=500)  # never sent: the connection is gone
    content_type = request.headers.get("Content-Type", "")
    with tempfile.TemporaryDirectory(prefix="e2b-emu-post-") as tmp:
        body = Path(tmp) / "body"
        # aiohttp has already undone any ``Content-Encoding: gzip`` of the body.
        with body.open("wb") as f:
            async for data in request.content.iter_chunked(1 << 20):
                f.write(data)
        if content_type.startswith("multipart/form-data"):
            boundary = re.search(r'boundary="?([^";]+)"?', content_type)
            if boundary is None:
                return emu.error(400, "multipart body without a boundary")  # type: ignore[no-any-return]
            parts = split_multipart(body, boundary.group(1).encode(), Path(tmp))
        else:
            parts = [(request.query.get("path", ""), body)]
        written = []
        for name, file in parts:
            path = request.query.get("path", name) if len(parts) == 1 else name
            if not path:
                return emu.error(400, "no path for the uploaded file")  # type: ignore[no-any-return]
            target = await asyncio.to_thread(sbx.write_file, file, path)
            written.append({"name": Path(target).name, "type": "file", "path": target})
    return web.json_response(written)


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
