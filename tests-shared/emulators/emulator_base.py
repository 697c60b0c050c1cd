"""What every HTTP wire emulator shares: the command line, the test hooks, faults, serving.

Layer: tests-shared (emulators). Imports: the standard library, ``aiohttp``, ``emulator_faults``
(next to this file) and ``metaflow_extensions.sandbox.core`` (the local backend runs every
emulated sandbox).

An emulator (Daytona, E2B) subclasses ``BaseEmulator`` with its routes, its error body, its
authentication and its per-sandbox teardown, and its ``main`` is ``serve_main(...)``. The base owns:

- the command line: ``--port PORT`` plus one flag per fault of the emulator's ``Faults`` class;
- the start-up contract of ``sandbox_testing.emulators``: ``READY http://127.0.0.1:PORT`` on stdout
  once the port accepts connections; SIGTERM (what fixtures send) removes every sandbox left;
- the test hooks ``GET /_emulator/state`` (``{"live", "created", "destroyed"}``) and
  ``POST /_emulator/faults`` (a JSON object with the keys of the emulator's ``Faults``);
- the middleware that applies latency, authentication and the 429/503 refusals, in that order;
- the core ``local`` backend whose sandboxes stand for the emulated ones, under a private root
  removed on exit, and the table of live sandboxes with its counters.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import tempfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from aiohttp import web
from emulator_faults import Faults

from metaflow_extensions.sandbox.core import get_backend

S = TypeVar("S")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BaseEmulator(Generic[S]):
    """One emulated provider: its sandboxes (each backed by a core local sandbox) and its faults."""

    name = "emulator"  # prefixes the private root's name
    # What the service answers when a fault refuses a request, by status.
    refusals = {429: "Too Many Requests (emulated)", 503: "Service Unavailable (emulated)"}

    def __init__(self, args: argparse.Namespace, faults: Faults, *, isolation: str = "bwrap"):
        self.faults = faults
        self.base = f"http://127.0.0.1:{args.port}"
        self.root = Path(tempfile.mkdtemp(prefix=f"{self.name}-emulator-"))
        self.local = get_backend("local", isolation=isolation, root=self.root)
        self.sandboxes: dict[str, S] = {}
        self.lock = threading.Lock()
        self.created = self.destroyed = 0

    # -- what each emulator provides -------------------------------------------------------------

    def error(self, status: int, message: str) -> web.Response:
        """The service's error body."""
        raise NotImplementedError

    def add_routes(self, router: web.UrlDispatcher) -> None:
        raise NotImplementedError

    def discard(self, sbx: S) -> None:
        """Tear down a sandbox just taken out of the table (its processes, its local sandbox)."""
        raise NotImplementedError

    def exempt(self, request: web.Request) -> web.Response | bool:
        """True: serve without authentication or refusals; a response: answer it at once."""
        return False

    def unauthorized(self, request: web.Request) -> web.Response | None:
        """The 401 answer to a request with bad credentials, or None."""
        return None

    def background(self) -> list[Callable[[], Awaitable[None]]]:
        """Housekeeping loops (expiry, auto-stop) run while serving."""
        return []

    # -- the sandbox table -----------------------------------------------------------------------

    def find(self, sandbox_id: str) -> S | None:
        with self.lock:
            return self.sandboxes.get(sandbox_id)

    def missing(self, sandbox_id: str) -> web.Response:
        """The control plane's answer about a sandbox it does not know."""
        return self.error(404, f"sandbox {sandbox_id} not found")

    def for_sandbox(self, handler: Callable[[web.Request, S], Awaitable[web.StreamResponse]]) -> Handler:
        """A route about the sandbox named by its ``{id}``: ``handler(request, sandbox)``, or ``missing``."""

        async def route(request: web.Request) -> web.StreamResponse:
            sbx = self.find(request.match_info["id"])
            return self.missing(request.match_info["id"]) if sbx is None else await handler(request, sbx)

        return route

    def add(self, sandbox_id: str, sbx: S) -> None:
        with self.lock:
            self.sandboxes[sandbox_id] = sbx
            self.created += 1

    def remove(self, sandbox_id: str) -> bool:
        """Take a sandbox out and tear it down; False when there is no such sandbox."""
        with self.lock:
            sbx = self.sandboxes.pop(sandbox_id, None)
            if sbx is not None:
                self.destroyed += 1
        if sbx is None:
            return False
        self.discard(sbx)
        return True

    def state(self) -> dict[str, int]:
        with self.lock:
            return {"live": len(self.sandboxes), "created": self.created, "destroyed": self.destroyed}

    # -- HTTP ------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=1 << 40)
        app["emu"] = self  # what module-level handlers reach the emulator by
        app.router.add_get("/_emulator/state", self._admin_state)
        app.router.add_post("/_emulator/faults", self._admin_faults)
        self.add_routes(app.router)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/_emulator/"):
            return await handler(request)
        if self.faults.latency_ms:
            await asyncio.sleep(self.faults.latency_ms / 1000)
        exempt = self.exempt(request)
        if isinstance(exempt, web.Response):
            return exempt
        if exempt:
            return await handler(request)
        answer = self.unauthorized(request)
        refusal = None if answer is not None else self.faults.refusal()
        if refusal is not None:
            answer = self.error(refusal, self.refusals[refusal])
        if answer is not None:
            await request.read()  # the client sent its body; read it so the connection stays usable
            return answer
        return await handler(request)

    async def _admin_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def _admin_faults(self, request: web.Request) -> web.Response:
        problem = self.faults.update(await request.json() if request.can_read_body else {})
        if problem:
            return self.error(400, problem)
        return web.json_response(self.faults.as_dict())

    async def serve(self, port: int) -> None:
        """Serve until SIGTERM or SIGINT, then remove every sandbox still held."""
        runner = web.AppRunner(self.app(), handle_signals=False, access_log=None, shutdown_timeout=1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"READY {self.base}", flush=True)
        tasks = [asyncio.create_task(job()) for job in self.background()]
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            for sandbox_id in list(self.sandboxes):
                await asyncio.to_thread(self.remove, sandbox_id)
            await runner.cleanup()
            shutil.rmtree(self.root, ignore_errors=True)


def parser(description: str, faults: type[Faults]) -> argparse.ArgumentParser:
    """The command line every emulator accepts: ``--port`` and the fault flags."""
    found = argparse.ArgumentParser(description=description)
    found.add_argument("--port", type=int, required=True)
    faults.add_flags(found)
    return found


def serve_main(make: Callable[[argparse.Namespace], BaseEmulator[Any]], args: argparse.Namespace) -> None:
    """Build the emulator from its parsed command line and serve it on ``--port``."""

    async def run() -> None:
        await make(args).serve(args.port)

    asyncio.run(run())
