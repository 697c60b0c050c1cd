"""A wire emulator of Daytona: the control-plane API and each sandbox's toolbox, on one port.

Layer: tests-shared (emulators). Imports: the standard library, ``aiohttp`` (a dependency of the
``daytona`` SDK itself) and ``metaflow_extensions.sandbox.core`` (each sandbox is a core ``local``
sandbox, under bubblewrap when available, so it never sees the launcher's files).

    python tests-shared/emulators/daytona_emulator.py --port PORT [--isolation auto] [faults...]

prints ``READY http://127.0.0.1:PORT`` once it accepts connections. Point the real SDK at it with
``DAYTONA_API_URL=http://127.0.0.1:PORT/api`` and any ``DAYTONA_API_KEY`` (one starting with
``invalid`` is rejected with 401, to test authentication errors).

It speaks what ``daytona`` 0.150 to 0.226 sends: ``/api/sandbox`` (create from a snapshot or from
``buildInfo.dockerfileContent``, get, delete, list by labels both as ``/sandbox/paginated`` (old)
and cursor-paged ``/sandbox`` (new), labels, auto-stop/-delete, last-activity, toolbox-proxy-url),
a 404 on ``/socket.io/`` (the SDK then polls), and the toolbox under each sandbox's
``toolboxProxyUrl`` (``/toolbox/{id}``): sessions, async session commands with logs (plain GET or
a WebSocket following them, stdout/stderr framed by the ``\\x01\\x01\\x01``/``\\x02\\x02\\x02``
markers, closed with 1000 at the end), ``process/execute``, and ``files/bulk-upload`` /
``files/bulk-download`` (multipart both ways, streamed through temporary files).

Test hooks: ``GET /_emulator/state`` → ``{"live", "created", "destroyed"}``; faults from flags or
``POST /_emulator/faults`` (a JSON object with the keys of ``Faults``): latency on every request, a
fraction of requests answered 429 or 503 (before any processing), the next N matching commands'
sandboxes dying mid-command (state ``error``, exit code -1, log streams closed with 1011), the
next N matching commands' log streams dropped mid-way (the TCP connection cut). Snapshots or
images whose name contains ``missing`` do not exist; ``--max-live N`` refuses creation beyond N
live sandboxes with Daytona's quota error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from http import HTTPStatus
from pathlib import Path
from typing import Any

from aiohttp import web

from metaflow_extensions.sandbox.core import (
    Resources,
    SandboxError,
    SandboxFileNotFound,
    SandboxSpec,
    get_backend,
)
from metaflow_extensions.sandbox.core.local.processes import kill_tree

STDOUT, STDERR = b"\x01\x01\x01", b"\x02\x02\x02"
CMD_ENV = "DAYTONA_SESSION_COMMAND_ID"  # lets the emulator find a command's processes to kill
DEFAULT_SNAPSHOT = "daytonaio/sandbox:0.4.3"


@dataclasses.dataclass
class Faults:
    latency_ms: float = 0.0
    rate_429: float = 0.0
    rate_503: float = 0.0
    die_next: int = 0
    die_after_s: float = 0.5
    drop_next: int = 0
    match: str = ""

    def take(self, kind: str, command: str) -> bool:
        """Consume one ``die``/``drop`` fault if one is pending for ``command``."""
        with _FAULT_LOCK:
            left = getattr(self, f"{kind}_next")
            if left > 0 and self.match in command:
                setattr(self, f"{kind}_next", left - 1)
                return True
        return False


_FAULT_LOCK = threading.Lock()


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def error(status: int, message: str, code: str = "", source: str = "DAYTONA_API") -> web.Response:
    body = {"statusCode": status, "message": message, "error": HTTPStatus(status).phrase, "code": code or None}
    body.update(source=source, timestamp=iso(time.time()), path="")
    return web.json_response(body, status=status)


class Command:
    """One session command: its output as marker-framed chunks, and followers waiting for more."""

    def __init__(self, cmd_id: str, command: str, loop: asyncio.AbstractEventLoop):
        self.id, self.command, self.loop = cmd_id, command, loop
        self.chunks: list[bytes] = []
        self.exit_code: int | None = None
        self.finished = False  # no more output will come
        self.close_code = 1000  # how followers' WebSockets end
        self.drop = False  # the next follower's connection is cut mid-way
        self._waiters: set[asyncio.Future[None]] = set()

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def feed(self, marker: bytes, text: str) -> None:
        """Called from the command's thread."""
        if text:
            data = marker + text.encode()
            self.loop.call_soon_threadsafe(lambda: (self.chunks.append(data), self._wake()))

    def finish(self, exit_code: int, close_code: int = 1000) -> None:
        def done() -> None:
            if not self.finished:
                self.exit_code, self.close_code, self.finished = exit_code, close_code, True
            self._wake()

        self.loop.call_soon_threadsafe(done)

    async def changed(self) -> None:
        waiter = self.loop.create_future()
        self._waiters.add(waiter)
        await waiter

    def json(self) -> dict[str, Any]:
        return {"id": self.id, "command": self.command, "exitCode": self.exit_code}


class EmulatedSandbox:
    def __init__(self, sandbox_id: str, body: dict[str, Any], image: str | None, local: Any, base: str):
        self.id = sandbox_id
        self.body = body
        self.image = image
        self.local = local
        self.state = "started"
        self.error_reason: str | None = None
        self.labels: dict[str, str] = dict(body.get("labels") or {})
        self.sessions: dict[str, dict[str, Command]] = {}
        self.created_at = self.updated_at = self.last_activity = time.time()
        self.auto_stop = body.get("autoStopInterval", 15)
        self.auto_delete = body.get("autoDeleteInterval", -1)
        self.toolbox_url = f"{base}/toolbox"
        self.lock = threading.Lock()

    def json(self) -> dict[str, Any]:
        body = self.body
        return {
            "id": self.id,
            "organizationId": "emulated-org",
            "name": body.get("name") or self.id,
            "snapshot": body.get("snapshot") or (None if self.image else DEFAULT_SNAPSHOT),
            "user": body.get("user") or "daytona",
            "env": body.get("env") or {},
            "labels": self.labels,
            "public": bool(body.get("public", False)),
            "networkBlockAll": bool(body.get("networkBlockAll", False)),
            "kvm": False,
            "target": body.get("target") or "us",
            "cpu": int(body.get("cpu") or 1),
            "gpu": int(body.get("gpu") or 0),
            "memory": int(body.get("memory") or 1),
            "disk": int(body.get("disk") or 3),
            "state": self.state,
            "desiredState": "started" if self.state == "started" else "destroyed",
            "errorReason": self.error_reason,
            "autoStopInterval": self.auto_stop,
            "autoArchiveInterval": body.get("autoArchiveInterval", 10080),
            "autoDeleteInterval": self.auto_delete,
            "volumes": [],
            "createdAt": iso(self.created_at),
            "updatedAt": iso(self.updated_at),
            "lastActivityAt": iso(self.last_activity),
            "sandboxClass": "small",
            "daemonVersion": "0.4.3",
            "runnerId": "emulated-runner",
            "toolboxProxyUrl": self.toolbox_url,
        }

    def commands(self) -> list[Command]:
        with self.lock:
            return [cmd for session in self.sessions.values() for cmd in session.values()]


class Emulator:
    def __init__(self, args: argparse.Namespace):
        self.faults = Faults(
            latency_ms=args.latency_ms,
            rate_429=args.rate_429,
            rate_503=args.rate_503,
            die_next=args.die_next,
            die_after_s=args.die_after_s,
            drop_next=args.drop_logs_next,
            match=args.fault_match,
        )
        self.max_live = args.max_live
        self.base = f"http://127.0.0.1:{args.port}"
        self.root = Path(tempfile.mkdtemp(prefix="daytona-emulator-"))
        self.local = get_backend("local", isolation=args.isolation, root=self.root)
        self.sandboxes: dict[str, EmulatedSandbox] = {}
        self.lock = threading.Lock()
        self.created = self.destroyed = 0

    def state(self) -> dict[str, int]:
        with self.lock:
            return {"live": len(self.sandboxes), "created": self.created, "destroyed": self.destroyed}

    def find(self, id_or_name: str) -> EmulatedSandbox | None:
        with self.lock:
            found = self.sandboxes.get(id_or_name)
            return found or next((s for s in self.sandboxes.values() if s.body.get("name") == id_or_name), None)

    def remove(self, sandbox_id: str) -> bool:
        with self.lock:
            sbx = self.sandboxes.pop(sandbox_id, None)
            if sbx is not None:
                self.destroyed += 1
        if sbx is None:
            return False
        sbx.state = "destroyed"
        for cmd in sbx.commands():
            cmd.finish(-1, close_code=1011)
        with contextlib.suppress(SandboxError):
            sbx.local.destroy()
        return True

    def die(self, sbx: EmulatedSandbox) -> None:
        """The emulated runner crashes: processes gone, state ``error``, commands end with -1."""
        sbx.state, sbx.error_reason = "error", "The sandbox's runner stopped unexpectedly (emulated fault)"
        for cmd in sbx.commands():
            cmd.finish(-1, close_code=1011)
        with contextlib.suppress(SandboxError):
            sbx.local.destroy()


# -- HTTP plumbing -----------------------------------------------------------------------------


def emulator(request: web.Request) -> Emulator:
    return request.app["emu"]  # type: ignore[no-any-return]


@web.middleware
async def faults_and_auth(request: web.Request, handler: Any) -> web.StreamResponse:
    path = request.path
    if path.startswith("/_emulator/"):
        return await handler(request)  # type: ignore[no-any-return]
    if path.startswith("/socket.io"):
        # No event gateway: the SDK falls back to polling, as it does behind proxies.
        return error(404, "Cannot GET /socket.io/")
    faults = emulator(request).faults
    if faults.latency_ms:
        await asyncio.sleep(faults.latency_ms / 1000)
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer ") or auth[7:].startswith("invalid"):
        await request.read()
        return error(401, "Invalid credentials", code="UNAUTHORIZED")
    roll = random.random()
    if roll < faults.rate_429:
        await request.read()
        return error(429, "ThrottlerException: Too Many Requests (emulated)")
    if roll < faults.rate_429 + faults.rate_503:
        await request.read()
        return error(503, "Service Unavailable (emulated)")
    return await handler(request)  # type: ignore[no-any-return]


async def admin_state(request: web.Request) -> web.Response:
    return web.json_response(emulator(request).state())


async def admin_faults(request: web.Request) -> web.Response:
    update = await request.json() if request.can_read_body else {}
    faults = emulator(request).faults
    with _FAULT_LOCK:
        for key, value in update.items():
            if not hasattr(faults, key):
                return error(400, f"unknown fault {key!r}")
            setattr(faults, key, type(getattr(faults, key))(value))
    return web.json_response(dataclasses.asdict(faults))


# -- control plane -----------------------------------------------------------------------------


def image_of(body: dict[str, Any]) -> str | None:
    dockerfile = (body.get("buildInfo") or {}).get("dockerfileContent") or ""
    found = re.search(r"^\s*FROM\s+(\S+)", dockerfile, re.MULTILINE | re.IGNORECASE)
    return found.group(1) if found else None


async def create_sandbox(request: web.Request) -> web.Response:
    emu = emulator(request)
    body = await request.json()
    image = image_of(body)
    snapshot = body.get("snapshot")
    if snapshot and "missing" in snapshot:
        return error(404, f"Snapshot {snapshot} not found. Did you add it through the Daytona Dashboard?")
    if image and "missing" in image:
        return error(400, f"Failed to pull image {image}: manifest unknown (emulated)", code="BAD_REQUEST")
    if emu.max_live and emu.state()["live"] >= emu.max_live:
        return error(403, f"Total CPU quota exceeded. Maximum allowed: {emu.max_live} (emulated)")
    memory_gib, disk_gib = body.get("memory"), body.get("disk")
    spec = SandboxSpec(
        env={str(k): str(v) for k, v in (body.get("env") or {}).items()},
        resources=Resources(
            cpu=body.get("cpu"),
            memory_mb=None if memory_gib is None else int(memory_gib) * 1024,
            disk_mb=None if disk_gib is None else int(disk_gib) * 1024,
        ),
        lifetime_s=7 * 86400,
        network=not (body.get("networkBlockAll") and emu.local.isolation == "bwrap"),
    )
    local = await asyncio.to_thread(emu.local.create, spec)
    sandbox_id = str(uuid.uuid4())
    sbx = EmulatedSandbox(sandbox_id, body, image, local, emu.base)
    with emu.lock:
        emu.sandboxes[sandbox_id] = sbx
        emu.created += 1
    return web.json_response(sbx.json())


async def get_sandbox(request: web.Request) -> web.Response:
    sbx = emulator(request).find(request.match_info["id"])
    if sbx is None:
        return error(404, f"Sandbox with ID or name {request.match_info['id']} not found", code="NOT_FOUND")
    return web.json_response(sbx.json())


async def delete_sandbox(request: web.Request) -> web.Response:
    emu = emulator(request)
    sbx = emu.find(request.match_info["id"])
    if sbx is None:
        return error(404, f"Sandbox with ID or name {request.match_info['id']} not found", code="NOT_FOUND")
    await asyncio.to_thread(emu.remove, sbx.id)
    return web.json_response(sbx.json())


def labelled(request: web.Request) -> list[EmulatedSandbox]:
    wanted = json.loads(request.query.get("labels") or "{}") or {}
    with emulator(request).lock:
        found = list(emulator(request).sandboxes.values())
    return sorted(
        (s for s in found if wanted.items() <= s.labels.items()), key=lambda s: (s.created_at, s.id), reverse=True
    )


async def list_sandboxes(request: web.Request) -> web.Response:
    """The cursor-paged list of SDK >= 0.226 (``{items, nextCursor}``)."""
    found = labelled(request)
    limit = int(request.query.get("limit") or 100)
    start = int(request.query.get("cursor") or 0)
    page = found[start : start + limit]
    more = start + limit < len(found)
    return web.json_response({"items": [s.json() for s in page], "nextCursor": str(start + limit) if more else None})


async def list_paginated(request: web.Request) -> web.Response:
    """The page-numbered list of older SDKs (``{items, total, page, totalPages}``)."""
    found = labelled(request)
    limit = int(request.query.get("limit") or 100)
    page = int(request.query.get("page") or 1)
    items = found[(page - 1) * limit : page * limit]
    pages = max(1, -(-len(found) // limit))
    return web.json_response(
        {"items": [s.json() for s in items], "total": len(found), "page": page, "totalPages": pages}
    )


def _sandbox_or_404(request: web.Request) -> EmulatedSandbox | web.Response:
    sbx = emulator(request).find(request.match_info["id"])
    if sbx is None:
        return error(404, f"Sandbox with ID or name {request.match_info['id']} not found", code="NOT_FOUND")
    return sbx


async def set_labels(request: web.Request) -> web.Response:
    sbx = _sandbox_or_404(request)
    if isinstance(sbx, web.Response):
        return sbx
    sbx.labels = dict((await request.json()).get("labels") or {})
    return web.json_response({"labels": sbx.labels})


async def set_interval(request: web.Request) -> web.Response:
    sbx = _sandbox_or_404(request)
    if isinstance(sbx, web.Response):
        return sbx
    value = int(request.match_info["n"])
    setattr(sbx, "auto_stop" if request.match_info["what"] == "autostop" else "auto_delete", value)
    return web.json_response(sbx.json())


async def last_activity(request: web.Request) -> web.Response:
    sbx = _sandbox_or_404(request)
    if isinstance(sbx, web.Response):
        return sbx
    sbx.last_activity = time.time()
    return web.Response(status=201)


async def toolbox_proxy_url(request: web.Request) -> web.Response:
    sbx = _sandbox_or_404(request)
    if isinstance(sbx, web.Response):
        return sbx
    return web.json_response({"url": sbx.toolbox_url})


async def config(request: web.Request) -> web.Response:
    base = emulator(request).base
    return web.json_response({"proxyToolboxUrl": f"{base}/toolbox", "defaultSnapshot": DEFAULT_SNAPSHOT})


# -- toolbox -----------------------------------------------------------------------------------


def _running(request: web.Request) -> EmulatedSandbox | web.Response:
    """The sandbox a toolbox request is for, if it is running (the proxy refuses otherwise)."""
    sbx = emulator(request).find(request.match_info["id"])
    if sbx is None:
        return error(404, f"Sandbox {request.match_info['id']} not found", code="NOT_FOUND", source="DAYTONA_PROXY")
    if sbx.state != "started":
        return error(400, f"Sandbox {sbx.id} is not running (state: {sbx.state})", source="DAYTONA_PROXY")
    sbx.last_activity = time.time()
    return sbx


def _kill_command(cmd: Command) -> None:
    """Kill the processes of one running command (found by the variable the emulator gave it)."""
    marker = f"{CMD_ENV}={cmd.id}".encode()
    me = os.getpid()
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == me and marker in (entry / "environ").read_bytes().split(b"\0"):
                kill_tree(int(entry.name))


def _run_command(emu: Emulator, sbx: EmulatedSandbox, cmd: Command, cwd: str | None = None) -> None:
    """Run one command in the sandbox (in a thread), feeding its framed output to ``cmd``."""
    if emu.faults.take("die", cmd.command):
        threading.Timer(emu.faults.die_after_s, emu.die, [sbx]).start()
    cmd.drop = emu.faults.take("drop", cmd.command)
    command = cmd.command if cwd is None else f"cd {json.dumps(cwd)} && {cmd.command}"
    try:
        # The primitive, not the public ``run``: that one re-splits output into lines, and the
        # daemon forwards raw chunks.
        code = sbx.local._run(
            command,
            env={**sbx.local.spec.env, CMD_ENV: cmd.id},
            timeout_s=None,
            on_stdout=lambda text: cmd.feed(STDOUT, text),
            on_stderr=lambda text: cmd.feed(STDERR, text),
        )
    except SandboxError:
        cmd.finish(-1, close_code=1011)
    else:
        cmd.finish(-1 if sbx.state != "started" else code, close_code=1000 if sbx.state == "started" else 1011)


async def create_session(request: web.Request) -> web.Response:
    sbx = _running(request)
    if isinstance(sbx, web.Response):
        return sbx
    session_id = (await request.json())["sessionId"]
    with sbx.lock:
        if session_id in sbx.sessions:
            return error(409, f"session {session_id} already exists", code="CONFLICT", source="DAYTONA_DAEMON")
        sbx.sessions[session_id] = {}
    return web.Response(status=201)


def _session(request: web.Request) -> tuple[EmulatedSandbox, dict[str, Command]] | web.Response:
    sbx = _running(request)
    if isinstance(sbx, web.Response):
        return sbx
    session = sbx.sessions.get(request.match_info["session"])
    if session is None:
        return error(404, "session not found", code="NOT_FOUND", source="DAYTONA_DAEMON")
    return sbx, session


async def list_sessions(request: web.Request) -> web.Response:
    sbx = _running(request)
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
            await asyncio.to_thread(_kill_command, cmd)
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
    threading.Thread(target=_run_command, args=(emulator(request), sbx, cmd), daemon=True).start()
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
    sbx = _running(request)
    if isinstance(sbx, web.Response):
        return sbx
    body = await request.json()
    envs = body.get("envs") or {}
    command = "".join(f"export {k}={json.dumps(str(v))}; " for k, v in envs.items()) + body["command"]
    cmd = Command(str(uuid.uuid4()), command, asyncio.get_running_loop())
    threading.Thread(target=_run_command, args=(emulator(request), sbx, cmd, body.get("cwd")), daemon=True).start()
    while not cmd.finished:
        await cmd.changed()
    output = b"".join(c[3:] for c in cmd.chunks).decode(errors="replace")
    return web.json_response({"exitCode": cmd.exit_code, "result": output})


async def bulk_upload(request: web.Request) -> web.Response:
    sbx = _running(request)
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
    from urllib.parse import quote

    return f"form-data; name=\"{name}\"; filename*=UTF-8''{quote(path, safe='')}"


async def bulk_download(request: web.Request) -> web.StreamResponse:
    sbx = _running(request)
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
    sbx = _running(request)
    if isinstance(sbx, web.Response):
        return sbx
    if request.path.endswith("/version"):
        return web.json_response({"version": "0.4.3"})
    return web.json_response({"dir": "/home/sandbox"})  # the local backend's working directory and HOME


async def unknown(request: web.Request) -> web.Response:
    print(f"daytona-emulator: no route for {request.method} {request.path_qs}", flush=True, file=sys.stderr)
    return error(404, f"Cannot {request.method} {request.path}")


def make_app(emu: Emulator) -> web.Application:
    app = web.Application(middlewares=[faults_and_auth], client_max_size=1 << 40)
    app["emu"] = emu
    r = app.router
    r.add_get("/_emulator/state", admin_state)
    r.add_post("/_emulator/faults", admin_faults)
    r.add_get("/api/config", config)
    r.add_post("/api/sandbox", create_sandbox)
    r.add_get("/api/sandbox", list_sandboxes)
    r.add_get("/api/sandbox/paginated", list_paginated)
    r.add_get("/api/sandbox/{id}", get_sandbox)
    r.add_delete("/api/sandbox/{id}", delete_sandbox)
    r.add_put("/api/sandbox/{id}/labels", set_labels)
    r.add_post("/api/sandbox/{id}/{what:autostop|autodelete}/{n:-?[0-9]+}", set_interval)
    r.add_post("/api/sandbox/{id}/last-activity", last_activity)
    r.add_get("/api/sandbox/{id}/toolbox-proxy-url", toolbox_proxy_url)
    tb = "/toolbox/{id}"
    r.add_post(f"{tb}/process/session", create_session)
    r.add_get(f"{tb}/process/session", list_sessions)
    r.add_get(f"{tb}/process/session/{{session}}", get_session)
    r.add_delete(f"{tb}/process/session/{{session}}", delete_session)
    r.add_post(f"{tb}/process/session/{{session}}/exec", session_exec)
    r.add_get(f"{tb}/process/session/{{session}}/command/{{cmd}}", get_command)
    r.add_get(f"{tb}/process/session/{{session}}/command/{{cmd}}/logs", command_logs)
    r.add_post(f"{tb}/process/execute", execute)
    r.add_post(f"{tb}/files/bulk-upload", bulk_upload)
    r.add_post(f"{tb}/files/bulk-download", bulk_download)
    for name in ("work-dir", "user-home-dir", "version"):
        r.add_get(f"{tb}/{name}", info)
    r.add_route("*", "/{tail:.*}", unknown)
    return app


async def serve(args: argparse.Namespace) -> None:
    emu = Emulator(args)
    runner = web.AppRunner(make_app(emu), handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY http://127.0.0.1:{args.port}", flush=True)
    try:
        await stop.wait()
    finally:
        # Terminating the emulator (what test fixtures do) removes every sandbox it still holds.
        for sandbox_id in list(emu.sandboxes):
            await asyncio.to_thread(emu.remove, sandbox_id)
        await runner.cleanup()
        shutil.rmtree(emu.root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--isolation", default="auto", help="local backend isolation: auto, bwrap or process")
    parser.add_argument("--max-live", type=int, default=0, help="refuse creation beyond N live sandboxes (quota)")
    parser.add_argument("--latency-ms", type=float, default=0)
    parser.add_argument("--rate-429", type=float, default=0)
    parser.add_argument("--rate-503", type=float, default=0)
    parser.add_argument("--die-next", type=int, default=0, help="the next N matching commands' sandboxes die")
    parser.add_argument("--die-after-s", type=float, default=0.5)
    parser.add_argument("--drop-logs-next", type=int, default=0, help="the next N matching log streams are cut")
    parser.add_argument("--fault-match", default="", help="die/drop only commands containing this text")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
