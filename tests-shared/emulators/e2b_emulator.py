"""A wire emulator of E2B: the control plane API and each sandbox's envd daemon, on one port.

Layer: tests-shared (emulators). Imports: the standard library, ``aiohttp``, ``emulator_base``,
``emulator_faults``, ``e2b_envd`` (emulated sandboxes) and ``e2b_envd_routes`` (envd's HTTP side),
all next to this file (each sandbox is a core ``local`` sandbox under bubblewrap).

    python tests-shared/emulators/e2b_emulator.py --port PORT [--default-lifetime S] [faults...]

prints ``READY http://127.0.0.1:PORT`` once it accepts connections. Point the real ``e2b`` SDK at
it with ``E2B_API_URL=E2B_SANDBOX_URL=http://127.0.0.1:PORT`` and ``E2B_API_KEY=e2b_`` + 40 zeros.

It speaks what the SDK (2.7 to 2.63) sends: the REST control plane (``/sandboxes``, ``/v2/sandboxes``:
create, connect, info, list by metadata with pagination, timeout, kill), envd's Connect protocol
with the JSON codec (``process.Process/Start|Connect`` as streams of enveloped events over chunked
HTTP/1.1 with keepalives; ``List``, ``SendSignal`` unary) and the files API (``GET|POST /files``,
multipart or octet-stream, gzip), on aiohttp like the Daytona emulator. Sandboxes expire at their
timeout like the real service (which refuses timeouts over 24 h); ``--max-lifetime S`` silently caps
every timeout to S seconds, so a test can scale the lifetime down and check that long commands are
kept alive.

Test hooks (``emulator_base``): ``GET /_emulator/state`` → ``{"live", "created", "destroyed"}``; faults
from flags or ``POST /_emulator/faults`` (a JSON object with the same keys as ``E2BFaults``): latency, a fraction of
control-plane requests answered 429 or 503, the next N matching commands' sandboxes dying
mid-command, the next N matching command streams stalling (no events at all, the connection left
open) while the command runs on, the next N matching uploads stalling (body never read).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2b_envd import EmulatedSandbox
from e2b_envd_routes import ENVD_PATHS, add_envd_routes
from emulator_base import BaseEmulator, parser, serve_main
from emulator_faults import Faults

DEFAULT_API_KEY = "e2b_" + "0" * 40
ENVD_VERSION = "0.5.7"  # >= 0.4.0: default user, no Basic auth; >= 0.5.7: octet-stream uploads
CPU, MEMORY_MB, DISK_MB = 2, 512, 10240  # what E2B's base template reports
PLAN_MAX_TIMEOUT_S = 86400  # E2B refuses longer sandbox timeouts (24 h on Pro plans)


@dataclasses.dataclass
class E2BFaults(Faults):
    stall_upload_next: int = dataclasses.field(default=0, metadata={"help": "the next N matching uploads stall"})


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


async def body_json(request: web.Request) -> dict[str, Any]:
    return json.loads(await request.read() or b"{}")  # type: ignore[no-any-return]


class Emulator(BaseEmulator[EmulatedSandbox]):
    """E2B's control plane (the envd side is ``e2b_envd_routes``) over the shared emulator base."""

    name = "e2b"
    refusals = {429: "Rate limit exceeded (emulated)", 503: "Service busy (emulated)"}
    faults: E2BFaults

    def __init__(self, args: argparse.Namespace):
        super().__init__(args, E2BFaults.from_flags(args))
        self.api_key = args.api_key
        self.default_lifetime = args.default_lifetime
        self.max_lifetime = args.max_lifetime
        self.keepalive_s = args.keepalive_s
        self.templates = set(args.templates.split(","))

    def lifetime(self, requested: Any) -> float:
        value = float(requested) if requested else float(self.default_lifetime)
        return min(value, float(self.max_lifetime))

    # -- the shared base's hooks -----------------------------------------------------------------

    def error(self, status: int, message: str) -> web.Response:
        return web.json_response({"code": status, "message": message}, status=status)

    def exempt(self, request: web.Request) -> bool:
        return request.path.startswith(ENVD_PATHS)  # envd checks the sandbox's access token itself

    def unauthorized(self, request: web.Request) -> web.Response | None:
        return None if request.headers.get("X-API-KEY") == self.api_key else self.error(401, "Invalid API key")

    def discard(self, sbx: EmulatedSandbox) -> None:
        sbx.kill()

    def background(self) -> list[Callable[[], Awaitable[None]]]:
        return [self.expire]

    async def expire(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            now = time.time()
            for sbx in [s for s in list(self.sandboxes.values()) if s.deadline <= now]:
                await asyncio.to_thread(self.remove, sbx.id)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        add_envd_routes(router)
        for prefix in ("", "/v2"):
            router.add_post(f"{prefix}/sandboxes", self.create)
            router.add_get(f"{prefix}/sandboxes", self.list)
            router.add_get(f"{prefix}/sandboxes/{{id}}", self.for_sandbox(self.info))
            router.add_delete(f"{prefix}/sandboxes/{{id}}", self.for_sandbox(self.kill))
            router.add_post(f"{prefix}/sandboxes/{{id}}/timeout", self.for_sandbox(self.set_timeout))
            router.add_post(f"{prefix}/sandboxes/{{id}}/connect", self.for_sandbox(self.connect))
        router.add_route("*", "/{tail:.*}", self.unknown)

    # -- control plane ---------------------------------------------------------------------------

    async def unknown(self, request: web.Request) -> web.Response:
        await request.read()
        return self.error(404, f"no route {request.method} {request.path}")

    async def info(self, request: web.Request, sbx: EmulatedSandbox) -> web.Response:
        return web.json_response(detail(sbx))

    async def kill(self, request: web.Request, sbx: EmulatedSandbox) -> web.Response:
        await asyncio.to_thread(self.remove, sbx.id)
        return web.Response(status=204)

    async def set_timeout(self, request: web.Request, sbx: EmulatedSandbox) -> web.Response:
        body = await body_json(request)
        if float(body.get("timeout") or 0) > PLAN_MAX_TIMEOUT_S:
            return self.error(400, "Timeout cannot be greater than 24 hours")
        sbx.set_timeout(self.lifetime(body.get("timeout")))
        return web.Response(status=204)

    async def connect(self, request: web.Request, sbx: EmulatedSandbox) -> web.Response:
        body = await body_json(request)
        deadline = time.time() + self.lifetime(body.get("timeout"))
        sbx.deadline = max(sbx.deadline, deadline)  # connect only ever extends
        return web.json_response(created_body(sbx))

    async def create(self, request: web.Request) -> web.Response:
        body = await body_json(request)
        if float(body.get("timeout") or 0) > PLAN_MAX_TIMEOUT_S:
            return self.error(400, "Timeout cannot be greater than 24 hours")
        template = body.get("templateID") or "base"
        if template not in self.templates:
            return self.error(404, f"template '{template}' not found")
        network = body.get("allow_internet_access", body.get("allowInternetAccess"))
        sbx = await asyncio.to_thread(
            EmulatedSandbox,
            self.local,
            f"i{uuid.uuid4().hex[:19]}",
            template=template,
            metadata=body.get("metadata") or {},
            env_vars=body.get("envVars") or {},
            network=network is not False,
            timeout_s=self.lifetime(body.get("timeout")),
            access_token=uuid.uuid4().hex,
        )
        self.add(sbx.id, sbx)
        return web.json_response(created_body(sbx), status=201)

    async def list(self, request: web.Request) -> web.Response:
        query = request.query
        wanted: dict[str, str] = {}
        for raw in query.getall("metadata", []):
            wanted.update({unquote(k): unquote(v[0]) for k, v in parse_qs(raw).items()})
        states = {s for raw in query.getall("state", []) for s in raw.split(",")}
        found = sorted(
            (s for s in list(self.sandboxes.values()) if wanted.items() <= s.metadata.items()),
            key=lambda s: s.id,
        )
        if states and "running" not in states:
            found = []
        start = int(query.get("nextToken") or 0)
        limit = int(query.get("limit") or 100)
        page = found[start : start + limit]
        headers = {"x-next-token": str(start + limit)} if start + limit < len(found) else {}
        return web.json_response([detail(s) for s in page], headers=headers)


def created_body(sbx: EmulatedSandbox) -> dict[str, Any]:
    return {
        "templateID": sbx.template,
        "sandboxID": sbx.id,
        "clientID": "emulator",
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": sbx.access_token,
    }


def detail(sbx: EmulatedSandbox) -> dict[str, Any]:
    return {
        **created_body(sbx),
        "startedAt": iso(sbx.started_at),
        "endAt": iso(sbx.deadline),
        "cpuCount": CPU,
        "memoryMB": MEMORY_MB,
        "diskSizeMB": DISK_MB,
        "state": "running",
        "metadata": sbx.metadata,
        "allowInternetAccess": sbx.network,
    }


def main() -> None:
    found = parser((__doc__ or "").split("\n\n")[0], E2BFaults)
    found.add_argument("--api-key", default=DEFAULT_API_KEY)
    found.add_argument("--templates", default="base", help="comma-separated template names that exist")
    found.add_argument("--default-lifetime", type=float, default=300, help="seconds, when create sends none")
    found.add_argument(
        "--max-lifetime",
        type=float,
        default=PLAN_MAX_TIMEOUT_S,
        help="silently cap every requested timeout to this (s): scaled-down lifetimes for tests",
    )
    found.add_argument("--keepalive-s", type=float, default=0, help="keepalive ping interval cap (s)")
    serve_main(Emulator, found.parse_args())


if __name__ == "__main__":
    main()
