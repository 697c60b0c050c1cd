"""A real metadata service peer for tests: ``metaflow-local-service`` (PyPI) on loopback.

Layer: tests-shared. Imports: the standard library; ``metaflow_local_service``, ``uvicorn`` and
``starlette`` only in the server process (``python -m sandbox_testing.metadata_service``).

The server runs in an environment of its own (``MFSBX_METADATA_SERVICE_PYTHON``), as a deployed
service would: it needs a newer Metaflow than the oldest one the flows are tested with. It is the
package's own FastAPI app (``metaflow_local_service.server.create_app``, what its
daemon serves), run with uvicorn like the daemon does, plus one thing the daemon lacks: a request
journal (method, path, the ``x-api-key`` header) written line by line to a file. The service keeps
heartbeats only in memory and logs no requests, so the journal is how a test sees that every task's
heartbeat reached the service, and with which auth header.

Known gap of the peer (see research/remote.md): it does not list artifacts whose names start with
``_``, so ``Run.successful`` reads False even for a plain run; tests compare with a plain run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .emulators import free_port, stop

READY_S = 60
# The interpreter of the service's own environment (the nox session makes one); default: this one.
PYTHON_ENV = "MFSBX_METADATA_SERVICE_PYTHON"
API_KEY = "mfsbx-service-key-never-in-a-sandbox"


@dataclass(frozen=True)
class MetadataService:
    url: str
    journal: Path

    def env(self, *, auth: bool = True) -> dict[str, str]:
        """What a Metaflow user sets to use this service (with an auth key unless ``auth`` is False)."""
        env = {"METAFLOW_DEFAULT_METADATA": "service", "METAFLOW_SERVICE_URL": self.url}
        if auth:
            env["METAFLOW_SERVICE_AUTH_KEY"] = API_KEY
        return env

    def requests(self) -> list[dict[str, str]]:
        """Every request the service answered so far: ``{"method", "path", "api_key"}``."""
        if not self.journal.exists():
            return []
        return [json.loads(line) for line in self.journal.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def start_metadata_service(root: Path) -> Iterator[MetadataService]:
    """Run the service on a free loopback port, persisting under ``root``, until the block ends."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    journal = root / "requests.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    tests_shared = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests_shared, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [os.environ.get(PYTHON_ENV) or sys.executable, "-m", "sandbox_testing.metadata_service", "--port", str(port),
         "--metaflow-root", str(root), "--journal", str(journal)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + READY_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"metaflow-local-service did not start on {url} (exit {proc.poll()})") from None
                time.sleep(0.2)
        yield MetadataService(url, journal)
    finally:
        stop(proc)


def _serve(port: int, metaflow_root: str, journal: str) -> None:
    import uvicorn
    from metaflow_local_service import server

    app = server.create_app(metaflow_root)

    @app.middleware("http")
    async def record(request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        entry = {"method": request.method, "path": request.url.path, "api_key": request.headers.get("x-api-key")}
        with open(journal, "a", encoding="utf-8") as out:
            out.write(json.dumps(entry) + "\n")
        return response

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--metaflow-root", required=True)
    parser.add_argument("--journal", required=True)
    args = parser.parse_args()
    _serve(args.port, args.metaflow_root, args.journal)
