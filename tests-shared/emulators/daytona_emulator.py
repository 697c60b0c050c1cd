"""A wire emulator of Daytona: the control-plane API and each sandbox's toolbox, on one port.

Layer: tests-shared (emulators). Imports: the standard library, ``aiohttp`` (a dependency of the
``daytona`` SDK itself), ``emulator_base``, ``daytona_model`` and ``daytona_toolbox`` (next to this
file) and ``metaflow_extensions.sandbox.core`` (each sandbox is a core ``local`` sandbox, under
bubblewrap when available, so it never sees the launcher's files).

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
``POST /_emulator/faults`` (a JSON object with the keys of ``DaytonaFaults``): latency on every request, a
fraction of requests answered 429 or 503 (before any processing), the next N matching commands'
sandboxes dying mid-command (state ``error``, exit code -1, log streams closed with 1011), the
next N matching commands' log streams dropped mid-way (the TCP connection cut) or stalled (open,
silent, never closed) while the command runs on. Snapshots or
images whose name contains ``missing`` do not exist; ``--max-live N`` refuses creation beyond N
live sandboxes with Daytona's quota error. Auto-stop is enforced as Daytona does (no API or toolbox
activity for ``autoStopInterval`` minutes: stopped, and deleted at once with auto-delete 0);
``--minute-s S`` makes such a minute S seconds long, so a test can watch an orphan die.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

import daytona_toolbox as toolbox
from daytona_model import DEFAULT_SNAPSHOT, DaytonaFaults, EmulatedSandbox, Emulator, emulator, error
from emulator_base import parser as emulator_parser
from emulator_base import serve_main

from metaflow_extensions.sandbox.core import Resources, SandboxSpec

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
    emu.add(sandbox_id, sbx)
    return web.json_response(sbx.json())


async def get_sandbox(request: web.Request, sbx: EmulatedSandbox) -> web.Response:
    return web.json_response(sbx.json())


async def delete_sandbox(request: web.Request, sbx: EmulatedSandbox) -> web.Response:
    await asyncio.to_thread(emulator(request).remove, sbx.id)
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


async def set_labels(request: web.Request, sbx: EmulatedSandbox) -> web.Response:
    sbx.labels = dict((await request.json()).get("labels") or {})
    return web.json_response({"labels": sbx.labels})


async def set_interval(request: web.Request, sbx: EmulatedSandbox) -> web.Response:
    value = int(request.match_info["n"])
    setattr(sbx, "auto_stop" if request.match_info["what"] == "autostop" else "auto_delete", value)
    return web.json_response(sbx.json())


async def last_activity(request: web.Request, sbx: EmulatedSandbox) -> web.Response:
    sbx.last_activity = time.time()
    return web.Response(status=201)


async def toolbox_proxy_url(request: web.Request, sbx: EmulatedSandbox) -> web.Response:
    return web.json_response({"url": sbx.toolbox_url})


async def config(request: web.Request) -> web.Response:
    base = emulator(request).base
    return web.json_response({"proxyToolboxUrl": f"{base}/toolbox", "defaultSnapshot": DEFAULT_SNAPSHOT})


async def unknown(request: web.Request) -> web.Response:
    print(f"daytona-emulator: no route for {request.method} {request.path_qs}", flush=True, file=sys.stderr)
    return error(404, f"Cannot {request.method} {request.path}")


class DaytonaEmulator(Emulator):
    """The Daytona emulator's HTTP side: authentication, routes and the auto-stop loop."""

    def exempt(self, request: web.Request) -> web.Response | bool:
        if request.path.startswith("/socket.io"):
            # No event gateway: the SDK falls back to polling, as it does behind proxies.
            return error(404, "Cannot GET /socket.io/")
        return False

    def unauthorized(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:].startswith("invalid"):
            return error(401, "Invalid credentials", code="UNAUTHORIZED")
        return None

    def background(self) -> list[Callable[[], Awaitable[None]]]:
        return [self.auto_stop_idle]

    async def auto_stop_idle(self) -> None:
        """Stop (and, with auto-delete 0, delete) sandboxes idle past their auto-stop interval."""
        while True:
            await asyncio.sleep(min(1.0, self.minute_s / 10))
            for sbx in self.idle_past_auto_stop(time.time()):
                await asyncio.to_thread(self.auto_stop, sbx)

    def add_routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/api/config", config)
        r.add_post("/api/sandbox", create_sandbox)
        r.add_get("/api/sandbox", list_sandboxes)
        r.add_get("/api/sandbox/paginated", list_paginated)
        r.add_get("/api/sandbox/{id}", self.for_sandbox(get_sandbox))
        r.add_delete("/api/sandbox/{id}", self.for_sandbox(delete_sandbox))
        r.add_put("/api/sandbox/{id}/labels", self.for_sandbox(set_labels))
        r.add_post("/api/sandbox/{id}/{what:autostop|autodelete}/{n:-?[0-9]+}", self.for_sandbox(set_interval))
        r.add_post("/api/sandbox/{id}/last-activity", self.for_sandbox(last_activity))
        r.add_get("/api/sandbox/{id}/toolbox-proxy-url", self.for_sandbox(toolbox_proxy_url))
        tb = "/toolbox/{id}"
        r.add_post(f"{tb}/process/session", toolbox.create_session)
        r.add_get(f"{tb}/process/session", toolbox.list_sessions)
        r.add_get(f"{tb}/process/session/{{session}}", toolbox.get_session)
        r.add_delete(f"{tb}/process/session/{{session}}", toolbox.delete_session)
        r.add_post(f"{tb}/process/session/{{session}}/exec", toolbox.session_exec)
        r.add_get(f"{tb}/process/session/{{session}}/command/{{cmd}}", toolbox.get_command)
        r.add_get(f"{tb}/process/session/{{session}}/command/{{cmd}}/logs", toolbox.command_logs)
        r.add_post(f"{tb}/process/execute", toolbox.execute)
        r.add_post(f"{tb}/files/bulk-upload", toolbox.bulk_upload)
        r.add_post(f"{tb}/files/bulk-download", toolbox.bulk_download)
        for name in ("work-dir", "user-home-dir", "version"):
            r.add_get(f"{tb}/{name}", toolbox.info)
        r.add_route("*", "/{tail:.*}", unknown)


def main() -> None:
    parser = emulator_parser((__doc__ or "").split("\n\n")[0], DaytonaFaults)
    parser.add_argument("--isolation", default="auto", help="local backend isolation: auto, bwrap or process")
    parser.add_argument("--max-live", type=int, default=0, help="refuse creation beyond N live sandboxes (quota)")
    parser.add_argument(
        "--minute-s", type=float, default=60.0, help="seconds in an auto-stop minute (short: watch orphans die)"
    )
    serve_main(DaytonaEmulator, parser.parse_args())


if __name__ == "__main__":
    main()
