"""The Modal emulator's state: apps, images, secrets, sandboxes (each a core ``local`` sandbox),
their exec'd processes with buffered stdout/stderr, lifetimes, and the injectable faults.

Layer: tests-shared (emulators). Imports: the standard library, ``emulator_faults`` (next to this
file) and ``metaflow_extensions.sandbox.core`` (its public API only: ``get_backend`` and the
``Sandbox`` handle's ``run``/``upload``/``download``/``destroy``).

Everything here is mutated on the emulator's event loop; the threads that run commands in the
local sandboxes hand their output over with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import shlex
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from emulator_faults import FAULT_LOCK, Faults
from grpclib import Status

from metaflow_extensions.sandbox.core import CommandTimeout, SandboxError, SandboxSpec, get_backend

STDOUT, STDERR = 0, 1  # the router's TaskExecStdioFileDescriptor values
KILLED = 9  # the signal an exec reports when its sandbox goes away or its timeout passes
DEFAULT_TIMEOUT_S = 300  # Modal's default sandbox lifetime
# Where ``sandbox.filesystem`` runs its helper binary; the router serves these execs itself.
FS_TOOLS = "/__modal/.bin/modal-sandbox-fs-tools"


@dataclasses.dataclass
class ModalFaults(Faults):
    """``rate_429`` / ``rate_503`` answer control-plane calls RESOURCE_EXHAUSTED / UNAVAILABLE."""

    fail_next: int = dataclasses.field(default=0, metadata={"help": "the next N calls of --fail-rpc fail"})
    fail_rpc: str = dataclasses.field(default="", metadata={"help": "the RPC fail_next hits, e.g. SandboxCreate"})
    fail_status: str = dataclasses.field(default="UNAVAILABLE", metadata={"help": "the gRPC status they fail with"})
    cut_next: int = dataclasses.field(default=0, metadata={"help": "the next N matching output streams are cut"})
    create_latency_ms: float = dataclasses.field(default=0.0, metadata={"help": "added to every SandboxCreate"})

    def take_failure(self, rpc: str) -> Status | None:
        """The status to fail this call of ``rpc`` with, if a ``fail_next`` fault is pending for it."""
        with FAULT_LOCK:
            if self.fail_next > 0 and rpc == self.fail_rpc:
                self.fail_next -= 1
                self.refused += 1
                return Status[self.fail_status]
        return None


def network_blocked(definition: Any) -> bool:
    """``block_network=True``: older SDKs set the flag, 1.6 a BLOCKED network access (allowlists
    are not emulated: they leave the network open)."""
    from modal_proto import api_pb2

    if definition.block_network:
        return True
    if "network_access" not in definition.DESCRIPTOR.fields_by_name:
        return False
    return bool(definition.network_access.network_access_type == api_pb2.NetworkAccess.NetworkAccessType.BLOCKED)


class Exec:
    """One exec'd process: its output per file descriptor, its stdin, and how it ended."""

    def __init__(self, exec_id: str, argv: list[str], loop: asyncio.AbstractEventLoop):
        self.id, self.argv, self.loop = exec_id, argv, loop
        self.output: dict[int, bytearray] = {STDOUT: bytearray(), STDERR: bytearray()}
        self.stdin = bytearray()
        self.stdin_closed = False
        self.code: int | None = None
        self.signal: int | None = None
        self.finished = False
        self.cut = False  # the next stream of its output is cut (a fault)
        self._waiters: set[asyncio.Future[None]] = set()

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def changed(self) -> None:
        waiter = self.loop.create_future()
        self._waiters.add(waiter)
        await waiter

    def feed(self, fd: int, data: bytes) -> None:
        """From any thread."""
        if data:
            self.loop.call_soon_threadsafe(lambda: (self.output[fd].extend(data), self._wake()))

    def finish(self, code: int | None = None, signal: int | None = None) -> None:
        """From any thread; the first ending wins."""

        def done() -> None:
            if not self.finished:
                self.code, self.signal, self.finished = code, signal, True
            self._wake()

        self.loop.call_soon_threadsafe(done)

    def stdin_changed(self) -> None:
        self._wake()


class LineJoiner:
    """Turns the public ``Sandbox.run`` line callbacks back into the exact byte stream, each line
    as soon as it is complete.

    The command prints ``marker`` (unique per exec) to each stream when it ends (see ``run_exec``):
    the line carrying it is the stream's last, whose text had no newline of its own.
    """

    def __init__(self, exe: Exec, fd: int, marker: str):
        self.exe, self.fd, self.marker = exe, fd, marker

    def __call__(self, line: str) -> None:
        last = line.endswith(self.marker)
        self.exe.feed(self.fd, (line[: -len(self.marker)] if last else line + "\n").encode())


def jwt(**claims: Any) -> str:
    """An unsigned JWT: the SDK reads its ``exp`` to know when to fetch a fresh one."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none'})}.{part({'exp': int(time.time()) + 3600, **claims})}.emulated"


class EmulatedSandbox:
    """One sandbox. ``v2`` ones (``SandboxCreateV2``, the 1.6 default) have ids the SDK cannot
    take for V1 ones and task ids ending in ``V``, as the SDK tells them apart by shape."""

    def __init__(self, emu: Emulator, request: Any, env: Mapping[str, str], local: Any, *, v2: bool):
        definition = request.definition
        self.v2 = v2
        self.id = f"sb-{uuid.uuid4().hex[:22]}" if not v2 else f"sb-v2-{uuid.uuid4().hex}"
        self.task_id = f"ta-{uuid.uuid4().hex[:22]}" + ("V" if v2 else "")
        self.app_id = request.app_id
        self.definition = definition
        self.env = dict(env)
        self.local = local
        self.tags: dict[str, str] = {t.tag_name: t.tag_value for t in request.tags}
        self.created_at = self.last_active = time.time()
        timeout = definition.timeout_secs or DEFAULT_TIMEOUT_S
        self.deadline = self.created_at + min(timeout, emu.max_lifetime)
        self.idle_timeout = definition.idle_timeout_secs or 0
        self.execs: dict[str, Exec] = {}
        self.result: Any = None  # an api_pb2.GenericResult once the sandbox has finished
        self.ended = asyncio.Event()

    @property
    def running(self) -> bool:
        return self.result is None

    def describe(self, image: str) -> dict[str, Any]:
        d = self.definition
        gpu = d.resources.gpu_config
        return {
            "id": self.id,
            "running": self.running,
            "v2": self.v2,
            "app_id": self.app_id,
            "image": image,
            "tags": dict(self.tags),
            "env": dict(self.env),
            "timeout_s": d.timeout_secs,
            "idle_timeout_s": d.idle_timeout_secs,
            "cpu": d.resources.milli_cpu / 1000,
            "memory_mb": d.resources.memory_mb,
            "gpu": f"{gpu.gpu_type}:{gpu.count}" if gpu.gpu_type else None,
            "block_network": network_blocked(d),
            "workdir": d.workdir,
        }

    def busy(self) -> bool:
        return any(not e.finished for e in self.execs.values())


class Emulator:
    def __init__(self, args: argparse.Namespace):
        self.token_id, self.token_secret = args.token_id, args.token_secret
        self.max_lifetime = args.max_lifetime
        self.faults = ModalFaults.from_flags(args)
        self.base = f"http://127.0.0.1:{args.port}"
        self.root = Path(tempfile.mkdtemp(prefix="modal-emulator-"))
        self.local = get_backend("local", isolation=args.isolation, root=self.root)
        self.apps: dict[str, str] = {}  # name -> app id
        self.secrets: dict[str, dict[str, str]] = {}  # id -> env
        self.images: dict[str, str] = {}  # id -> a description (registry ref or build steps)
        self.sandboxes: dict[str, EmulatedSandbox] = {}
        self.created = self.destroyed = 0
        # JWTs this emulator issued for its command router: task id -> token.
        self.router_tokens: dict[str, str] = {}

    def state(self) -> dict[str, int]:
        live = sum(1 for s in self.sandboxes.values() if s.running)
        return {"live": live, "created": self.created, "destroyed": self.destroyed}

    def described(self) -> list[dict[str, Any]]:
        """What reached the wire for each sandbox, for tests of a client's mapping."""
        return [s.describe(self.images.get(s.definition.image_id, "")) for s in self.sandboxes.values()]

    def by_task(self, task_id: str) -> EmulatedSandbox | None:
        return next((s for s in self.sandboxes.values() if s.task_id == task_id), None)

    def router_token(self, task_id: str) -> str:
        return self.router_tokens.setdefault(task_id, jwt(task_id=task_id))

    async def create(self, request: Any, env: Mapping[str, str], *, v2: bool) -> EmulatedSandbox:
        spec = SandboxSpec(network=not network_blocked(request.definition), lifetime_s=7 * 24 * 3600)
        local = await asyncio.to_thread(self.local.create, spec)
        sbx = EmulatedSandbox(self, request, env, local, v2=v2)
        self.sandboxes[sbx.id] = sbx
        self.created += 1
        if sbx.definition.entrypoint_args:
            # The sandbox's main process: the sandbox ends when it does, with its exit code.
            main = self.start_exec(sbx, f"main-{sbx.id}", list(sbx.definition.entrypoint_args), workdir="", timeout=0)
            asyncio.get_running_loop().create_task(self._end_with(sbx, main))
        return sbx

    async def _end_with(self, sbx: EmulatedSandbox, main: Exec) -> None:
        while not main.finished:
            await main.changed()
        if main.code == 0:
            await self.finish(sbx, "GENERIC_STATUS_SUCCESS")
        else:
            await self.finish(sbx, "GENERIC_STATUS_FAILURE", f"exited with code {main.code}", main.code or 0)

    async def finish(self, sbx: EmulatedSandbox, status: str, exception: str = "", exitcode: int = 0) -> None:
        """The sandbox ends (terminated, timed out, exited): its processes die, its files go."""
        from modal_proto import api_pb2

        if not sbx.running:
            return
        sbx.result = api_pb2.GenericResult(
            status=api_pb2.GenericResult.GenericStatus.Value(status), exception=exception, exitcode=exitcode
        )
        self.destroyed += 1
        sbx.ended.set()
        with contextlib.suppress(SandboxError):
            await asyncio.to_thread(sbx.local.destroy)
        for exe in sbx.execs.values():
            exe.finish(signal=KILLED)

    async def expire(self) -> None:
        """Ends sandboxes at their timeout and idle timeout, as Modal does."""
        while True:
            await asyncio.sleep(0.2)
            now = time.time()
            for sbx in [s for s in self.sandboxes.values() if s.running]:
                if sbx.busy():
                    sbx.last_active = now  # a running command is activity, however quiet
                if now >= sbx.deadline:
                    await self.finish(sbx, "GENERIC_STATUS_TIMEOUT", "Sandbox timed out")
                elif sbx.idle_timeout and not sbx.busy() and now - sbx.last_active >= sbx.idle_timeout:
                    await self.finish(sbx, "GENERIC_STATUS_IDLE_TIMEOUT", "Sandbox idle timeout")

    def start_exec(
        self, sbx: EmulatedSandbox, exec_id: str, argv: list[str], *, workdir: str, timeout: int, env=None
    ) -> Exec:
        exe = Exec(exec_id, argv, asyncio.get_running_loop())
        sbx.execs[exec_id] = exe
        sbx.last_active = time.time()
        faults = self.faults
        if faults.take("die", exe.command):
            asyncio.get_running_loop().call_later(
                faults.die_after_s,
                lambda: asyncio.ensure_future(self.finish(sbx, "GENERIC_STATUS_INTERNAL_FAILURE", "worker died")),
            )
        exe.cut = faults.take("cut", exe.command)
        command = exe.command
        if workdir:
            command = f"cd {shlex.quote(workdir)} && {command}"
        threading.Thread(
            target=run_exec, args=(sbx, exe, command, {**sbx.env, **(env or {})}, timeout or None), daemon=True
        ).start()
        return exe


def run_exec(sbx: EmulatedSandbox, exe: Exec, command: str, env: dict[str, str], timeout: float | None) -> None:
    """Run one exec in the local sandbox (in a thread) through the public ``Sandbox.run``."""
    marker = f"\x01end-of-{exe.id}"
    quoted = shlex.quote(marker)
    wrapped = f"{command}\ncode=$?; printf %s {quoted}; printf %s {quoted} >&2; exit $code"
    try:
        res = sbx.local.run(
            wrapped,
            env=env,
            timeout_s=timeout,
            on_stdout=LineJoiner(exe, STDOUT, marker),
            on_stderr=LineJoiner(exe, STDERR, marker),
        )
    except CommandTimeout:
        exe.finish(signal=KILLED)
    except SandboxError:
        exe.finish(signal=KILLED)
    else:
        exe.finish(code=res.exit_code) if sbx.running else exe.finish(signal=KILLED)
