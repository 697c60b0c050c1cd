"""The in-sandbox half of the E2B emulator: one emulated sandbox and its envd daemon's behaviour.

Layer: tests-shared (emulators). Imports: the standard library and ``metaflow_extensions.sandbox.core``.

Each emulated sandbox is a core ``local`` sandbox under bubblewrap, so it has its own root and never
sees the launcher's files. On top of it this module emulates what envd does: processes with
numeric pids started as ``/bin/bash -l -c CMD``, output published as raw chunks, a kill by pid
(``SendSignal``), reconnection to a running process, and the files API (``/home/user`` is the
default user's home and the base of relative paths, as on E2B).
"""

from __future__ import annotations

import contextlib
import shlex
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaflow_extensions.sandbox.core import (
    CommandTimeout,
    SandboxError,
    SandboxFileNotFound,
    SandboxSpec,
    SandboxUnavailable,
)

HOME = "/home/user"
# The emulator's private corner of each sandbox (the local backend's working directory).
PRIVATE = "/home/sandbox/.envd"


def resolve(path: str) -> str:
    """envd resolves relative paths against the user's home."""
    return path if path.startswith("/") else f"{HOME}/{path}"


# Event kinds a process publishes to its subscribers (open Start/Connect streams).
DATA, END, DEADLINE, DEAD = "data", "end", "deadline", "dead"


Event = tuple[Any, ...]
Sink = Callable[[Event], None]


@dataclass
class Process:
    pid: int
    config: dict[str, Any]
    tag: str
    stall: bool = False
    # Where events go: each open Start/Connect stream's sink (called from the process's thread).
    sinks: list[Sink] = field(default_factory=list)
    finished: Event | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    cancel: threading.Event = field(default_factory=threading.Event)  # set: SendSignal kills it

    def subscribe(self, sink: Sink) -> None:
        """``sink`` sees every later event; after the end, just the final one."""
        with self.lock:
            if self.finished is not None:
                sink(self.finished)
            else:
                self.sinks.append(sink)

    def unsubscribe(self, sink: Sink) -> None:
        with self.lock, contextlib.suppress(ValueError):
            self.sinks.remove(sink)

    def publish(self, event: Event) -> None:
        with self.lock:
            if event[0] != DATA:
                self.finished = event
            for sink in self.sinks:
                sink(event)


def _wrapper(argv: list[str], cwd: str) -> str:
    """The script the local sandbox runs for one envd process.

    ``bash -l`` would source the host's login profile (the sandbox's /etc is the host's, read
    only): ``--noprofile`` keeps the login shell but not the host's PATH rewriting.
    """
    if argv and argv[0].endswith("bash") and "-l" in argv[1:]:
        argv = [argv[0], "--noprofile", *argv[1:]]
    return f"cd {shlex.quote(cwd)} || exit 1\n{shlex.join(argv)}\n"


class EmulatedSandbox:
    """One E2B sandbox: identity and lifetime (control plane) plus its processes and files (envd)."""

    def __init__(
        self,
        local_backend: Any,
        sandbox_id: str,
        *,
        template: str,
        metadata: Mapping[str, str],
        env_vars: Mapping[str, str],
        network: bool,
        timeout_s: float,
        access_token: str,
    ):
        self.id = sandbox_id
        self.template = template
        self.metadata = dict(metadata)
        self.env_vars = dict(env_vars)
        self.network = network
        self.access_token = access_token
        self.started_at = time.time()
        self.deadline = self.started_at + timeout_s
        self.alive = True
        self._lock = threading.Lock()
        self._next_pid = 400
        self.processes: dict[int, Process] = {}
        self.local = local_backend.create(SandboxSpec(network=network, lifetime_s=7 * 24 * 3600))
        res = self.local.run(f"mkdir -p {HOME} {PRIVATE}")
        if res.exit_code != 0:
            self.local.destroy()
            raise RuntimeError(f"cannot prepare the emulated sandbox: {res.stderr}")

    # -- lifecycle -------------------------------------------------------------------------------

    def set_timeout(self, timeout_s: float) -> None:
        self.deadline = time.time() + timeout_s

    def kill(self) -> None:
        """The sandbox is gone: its processes die and their open streams drop."""
        with self._lock:
            if not self.alive:
                return
            self.alive = False
        with contextlib.suppress(SandboxError):
            self.local.destroy()
        for proc in list(self.processes.values()):
            proc.publish((DEAD,))

    # -- processes -------------------------------------------------------------------------------

    def start(
        self, config: Mapping[str, Any], tag: str, timeout_s: float | None, *, stall: bool, sink: Sink
    ) -> Process:
        """Start a process whose every event, from the first, goes to ``sink``."""
        with self._lock:
            self._next_pid += 1
            pid = self._next_pid
        proc = Process(pid=pid, config=dict(config), tag=tag, stall=stall)
        self.processes[pid] = proc
        argv = [str(config.get("cmd") or "/bin/bash"), *(str(a) for a in config.get("args") or [])]
        env = {"HOME": HOME, "USER": "user", **self.env_vars, **dict(config.get("envs") or {})}
        script = _wrapper(argv, resolve(str(config.get("cwd") or HOME)))

        def run() -> None:
            try:
                # Raw chunks as they arrive, as envd forwards them (not lines).
                code = self.local.run(
                    script,
                    env=env,
                    timeout_s=timeout_s or None,
                    on_output=lambda stream, text: proc.publish((DATA, stream, text.encode())),
                    cancel=proc.cancel,
                ).exit_code
            except CommandTimeout:
                proc.publish((DEADLINE,))
            except SandboxUnavailable:
                proc.publish((DEAD,))
            except BaseException as e:  # keep the emulator serving; the client sees an internal error
                proc.publish((END, -1, f"emulator error: {e}"))
            else:
                # Killed because the sandbox died (``alive`` drops before its processes are killed):
                # the stream breaks, it does not end with an exit code.
                proc.publish((END, code, f"exit status {code}") if self.alive else (DEAD,))
            finally:
                self.processes.pop(pid, None)

        proc.subscribe(sink)
        threading.Thread(target=run, name=f"envd-{self.id}-{pid}", daemon=True).start()
        return proc

    def signal(self, pid: int) -> bool:
        """SIGKILL (or SIGTERM, treated alike) a running process; False when there is no such pid."""
        proc = self.processes.get(pid)
        if proc is None:
            return False
        proc.cancel.set()
        return True

    # -- files -----------------------------------------------------------------------------------

    def write_file(self, src: Path, path: str) -> str:
        target = resolve(path)
        self.local.upload(src, target)
        return target

    def read_file(self, path: str, dst: Path) -> None:
        """Copy ``path`` to ``dst``; raises ``SandboxFileNotFound``."""
        self.local.download(resolve(path), dst)


__all__ = [
    "DATA",
    "DEAD",
    "DEADLINE",
    "END",
    "HOME",
    "EmulatedSandbox",
    "Event",
    "Process",
    "SandboxFileNotFound",
    "Sink",
    "resolve",
]
