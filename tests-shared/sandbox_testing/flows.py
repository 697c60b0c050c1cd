"""Running e2e flows: a directory with copies of the flows, run as subprocesses, inspected
through the Client API (``inspect_run.py``), and helpers to interrupt them.

Layer: tests-shared. Imports: pytest, the standard library.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .signals import ctrl_c_default

RUN_TIMEOUT_S = 600


def task(run: dict, step: str, index: int = 0) -> dict:
    return run["steps"][step][index]


def run_id_of(output: str) -> str:
    match = re.search(r"run-id (\S+?)\)?:", output)
    assert match, output
    return match.group(1)


@dataclass
class FlowDir:
    """A directory with copies of the e2e flows, and helpers to run and inspect them."""

    path: Path
    env: dict[str, str]
    backend: str
    sandbox_root: Path
    outputs: list[str] = field(default_factory=list)

    def command(self, flow: str, *args: str) -> list[str]:
        if flow == "inspect_run.py":
            return [sys.executable, flow, *args]
        return [sys.executable, "-u", flow, "--no-pylint", *args]

    def run(
        self, flow: str, *args: str, ok: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``flow.py *args``; ``ok`` says whether it must succeed (else it must fail)."""
        proc = subprocess.run(
            self.command(flow, *args),
            cwd=self.path,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )
        # Kept for the failure report (the tail: that is where errors are).
        self.outputs.append(f"$ {flow} {' '.join(args)}\n{(proc.stdout + proc.stderr)[-20000:]}")
        if (proc.returncode == 0) != ok:
            pytest.fail(f"exit code {proc.returncode}:\n{proc.stdout}\n{proc.stderr}\n{self.saved_logs()}")
        return proc

    def saved_logs(self) -> str:
        """Every log file in the datastore (task and runtime, all attempts): what a failure report
        needs when the console lost a line."""
        logs = sorted(self.path.glob(".metaflow/*/*/*/*/*.log"))
        return "\n".join(f"--- {p.relative_to(self.path)}\n{p.read_text(errors='replace')[-5000:]}" for p in logs)

    def start(self, flow: str, *args: str) -> subprocess.Popen[str]:
        """Start ``flow.py *args`` in its own process group (so it can be sent Ctrl-C)."""
        return subprocess.Popen(
            self.command(flow, *args),
            cwd=self.path,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            # No thread runs in the test process while it forks a flow: the hook is safe here.
            preexec_fn=ctrl_c_default,  # noqa: PLW1509
        )

    def inspect(self, flow_class: str, run_id: str | None = None) -> dict:
        """The run as the Client API sees it (see inspect_run.py)."""
        proc = self.run("inspect_run.py", flow_class, *([run_id] if run_id else []))
        return json.loads(proc.stdout.splitlines()[-1])

    def live_sandboxes(self, flow: str) -> list[str]:
        """Sandboxes still alive. For ``local`` the sandbox directories themselves are counted,
        since ``list`` would reap those whose owner died and hide a leak."""
        if self.backend == "local":
            return sorted(p.name for p in self.sandbox_root.glob("sbx-*"))
        # Metaflow's echo writes to stderr; each sandbox is one "<backend>:<id>  ..." line.
        proc = self.run(flow, "sandbox", "list")
        return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith(f"{self.backend}:")]


def wait_for_line(proc: subprocess.Popen[str], needle: str, lines: list[str], limit_s: float = 300) -> None:
    """Read ``proc``'s output until a line contains ``needle`` (kept in ``lines``)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + limit_s
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            return
        if time.monotonic() > deadline:
            break
    proc.kill()
    pytest.fail(f"never saw {needle!r}:\n{''.join(lines)}")


def interrupt(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C: SIGINT to the whole process group, as a terminal does."""
    os.killpg(proc.pid, signal.SIGINT)
