"""The Daytona emulator's state: sandboxes (each a core ``local`` sandbox), sessions, commands
with their marker-framed output, and the injectable faults.

Layer: tests-shared (emulators). Imports: the standard library, ``aiohttp``, ``emulator_base`` and
``emulator_faults`` (next to this file) and ``metaflow_extensions.sandbox.core``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import threading
import time
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any

from aiohttp import web
from emulator_base import BaseEmulator
from emulator_faults import Faults

from metaflow_extensions.sandbox.core import SandboxError

STDOUT, STDERR = b"\x01\x01\x01", b"\x02\x02\x02"
DEFAULT_SNAPSHOT = "daytonaio/sandbox:0.4.3"


@dataclasses.dataclass
class DaytonaFaults(Faults):
    drop_next: int = dataclasses.field(default=0, metadata={"help": "the next N matching log streams are cut"})


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
        self.stall = False  # the next follower gets nothing at all, and no close, ever
        self.cancel = threading.Event()  # set: the command and its processes are killed
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


class Emulator(BaseEmulator[EmulatedSandbox]):
    """Daytona's sandboxes and faults (the routes are ``daytona_emulator.DaytonaEmulator``'s)."""

    name = "daytona"
    faults: DaytonaFaults
    refusals = {429: "ThrottlerException: Too Many Requests (emulated)", 503: "Service Unavailable (emulated)"}

    def __init__(self, args: argparse.Namespace):
        super().__init__(args, DaytonaFaults.from_flags(args), isolation=args.isolation)
        self.max_live = args.max_live
        # Daytona counts auto-stop in minutes; a test can make a "minute" short to watch an orphan die.
        self.minute_s = float(getattr(args, "minute_s", 60.0))

    def error(self, status: int, message: str) -> web.Response:
        return error(status, message)

    def missing(self, sandbox_id: str) -> web.Response:
        return error(404, f"Sandbox with ID or name {sandbox_id} not found", code="NOT_FOUND")

    def find(self, id_or_name: str) -> EmulatedSandbox | None:
        with self.lock:
            found = self.sandboxes.get(id_or_name)
            return found or next((s for s in self.sandboxes.values() if s.body.get("name") == id_or_name), None)

    def discard(self, sbx: EmulatedSandbox) -> None:
        sbx.state = "destroyed"
        for cmd in sbx.commands():
            cmd.finish(-1, close_code=1011)
        with contextlib.suppress(SandboxError):
            sbx.local.destroy()

    def idle_past_auto_stop(self, now: float) -> list[EmulatedSandbox]:
        """Started sandboxes with no activity (API calls about them, toolbox requests) for their
        auto-stop interval; 0 means never, as on Daytona. Processes inside do not count."""
        with self.lock:
            return [
                s
                for s in self.sandboxes.values()
                if s.state == "started"
                and (s.auto_stop or 0) > 0
                and now - s.last_activity >= s.auto_stop * self.minute_s
            ]

    def auto_stop(self, sbx: EmulatedSandbox) -> None:
        """Daytona's auto-stop: processes die; with auto-delete 0 the sandbox is deleted at once."""
        if sbx.auto_delete == 0:
            self.remove(sbx.id)
            return
        sbx.state = "stopped"
        for cmd in sbx.commands():
            cmd.finish(-1, close_code=1011)
        with contextlib.suppress(SandboxError):
            sbx.local.destroy()

    def die(self, sbx: EmulatedSandbox) -> None:
        """The emulated runner crashes: processes gone, state ``error``, commands end with -1."""
        sbx.state, sbx.error_reason = "error", "The sandbox's runner stopped unexpectedly (emulated fault)"
        for cmd in sbx.commands():
            cmd.finish(-1, close_code=1011)
        with contextlib.suppress(SandboxError):
            sbx.local.destroy()


def emulator(request: web.Request) -> Emulator:
    return request.app["emu"]  # type: ignore[no-any-return]


def running_sandbox(request: web.Request) -> EmulatedSandbox | web.Response:
    """The sandbox a toolbox request is for, if it is running (the proxy refuses otherwise)."""
    sbx = emulator(request).find(request.match_info["id"])
    if sbx is None:
        return error(404, f"Sandbox {request.match_info['id']} not found", code="NOT_FOUND", source="DAYTONA_PROXY")
    if sbx.state != "started":
        return error(400, f"Sandbox {sbx.id} is not running (state: {sbx.state})", source="DAYTONA_PROXY")
    sbx.last_activity = time.time()
    return sbx


def kill_command(cmd: Command) -> None:
    """Kill the processes of one running command (the local sandbox's public per-command cancel)."""
    cmd.cancel.set()


def run_command(emu: Emulator, sbx: EmulatedSandbox, cmd: Command, cwd: str | None = None) -> None:
    """Run one command in the sandbox (in a thread), feeding its framed output to ``cmd``."""
    if emu.faults.take("die", cmd.command):
        threading.Timer(emu.faults.die_after_s, emu.die, [sbx]).start()
    cmd.drop = emu.faults.take("drop", cmd.command)
    cmd.stall = emu.faults.take("stall", cmd.command)
    command = cmd.command if cwd is None else f"cd {json.dumps(cwd)} && {cmd.command}"
    try:
        # Raw chunks, as the daemon forwards them (not lines).
        code = sbx.local.run(
            command,
            on_output=lambda kind, text: cmd.feed(STDOUT if kind == "stdout" else STDERR, text),
            cancel=cmd.cancel,
        ).exit_code
    except SandboxError:
        cmd.finish(-1, close_code=1011)
    except OSError as e:
        # The daemon's shell reads the command from its stdin, so the service never refuses one:
        # bash fails to exec an oversized command line and the command ends with 126, as here.
        cmd.feed(STDERR, f"bash: /bin/bash: {os.strerror(e.errno or 0)}\n")
        cmd.finish(126)
    except Exception as e:  # an emulator bug must still end the command, never leave it running
        cmd.feed(STDERR, f"emulator error: {e}\n")
        cmd.finish(-1, close_code=1011)
    else:
        cmd.finish(-1 if sbx.state != "started" else code, close_code=1000 if sbx.state == "started" else 1011)
