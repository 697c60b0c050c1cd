"""The Modal emulator's task command router: the ``TaskCommandRouter`` gRPC service through which
the SDK (1.x) execs in a sandbox, reads its output by offset, writes its stdin and waits for it.

Layer: tests-shared (emulators). Imports: the standard library, ``grpclib`` and ``modal_proto``
(shipped with the ``modal`` SDK), ``metaflow_extensions.sandbox.core`` (errors) and
``modal_model`` (next to this file).

The SDK reaches it at the URL ``TaskGetCommandRouterAccess`` gives (this same port, plain HTTP/2,
which the SDK accepts from a localhost server) with that call's JWT as a bearer token.
``sandbox.filesystem`` execs a helper binary in the container (``FS_TOOLS``) with a JSON command;
the router serves ``ReadFile`` and ``WriteFile`` itself through the local sandbox's file transfer,
and answers the other commands as unsupported.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from grpclib import GRPCError, Status
from modal_model import FS_TOOLS, STDERR, STDOUT, EmulatedSandbox, Emulator, Exec
from modal_proto import task_command_router_grpc, task_command_router_pb2

from metaflow_extensions.sandbox.core import SandboxError, SandboxFileNotFound

Stream = Any  # grpclib.server.Stream[Request, Response]
pb = task_command_router_pb2


class CommandRouter(task_command_router_grpc.TaskCommandRouterBase):
    """Exec, stdio, stdin and wait; every other RPC answers UNIMPLEMENTED (and is logged)."""

    def __init__(self, emu: Emulator):
        self.emu = emu

    def sandbox(self, stream: Stream, task_id: str) -> EmulatedSandbox:
        sbx = self.emu.by_task(task_id)
        token = self.emu.router_tokens.get(task_id)
        if sbx is None or token is None:
            raise GRPCError(Status.NOT_FOUND, f"Task {task_id} not found")
        if dict(stream.metadata or {}).get("authorization") != f"Bearer {token}":
            raise GRPCError(Status.UNAUTHENTICATED, "Invalid or missing command router token")
        return sbx

    def exec_of(self, stream: Stream, task_id: str, exec_id: str) -> Exec:
        exe = self.sandbox(stream, task_id).execs.get(exec_id)
        if exe is None:
            raise GRPCError(Status.NOT_FOUND, f"Exec {exec_id} not found")
        return exe

    async def TaskExecStart(self, stream: Stream) -> None:
        req = await stream.recv_message()
        sbx = self.sandbox(stream, req.task_id)
        if not sbx.running:
            raise GRPCError(Status.NOT_FOUND, f"Task {req.task_id} has finished")
        if req.exec_id not in sbx.execs:  # the exec id is the idempotency key of retried starts
            env = dict(req.env)
            for secret_id in req.secret_ids:
                env.update(self.emu.secrets.get(secret_id, {}))
            for source in getattr(req, "secret_sources", ()):  # SDK 1.6
                env.update(self.emu.secrets.get(source.secret_id, {}))
                env.update(source.env.contents)
            argv = list(req.command_args)
            if argv[:1] == [FS_TOOLS]:
                exe = Exec(req.exec_id, argv, asyncio.get_running_loop())
                sbx.execs[req.exec_id] = exe
                asyncio.get_running_loop().create_task(fs_tool(sbx, exe))
            else:
                timeout = req.timeout_secs if req.HasField("timeout_secs") else 0
                self.emu.start_exec(sbx, req.exec_id, argv, workdir=req.workdir, timeout=timeout, env=env)
        await stream.send_message(pb.TaskExecStartResponse())

    async def TaskExecStdioRead(self, stream: Stream) -> None:
        """The output from ``offset`` on, as it comes; the stream ends after the last byte."""
        req = await stream.recv_message()
        exe = self.exec_of(stream, req.task_id, req.exec_id)
        buffer = exe.output[STDERR if req.file_descriptor == STDERR else STDOUT]
        sent = req.offset
        while True:
            if sent < len(buffer):
                chunk = bytes(buffer[sent : sent + (1 << 20)])
                await stream.send_message(pb.TaskExecStdioReadResponse(data=chunk))
                sent += len(chunk)
                if exe.cut:
                    # A cut stream: reset mid-way; the SDK reconnects from the offset it has.
                    exe.cut = False
                    await stream.cancel()
                    return
                continue
            if exe.finished:
                return
            await exe.changed()

    async def TaskExecWait(self, stream: Stream) -> None:
        req = await stream.recv_message()
        exe = self.exec_of(stream, req.task_id, req.exec_id)
        while not exe.finished:
            await exe.changed()
        await stream.send_message(pb.TaskExecWaitResponse(**exit_status(exe)))

    async def TaskExecPoll(self, stream: Stream) -> None:
        req = await stream.recv_message()
        exe = self.exec_of(stream, req.task_id, req.exec_id)
        await stream.send_message(pb.TaskExecPollResponse(**(exit_status(exe) if exe.finished else {})))

    async def TaskExecStdinWriteStream(self, stream: Stream) -> None:
        exe: Exec | None = None
        offset = 0
        async for message in stream:
            kind = message.WhichOneof("payload")
            if kind == "start":
                exe = self.exec_of(stream, message.start.task_id, message.start.exec_id)
                offset = message.start.offset
            elif exe is None:
                raise GRPCError(Status.INVALID_ARGUMENT, "the first message of a stdin stream must be `start`")
            elif kind == "data":
                write_stdin(exe, offset, message.data)
                offset += len(message.data)
            elif kind == "end":
                exe.stdin_closed = True
                exe.stdin_changed()
        await stream.send_message(pb.TaskExecStdinWriteStreamResponse())

    async def TaskExecStdinWrite(self, stream: Stream) -> None:
        req = await stream.recv_message()
        exe = self.exec_of(stream, req.task_id, req.exec_id)
        write_stdin(exe, req.offset, req.data)
        if req.eof:
            exe.stdin_closed = True
            exe.stdin_changed()
        await stream.send_message(pb.TaskExecStdinWriteResponse())

    async def TaskExecStdinStatus(self, stream: Stream) -> None:
        req = await stream.recv_message()
        exe = self.exec_of(stream, req.task_id, req.exec_id)
        answer = pb.TaskExecStdinStatusResponse(num_bytes_written=len(exe.stdin), closed=exe.stdin_closed)
        await stream.send_message(answer)


def exit_status(exe: Exec) -> dict[str, int]:
    return {"signal": exe.signal} if exe.signal is not None else {"code": exe.code or 0}


def write_stdin(exe: Exec, offset: int, data: bytes) -> None:
    """Bytes at ``offset`` of the exec's stdin; a resent prefix is dropped (resumed streams)."""
    if exe.stdin_closed:
        raise GRPCError(Status.FAILED_PRECONDITION, f"stdin of exec {exe.id} is closed")
    if offset > len(exe.stdin):
        raise GRPCError(Status.OUT_OF_RANGE, f"stdin offset {offset} is past {len(exe.stdin)} bytes written")
    exe.stdin[offset:] = data if offset == len(exe.stdin) else exe.stdin[offset:] + data[len(exe.stdin) - offset :]
    exe.stdin_changed()


def fs_error(exe: Exec, kind: str, message: str) -> None:
    exe.feed(STDERR, json.dumps({"error_kind": kind, "message": message}).encode())
    exe.finish(code=1)


async def fs_tool(sbx: EmulatedSandbox, exe: Exec) -> None:
    """What ``modal-sandbox-fs-tools`` does in the container, for ``ReadFile`` and ``WriteFile``."""
    try:
        command = json.loads(exe.argv[1])
        (op, args), *_ = command.items()
    except (IndexError, ValueError, AttributeError):
        return fs_error(exe, "InvalidArgument", "malformed command")
    with tempfile.TemporaryDirectory(prefix="fs-tools-") as tmp:
        local = Path(tmp) / "data"
        try:
            if op == "ReadFile":
                await asyncio.to_thread(sbx.local.download, args["path"], local)
                exe.feed(STDOUT, local.read_bytes())
            elif op == "WriteFile":
                while not (exe.stdin_closed or exe.finished):
                    await exe.changed()
                if exe.finished:  # the sandbox ended before the client finished writing
                    return None
                local.write_bytes(bytes(exe.stdin))
                await asyncio.to_thread(sbx.local.upload, local, args["path"])
            else:
                return fs_error(exe, "NotSupported", f"{op} is not emulated")
        except SandboxFileNotFound:
            return fs_error(exe, "NotFound", "No such file or directory")
        except SandboxError as e:
            return fs_error(exe, "Other", str(e))
    exe.finish(code=0)
