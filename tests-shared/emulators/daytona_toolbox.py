"""The Daytona emulator's toolbox API (what each sandbox's daemon serves behind ``toolboxProxyUrl``):
sessions and their commands (async, with logs as plain GETs or a followed WebSocket), one-shot
``process/execute``, multipart bulk upload/download, and the info endpoints.

Layer: tests-shared (emulators). Imports: the standard library, ``aiohttp``,
``metaflow_extensions.sandbox.core`` and ``daytona_model`` (next to this file).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from urllib.parse import quote

from aiohttp import web
from daytona_model import (
    STDERR,
    STDOUT,
    Command,
    EmulatedSandbox,
    emulator,
    error,
    kill_command,
    run_command,
    running_sandbox,
)

from metaflow_extensions.sandbox.core import SandboxError, SandboxFileNotFound


async def create_session(request: web.Request) -> web.Response:
    sbx = running_sandbox(request)
    if isinstance(sbx, web.Response):
        return sbx
    session_id = (await request.json())["sessionId"]
    with sbx.lock:
        if session_id in sbx.sessions:
            return error(409, f"session {session_id} already exists", code="CONFLICT", source="DAYTONA_DAEMON")
        sbx.sessions[session_id] = {}
    return web.Response(status=201)


def _session(request: web.Request) -> tuple[EmulatedSandbox, dict[str, Command]] | web.Response:
    sbx = running_sandbox(request)
    if isinstance(sbx, web.Response):
        return sbx
    session = sbx.sessions.get(request.match_info["session"])
    if session is None:
        return error(404, "session not found", code="NOT_FOUND", source="DAYTONA_DAEMON")
    return sbx, session


async def list_sessions(request: web.Request) -> web.Response:
    sbx = running_sandbox(request)
    if isinstance(sbx, web.Response):
        return sbx
    return web.json_response(
        [{"sessionId": sid, "commands": [c.json() for c in cmds.values()]} for sid, cmds in sbx.sessions.items()]
    )


async def get_session(request: web.Request) -> web.Response:
    found = _session(request)
    if isinstance(found, web.Response):
        return found
    _, session = found
    return web.json_response(
        {"sessionId": request.match_info["session"], "commands": [c.json() for c in session.values()]}
    )


async def delete_session(request: web.Request) -> web.Response:
    found = _session(request)
    if isinstance(found, web.Response):
        return found
    sbx, session = found
    with sbx.lock:
        sbx.sessions.pop(request.match_info["session"], None)
    for cmd in session.values():
        if not cmd.finished:
            await asyncio.to_thread(kill_command, cmd)
    return web.Response(status=204)


async def session_exec(request: web.Request) -> web.Response:
    found = _session(request)
    if isinstance(found, web.Response):
        return found
    sbx, session = found
    body = await request.json()
    cmd = Command(str(uuid.uuid4()), body["command"], asyncio.get_running_loop())
    with sbx.lock:
        session[cmd.id] = cmd
    threading.Thread(target=run_command, args=(emulator(request), sbx, cmd), daemon=True).start()
    if body.get("runAsync") or body.get("async"):
        return web.json_response({"cmdId": cmd.id}, status=202)
    while not cmd.finished:
        await cmd.changed()
    out, err = _demux(cmd.chunks)
    output = b"".join(cmd.chunks).decode(errors="replace")
    return web.json_response(
        {"cmdId": cmd.id, "exitCode": cmd.exit_code, "output": output, "stdout": out, "stderr": err}
    )


def _command(request: web.Request) -> Command | web.Response:
    found = _session(request)
    if isinstance(found, web.Response):
        return found
    cmd = found[1].get(request.match_info["cmd"])
    if cmd is None:
        return error(404, "command not found", code="NOT_FOUND", source="DAYTONA_DAEMON")
    return cmd


async def get_command(request: web.Request) -> web.Response:
    cmd = _command(request)
    return cmd if isinstance(cmd, web.Response) else web.json_response(cmd.json())


def _demux(chunks: list[bytes]) -> tuple[str, str]:
    out = b"".join(c[3:] for c in chunks if c.startswith(STDOUT))
    err = b"".join(c[3:] for c in chunks if c.startswith(STDERR))
    return out.decode(errors="replace"), err.decode(errors="replace")


async def command_logs(request: web.Request) -> web.StreamResponse:
    cmd = _command(request)
    if isinstance(cmd, web.Response):
        return cmd
    follow = request.query.get("follow", "").lower() == "true"
    if not follow or request.headers.get("Upgrade", "").lower() != "websocket":
        if "application/json" in request.headers.get("Accept", ""):
            out, err = _demux(cmd.chunks)
            return web.json_response({"output": out + err, "stdout": out, "stderr": err})
        return web.Response(body=b"".join(cmd.chunks), content_type="text/plain")
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    drop, cmd.drop = cmd.drop, False
    stall, cmd.stall = cmd.stall, False
    if stall:
        # A stalled stream: open, silent, never closed (until the client goes away).
        await ws.receive()
        return ws
    sent = 0
    while True:
        while sent < len(cmd.chunks):
            await ws.send_bytes(cmd.chunks[sent])
            sent += 1
            if drop:
                # A dropped stream: the connection is cut, with no close frame.
                await asyncio.sleep(0.05)
                if request.transport is not None:
                    request.transport.abort()
                return ws
        if cmd.finished:
            await ws.close(code=cmd.close_code)
            return ws
        await cmd.changed()


async def execute(request: web.Request) -> web.Response:
    sbx = running_sandbox(request)
    if isinstance(sbx, web.Response):
        return sbx
    body = await request.json()
    envs = body.get("envs") or {}
    command = "".join(f"export {k}={json.dumps(str(v))}; " for k, v in envs.items()) + body["command"]
    cmd = Command(str(uuid.uuid4()), command, asyncio.get_running_loop())
    threading.Thread(target=run_command, args=(emulator(request), sbx, cmd, body.get("cwd")), daemon=True).start()
    while not cmd.finished:
        await cmd.changed()
    output = b"".join(c[3:] for c in cmd.chunks).decode(errors="replace")
    return web.json_response({"exitCode": cmd.exit_code, "result": output})


async def bulk_upload(request: web.Request) -> web.Response:
    sbx = running_sandbox(request)
    if isinstance(sbx, web.Response):
        return sbx
    emu = emulator(request)
    paths: dict[str, str] = {}
    files: dict[str, Path] = {}
    tmpdir = Path(tempfile.mkdtemp(prefix="upload-", dir=emu.root))
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            found = re.fullmatch(r"files\[(\d+)\]\.(path|file)", part.name or "")  # type: ignore[union-attr]
            if not found:
                continue
            index, kind = found.groups()
            if kind == "path":
                paths[index] = await part.text()  # type: ignore[union-attr]
                continue
            target = tmpdir / index
            with target.open("wb") as f:
                while chunk := await part.read_chunk(1 << 20):  # type: ignore[union-attr]
                    f.write(chunk)
            files[index] = target
        for index, local in files.items():
            await asyncio.to_thread(sbx.local.upload, local, paths[index])
    except SandboxError as e:
        return error(500, f"upload failed: {e}", source="DAYTONA_DAEMON")
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return web.Response(status=200)


def _disposition(name: str, path: str) -> str:
    if path.isascii():
        quoted = path.replace("\\", "\\\\").replace('"', '\\"')
        return f'form-data; name="{name}"; filename="{quoted}"'

    return f"form-data; name=\"{name}\"; filename*=UTF-8''{quote(path, safe='')}"


async def bulk_download(request: web.Request) -> web.StreamResponse:
    sbx = running_sandbox(request)
    if isinstance(sbx, web.Response):
        return sbx
    emu = emulator(request)
    paths = (await request.json())["paths"]
    boundary = uuid.uuid4().hex
    response = web.StreamResponse(headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    await response.prepare(request)
    tmpdir = Path(tempfile.mkdtemp(prefix="download-", dir=emu.root))
    try:
        for index, path in enumerate(paths):
            local = tmpdir / str(index)
            try:
                await asyncio.to_thread(sbx.local.download, path, local)
            except SandboxFileNotFound:
                problem = {"message": f"file not found: {path}", "statusCode": 404, "code": "FILE_NOT_FOUND"}
                head = f"--{boundary}\r\nContent-Disposition: {_disposition('error', path)}\r\n"
                head += "Content-Type: application/json\r\n\r\n"
                await response.write(head.encode() + json.dumps({**problem, "source": "DAYTONA_DAEMON"}).encode())
                await response.write(b"\r\n")
                continue
            head = f"--{boundary}\r\nContent-Disposition: {_disposition('file', path)}\r\n"
            head += "Content-Type: application/octet-stream\r\n\r\n"
            await response.write(head.encode())
            with local.open("rb") as f:
                while chunk := f.read(1 << 20):
                    await response.write(chunk)
            local.unlink()
            await response.write(b"\r\n")
        await response.write(f"--{boundary}--\r\n".encode())
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    await response.write_eof()
    return response


async def info(request: web.Request) -> web.Response:
    sbx = running_sandbox(request)
    if isinstance(sbx, web.Response):
        return sbx
    if request.path.endswith("/version"):
        return web.json_response({"version": "0.4.3"})
    return web.json_response({"dir": "/home/sandbox"})  # the local backend's working directory and HOME
