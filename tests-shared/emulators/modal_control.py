"""The Modal emulator's control plane: the ``ModalClient`` gRPC service the SDK reaches at
``MODAL_SERVER_URL`` (hello, apps, secrets, images, sandboxes, tags, list, wait, terminate, and
access to each sandbox's command router).

Layer: tests-shared (emulators). Imports: the standard library, ``grpclib`` and ``modal_proto``
(both shipped with the ``modal`` SDK) and ``modal_model`` (next to this file).

Images are not built: ``ImageGetOrCreate`` answers success at once for any definition whose
registry reference or build steps do not contain ``missing`` (those fail like a bad pull), and
every sandbox runs on the local backend whatever its image says.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

from google.protobuf import empty_pb2
from grpclib import GRPCError, Status
from modal_model import EmulatedSandbox, Emulator, jwt
from modal_proto import api_grpc, api_pb2

Stream = Any  # grpclib.server.Stream[Request, Response]
SUCCESS = api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS)
IMAGE_BUILDER_VERSION = "2025.06"


def known(message: type, **fields: Any) -> Any:
    """``message(**fields)`` without the fields the installed SDK's protos do not have yet (the
    emulator speaks the protos of the SDK it is tested with)."""
    names = message.DESCRIPTOR.fields_by_name  # type: ignore[attr-defined]
    return message(**{k: v for k, v in fields.items() if k in names})


def handle_metadata(app_id: str) -> Any:
    return known(api_pb2.SandboxHandleMetadata, app_id=app_id)


def tags_of(sbx: EmulatedSandbox) -> list[api_pb2.SandboxTag]:
    return [api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in sbx.tags.items()]


class ControlPlane(api_grpc.ModalClientBase):
    """The RPCs the SDK's sandbox API reaches; every other one answers UNIMPLEMENTED (and is logged)."""

    def __init__(self, emu: Emulator):
        self.emu = emu

    def sandbox(self, sandbox_id: str) -> EmulatedSandbox:
        sbx = self.emu.sandboxes.get(sandbox_id)
        if sbx is None:
            raise GRPCError(Status.NOT_FOUND, f"Sandbox {sandbox_id} not found")
        return sbx

    # -- client, apps, secrets, images -----------------------------------------------------------

    async def ClientHello(self, stream: Stream) -> None:
        await stream.recv_message()
        await stream.send_message(api_pb2.ClientHelloResponse())

    async def EnvironmentGetOrCreate(self, stream: Stream) -> None:
        await stream.recv_message()
        # The image builder version every 1.x SDK knows (the image definition depends on it).
        settings = api_pb2.EnvironmentSettings(image_builder_version=IMAGE_BUILDER_VERSION)
        metadata = api_pb2.EnvironmentMetadata(name="main", settings=settings)
        await stream.send_message(api_pb2.EnvironmentGetOrCreateResponse(environment_id="en-main", metadata=metadata))

    async def AppGetOrCreate(self, stream: Stream) -> None:
        req = await stream.recv_message()
        app_id = self.emu.apps.setdefault(req.app_name, f"ap-{uuid.uuid4().hex[:22]}")
        await stream.send_message(api_pb2.AppGetOrCreateResponse(app_id=app_id))

    async def AppCreate(self, stream: Stream) -> None:
        await stream.recv_message()
        await stream.send_message(api_pb2.AppCreateResponse(app_id=f"ap-{uuid.uuid4().hex[:22]}"))

    async def AppHeartbeat(self, stream: Stream) -> None:
        await stream.recv_message()
        await stream.send_message(empty_pb2.Empty())

    async def AppClientDisconnect(self, stream: Stream) -> None:
        await stream.recv_message()
        await stream.send_message(empty_pb2.Empty())

    async def SecretGetOrCreate(self, stream: Stream) -> None:
        req = await stream.recv_message()
        secret_id = f"st-{uuid.uuid4().hex[:22]}"
        self.emu.secrets[secret_id] = dict(req.env_dict)
        await stream.send_message(api_pb2.SecretGetOrCreateResponse(secret_id=secret_id))

    async def ImageGetOrCreate(self, stream: Stream) -> None:
        req = await stream.recv_message()
        image = req.image
        description = "\n".join(image.dockerfile_commands)
        if "missing" in description:
            result = api_pb2.GenericResult(
                status=api_pb2.GenericResult.GENERIC_STATUS_FAILURE,
                exception=f"Image build failed: could not pull {description.strip()!r} (emulated)",
            )
            image_id = f"im-{uuid.uuid4().hex[:22]}"
        else:
            result = SUCCESS
            image_id = next((i for i, d in self.emu.images.items() if d == description), f"im-{uuid.uuid4().hex[:22]}")
        self.emu.images[image_id] = description
        metadata = api_pb2.ImageMetadata(workdir="/")
        await stream.send_message(api_pb2.ImageGetOrCreateResponse(image_id=image_id, result=result, metadata=metadata))

    async def ImageJoinStreaming(self, stream: Stream) -> None:
        await stream.recv_message()
        await stream.send_message(api_pb2.ImageJoinStreamingResponse(result=SUCCESS, eof=True))

    # -- sandboxes -------------------------------------------------------------------------------

    async def SandboxCreate(self, stream: Stream) -> None:
        """V1 (older SDKs; GPU sandboxes): the env arrives as a secret made just before."""
        req = await stream.recv_message()
        env = self.env_of(req.definition.secret_ids, [])
        sbx = await self.create(req, env, v2=False)
        answer = known(api_pb2.SandboxCreateResponse, sandbox_id=sbx.id, metadata=handle_metadata(req.app_id))
        await stream.send_message(answer)

    async def SandboxCreateV2(self, stream: Stream) -> None:
        """V2 (the 1.6 default): the env inline, the task and the command router known at once."""
        req = await stream.recv_message()
        env = self.env_of(req.definition.secret_ids, getattr(req, "secret_sources", ()))
        if "ephemeral_secrets" in req.DESCRIPTOR.fields_by_name:
            env.update(req.ephemeral_secrets.contents)
        sbx = await self.create(req, env, v2=True)
        access = api_pb2.CommandRouterAccess(url=self.emu.base, jwt=self.emu.router_token(sbx.task_id))
        answer = api_pb2.SandboxCreateV2Response(
            sandbox_id=sbx.id,
            task_id=sbx.task_id,
            command_router_access=access,
            metadata=handle_metadata(req.app_id),
        )
        await stream.send_message(answer)

    def env_of(self, secret_ids: Any, sources: Any) -> dict[str, str]:
        env: dict[str, str] = {}
        for secret_id in secret_ids:
            env.update(self.emu.secrets.get(secret_id, {}))
        for source in sources:
            env.update(self.emu.secrets.get(source.secret_id, {}))
            env.update(source.env.contents)
        return env

    async def create(self, req: Any, env: dict[str, str], *, v2: bool) -> EmulatedSandbox:
        if self.emu.faults.create_latency_ms:
            await asyncio.sleep(self.emu.faults.create_latency_ms / 1000)
        if "environment_variables" in req.definition.DESCRIPTOR.fields_by_name:
            env.update(req.definition.environment_variables.contents)
        return await self.emu.create(req, env, v2=v2)

    async def SandboxGetTaskId(self, stream: Stream) -> None:
        req = await stream.recv_message()
        sbx = self.sandbox(req.sandbox_id)
        # A finished sandbox has no task any more: only its result (the SDK then raises ConflictError).
        answer = api_pb2.SandboxGetTaskIdResponse(task_id=sbx.task_id if sbx.running else "")
        if not sbx.running:
            answer.task_result.CopyFrom(sbx.result)
        await stream.send_message(answer)

    async def TaskGetCommandRouterAccess(self, stream: Stream) -> None:
        req = await stream.recv_message()
        sbx = self.emu.by_task(req.task_id)
        await self.router_access(stream, sbx, req.task_id, api_pb2.TaskGetCommandRouterAccessResponse)

    async def SandboxGetCommandRouterAccess(self, stream: Stream) -> None:
        req = await stream.recv_message()
        sbx = self.emu.sandboxes.get(req.sandbox_id) if req.sandbox_id else self.emu.by_task(req.task_id)
        await self.router_access(
            stream, sbx, req.sandbox_id or req.task_id, api_pb2.SandboxGetCommandRouterAccessResponse
        )

    async def router_access(self, stream: Stream, sbx: EmulatedSandbox | None, name: str, answer: Any) -> None:
        if sbx is None or not sbx.running:
            raise GRPCError(Status.NOT_FOUND, f"Sandbox or task {name} not found or finished")
        # Plain HTTP is what the SDK accepts from a localhost server; the router is this port.
        jwt = self.emu.router_token(sbx.task_id)
        await stream.send_message(answer(url=self.emu.base, jwt=jwt))

    async def AuthTokenGet(self, stream: Stream) -> None:
        await stream.recv_message()
        await stream.send_message(api_pb2.AuthTokenGetResponse(token=jwt(sub="emulated-user")))

    async def SandboxWait(self, stream: Stream) -> None:
        req = await stream.recv_message()
        sbx = self.sandbox(req.sandbox_id)
        if req.timeout > 0 and sbx.running:
            # A long poll: answer when the sandbox ends or the client's timeout passes.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(sbx.ended.wait(), timeout=req.timeout)
        metadata = handle_metadata(sbx.app_id)
        if not sbx.running and "result" in metadata.DESCRIPTOR.fields_by_name:
            metadata.result.CopyFrom(sbx.result)
        answer = known(api_pb2.SandboxWaitResponse, metadata=metadata)
        if not sbx.running:
            answer.result.CopyFrom(sbx.result)
        await stream.send_message(answer)

    async def SandboxTerminate(self, stream: Stream) -> None:
        req = await stream.recv_message()
        sbx = self.sandbox(req.sandbox_id)
        existing = sbx.result
        await self.emu.finish(sbx, "GENERIC_STATUS_TERMINATED", "Sandbox terminated")
        answer = api_pb2.SandboxTerminateResponse()
        if existing is not None:
            answer.existing_result.CopyFrom(existing)
        await stream.send_message(answer)

    async def SandboxTagsSet(self, stream: Stream) -> None:
        req = await stream.recv_message()
        sbx = self.sandbox(req.sandbox_id)
        sbx.tags = {t.tag_name: t.tag_value for t in req.tags}
        await stream.send_message(empty_pb2.Empty())

    async def SandboxTagsGet(self, stream: Stream) -> None:
        req = await stream.recv_message()
        await stream.send_message(api_pb2.SandboxTagsGetResponse(tags=tags_of(self.sandbox(req.sandbox_id))))

    async def SandboxList(self, stream: Stream) -> None:
        """Newest first, pages ending before ``before_timestamp`` (the SDK pages by creation time)."""
        req = await stream.recv_message()
        wanted = {t.tag_name: t.tag_value for t in req.tags}
        before = req.before_timestamp or time.time() + 1
        found = [
            s
            for s in self.emu.sandboxes.values()
            if (s.running or req.include_finished)
            and (not req.app_id or s.app_id == req.app_id)
            and wanted.items() <= s.tags.items()
            and s.created_at < before
        ]
        found.sort(key=lambda s: s.created_at, reverse=True)
        infos = [
            known(
                api_pb2.SandboxInfo,
                id=s.id,
                app_id=s.app_id,
                created_at=s.created_at,
                tags=tags_of(s),
                timeout_secs=s.definition.timeout_secs,
                idle_timeout_secs=s.idle_timeout,
                task_info=api_pb2.TaskInfo(id=s.task_id, sandbox_id=s.id, started_at=s.created_at),
            )
            for s in found[:100]
        ]
        await stream.send_message(api_pb2.SandboxListResponse(sandboxes=infos))

    # The V2 names of the same calls (same messages; the SDK also sends an auth token with them).
    SandboxGetTaskIdV2 = SandboxGetTaskId
    SandboxWaitV2 = SandboxWait
    SandboxTerminateV2 = SandboxTerminate
    SandboxTagsSetV2 = SandboxTagsSet
    SandboxTagsGetV2 = SandboxTagsGet
    SandboxListV2 = SandboxList
