"""Start a wire emulator from ``tests-shared/emulators/`` as a subprocess, for tests and tools.

Layer: tests-shared. Imports: the standard library.

An emulator is started as ``python <script> --port PORT [args]`` and prints
``READY http://127.0.0.1:PORT`` once it accepts connections.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

EMULATORS = Path(__file__).resolve().parent.parent / "emulators"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def start_emulator(name: str, *args: str, env: Mapping[str, str] | None = None, ready_s: float = 60) -> Iterator[str]:
    """Run ``emulators/<name>_emulator.py`` until the block ends; yields its base URL."""
    script = EMULATORS / f"{name}_emulator.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", str(free_port()), *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    found: list[str] = []

    def wait_ready() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("READY "):
                found.append(line.split()[1])
                return

    reader = threading.Thread(target=wait_ready, daemon=True)
    reader.start()
    reader.join(ready_s)
    try:
        if not found:
            raise RuntimeError(f"{script.name} did not print READY within {ready_s} s (exit code {proc.poll()}).")
        # Keep draining stdout so the emulator never blocks on a full pipe.
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield found[0]
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """Terminate a helper server, killing it if it does not exit within 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def emulator_state(url: str) -> dict[str, int]:
    """``GET /_emulator/state``: ``{"live": n, "created": n, "destroyed": n}``."""
    with urllib.request.urlopen(f"{url}/_emulator/state", timeout=10) as answer:
        return dict(json.load(answer))


def set_faults(url: str, **faults: Any) -> dict[str, Any]:
    """``POST /_emulator/faults``, e.g. ``set_faults(url, rate_503=0.2)`` or ``set_faults(url, die_next=1)``."""
    request = urllib.request.Request(
        f"{url}/_emulator/faults", data=json.dumps(faults).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return dict(json.load(answer))
