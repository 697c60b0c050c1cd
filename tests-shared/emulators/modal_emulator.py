"""A wire emulator of Modal: the gRPC control plane and each sandbox's task command router, on one
port, with the test hooks of the other emulators on the same port over HTTP/1.1.

Layer: tests-shared (emulators). Imports: the standard library, ``grpclib`` and ``modal_proto``
(shipped with the ``modal`` SDK), ``modal_control`` / ``modal_router`` / ``modal_model`` /
``emulator_faults`` (next to this file) and ``metaflow_extensions.sandbox.core`` (each sandbox is a
core ``local`` sandbox, under bubblewrap when available, so it never sees the launcher's files).

    python tests-shared/emulators/modal_emulator.py --port PORT [--isolation auto] [faults...]

prints ``READY http://127.0.0.1:PORT`` once it accepts connections. Point the real ``modal`` SDK
(1.6) at it with ``MODAL_SERVER_URL=http://127.0.0.1:PORT`` and ``MODAL_TOKEN_ID`` /
``MODAL_TOKEN_SECRET`` set to ``--token-id`` / ``--token-secret`` (defaults ``ak-emulator`` /
``as-emulator``); any other token is refused with UNAUTHENTICATED, as Modal does.

It speaks the subset of ``modal.client.ModalClient`` the sandbox API reaches (see
``modal_control``) and ``modal.task_command_router.TaskCommandRouter`` (``modal_router``): create
from any image (not built), exec with streamed stdout/stderr and exit codes, ``sandbox.filesystem``
reads and writes, tags, list by tags, wait, terminate, ``timeout`` / ``idle_timeout`` expiry
(``--max-lifetime S`` caps every timeout) and ``block_network``. Any other RPC answers
UNIMPLEMENTED and is logged to stderr, so a client reaching for more shows up at once.

Test hooks, over HTTP/1.1 on the same port (told apart from HTTP/2 by the connection preface):
``GET /_emulator/state`` → ``{"live", "created", "destroyed"}``; ``GET /_emulator/sandboxes`` →
what reached the wire for each sandbox (image, tags, env, timeouts, cpu, memory, gpu, network);
faults from flags or ``POST /_emulator/faults`` (a JSON object with the keys of ``ModalFaults``):
latency on every call; a fraction of control-plane calls refused RESOURCE_EXHAUSTED with a
retry-after (``rate_429``, Modal's rate limiting) or UNAVAILABLE (``rate_503``); the next N calls
of one RPC failing with a chosen status (``fail_next``, ``fail_rpc``, ``fail_status``); the next N
matching execs' output streams cut after their first chunk (``cut_next``) or their sandbox dying
(``die_next``); and ``create_latency_ms`` added to every ``SandboxCreate``. ``stall_next`` is
accepted and ignored (the SDK has no way to notice a silent stream).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpclib.events
from grpclib import GRPCError, Status
from grpclib.encoding.base import StatusDetailsCodecBase
from grpclib.server import Server
from modal_control import ControlPlane
from modal_model import Emulator, ModalFaults
from modal_router import CommandRouter

H2_PREFACE = b"PRI * HTTP/2.0"
CONTROL_PREFIX = "/modal.client.ModalClient/"
DEFAULT_TOKEN_ID, DEFAULT_TOKEN_SECRET = "ak-emulator", "as-emulator"


def serving_all_rpcs(cls: type, base: type) -> type:
    """``cls`` with every abstract RPC of ``base`` it leaves out answering UNIMPLEMENTED."""

    def unimplemented(name: str) -> Any:
        async def handler(self: Any, stream: Any) -> None:
            print(f"modal-emulator: unimplemented RPC {name}", file=sys.stderr, flush=True)
            raise GRPCError(Status.UNIMPLEMENTED, f"{name} is not emulated")

        return handler

    missing = {name: unimplemented(name) for name in getattr(base, "__abstractmethods__", ()) if name not in vars(cls)}
    return type(cls.__name__, (cls,), missing)


class StatusDetails(StatusDetailsCodecBase):
    """Error details as Modal's servers send them: an ``RPCStatus`` with packed messages (the SDK
    reads an ``RPCRetryPolicy`` there to wait and retry a RESOURCE_EXHAUSTED call)."""

    def encode(self, status: Status, message: str | None, details: Any) -> bytes:
        from modal_proto import api_pb2

        answer = api_pb2.RPCStatus(code=status.value, message=message or "")
        for detail in details or []:
            answer.details.add().Pack(detail, type_url_prefix="type.modal.com/")
        return bytes(answer.SerializeToString())

    def decode(self, status: Status, message: str | None, data: bytes) -> Any:
        raise NotImplementedError("the emulator only sends error details")


def guard(emu: Emulator) -> Any:
    """Every call: authentication, then the injected faults, before any handler runs."""

    from modal_proto import api_pb2

    async def on_request(event: grpclib.events.RecvRequest) -> None:
        rpc = event.method_name.rsplit("/", 1)[-1]
        faults = emu.faults
        if faults.latency_ms:
            await asyncio.sleep(faults.latency_ms / 1000)
        control = event.method_name.startswith(CONTROL_PREFIX)
        if control:
            token = (event.metadata.get("x-modal-token-id"), event.metadata.get("x-modal-token-secret"))
            if token != (emu.token_id, emu.token_secret):
                raise GRPCError(Status.UNAUTHENTICATED, "Token ID or secret is invalid. Run `modal token new`.")
        status = faults.take_failure(rpc)
        if status is not None:
            raise GRPCError(status, f"{rpc} failed (emulated {status.name})")
        if control:
            refusal = faults.refusal()
            if refusal == 429:
                # Rate limiting: Modal says when to come back, and the SDK waits that long.
                retry = api_pb2.RPCRetryPolicy(retry_after_secs=0.05)
                raise GRPCError(Status.RESOURCE_EXHAUSTED, "Too many requests (emulated)", [retry])
            if refusal == 503:
                raise GRPCError(Status.UNAVAILABLE, "Service busy (emulated)")

    return on_request


class Mux:
    """The public port: HTTP/2 connections are piped to the gRPC server, HTTP/1.1 ones are the hooks."""

    def __init__(self, emu: Emulator, grpc_socket: Path):
        self.emu, self.grpc_socket = emu, grpc_socket

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readexactly(len(H2_PREFACE))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        if head == H2_PREFACE:
            with contextlib.suppress(asyncio.CancelledError):  # the emulator is stopping
                await self.pipe(head, reader, writer)
        else:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ValueError):
                await self.hook(head, reader, writer)
            writer.close()

    async def pipe(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(str(self.grpc_socket))
        up_writer.write(head)

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(ConnectionError, OSError):
                dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))

    async def hook(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = head + await reader.readuntil(b"\r\n\r\n")
        lines = request.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await reader.readexactly(int(headers.get("content-length") or 0))
        status, answer = 200, None
        if method == "GET" and path == "/_emulator/state":
            answer = self.emu.state()
        elif method == "GET" and path == "/_emulator/sandboxes":
            answer = self.emu.described()
        elif method == "POST" and path == "/_emulator/faults":
            problem = self.emu.faults.update(json.loads(body or b"{}"))
            status, answer = (400, {"error": problem}) if problem else (200, self.emu.faults.as_dict())
        else:
            status, answer = 404, {"error": f"no emulator route {method} {path}"}
        data = json.dumps(answer).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            f"Connection: close\r\n\r\n".encode()
            + data
        )
        await writer.drain()


async def serve(args: argparse.Namespace) -> None:
    from modal_proto import api_grpc, task_command_router_grpc

    emu = Emulator(args)
    control = serving_all_rpcs(ControlPlane, api_grpc.ModalClientBase)(emu)
    router = serving_all_rpcs(CommandRouter, task_command_router_grpc.TaskCommandRouterBase)(emu)
    server = Server([control, router], status_details_codec=StatusDetails())
    grpclib.events.listen(server, grpclib.events.RecvRequest, guard(emu))
    grpc_socket = emu.root / "grpc.sock"
    await server.start(path=str(grpc_socket))
    public = await asyncio.start_server(Mux(emu, grpc_socket).handle, "127.0.0.1", args.port)
    expiry = asyncio.get_running_loop().create_task(emu.expire())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {emu.base}", flush=True)
    try:
        await stop.wait()
    finally:
        # Terminating the emulator (what test fixtures do) removes every sandbox it still holds.
        expiry.cancel()
        public.close()
        for sbx in list(emu.sandboxes.values()):
            await emu.finish(sbx, "GENERIC_STATUS_TERMINATED", "emulator stopped")
        server.close()
        shutil.rmtree(emu.root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--isolation", default="auto", help="local backend isolation: auto, bwrap or process")
    parser.add_argument("--token-id", default=DEFAULT_TOKEN_ID, help="the only MODAL_TOKEN_ID accepted")
    parser.add_argument("--token-secret", default=DEFAULT_TOKEN_SECRET, help="the only MODAL_TOKEN_SECRET accepted")
    parser.add_argument("--max-lifetime", type=float, default=86400, help="cap on every sandbox timeout (s)")
    ModalFaults.add_flags(parser)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
