"""Running one command in an E2B sandbox with every wait bounded.

Layer: e2b backend. Imports: the standard library and core; the ``e2b`` SDK lazily (through the
sandbox handle and ``errors.sdk``).

The SDK's command stream has no read timeout (a sandbox that vanishes can leave ``wait`` blocked
forever), so the stream is consumed on a worker thread that only forwards events into a queue.
The caller's thread delivers output to the callbacks and, every ``check_interval_s``, pushes the
sandbox's deadline forward (``set_timeout``: a long step must never hit the lifetime) and checks
that the process is still listed by envd. A process that is gone while its stream never delivered
an exit code is a stalled stream, reported after one more interval instead of waited on.
"""

from __future__ import annotations

import contextlib
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from metaflow_extensions.sandbox.core import CommandTimeout, SandboxError, SandboxUnavailable

from .errors import translate
from .sdk import sdk

# Go's names for signals, as envd reports a killed process ("signal: killed", exit code -1).
_GO_SIGNALS = {
    "hangup": 1,
    "interrupt": 2,
    "quit": 3,
    "illegal instruction": 4,
    "trace/breakpoint trap": 5,
    "aborted": 6,
    "bus error": 7,
    "floating point exception": 8,
    "killed": 9,
    "user defined signal 1": 10,
    "segmentation fault": 11,
    "user defined signal 2": 12,
    "broken pipe": 13,
    "alarm clock": 14,
    "terminated": 15,
}


def exit_status(code: int | None, error: str | None) -> int:
    """A shell-style exit status: envd's -1 for a process killed by signal N becomes 128 + N."""
    if code is not None and code >= 0:
        return code
    match = re.search(r"signal: ([a-z /0-9]+)", error or "")
    if match and match.group(1).strip() in _GO_SIGNALS:
        return 128 + _GO_SIGNALS[match.group(1).strip()]
    return 255


def _bounded(call: Callable[[], Any], seconds: float) -> None:
    """Run ``call`` but wait at most ``seconds`` for it (a stream call may block forever)."""

    def guarded() -> None:
        with contextlib.suppress(Exception):
            call()

    worker = threading.Thread(target=guarded, daemon=True)
    worker.start()
    worker.join(seconds)


@dataclass(frozen=True)
class CommandSettings:
    """The backend's settings a command run needs."""

    workdir: str
    check_interval_s: float
    request_timeout_s: float


class CommandHost(Protocol):
    """What a command run asks of its sandbox (``E2BSandbox`` provides it): its id and SDK handle,
    whether it was destroyed or is still alive, its running processes, and its lease."""

    id: str
    sdk: Any

    @property
    def destroyed(self) -> bool: ...

    def is_alive(self) -> bool: ...

    def running_pids(self) -> set[int]: ...

    def keep_alive(self) -> None: ...

    def refresh_every(self) -> float: ...


class CommandRun:
    """One ``_run`` of ``E2BSandbox``; see the module docstring."""

    def __init__(
        self,
        sandbox: CommandHost,
        settings: CommandSettings,
        command: str,
        *,
        env: Mapping[str, str],
        timeout_s: float | None,
        on_stdout: Callable[[str], None],
        on_stderr: Callable[[str], None],
    ):
        self.sbx = sandbox
        self.settings = settings
        self.command = command
        self.env = dict(env)
        self.timeout_s = timeout_s
        self.on_stdout, self.on_stderr = on_stdout, on_stderr
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.handle: Any = None
        self.gone_since: float | None = None  # when envd first stopped listing the process
        self.failed_checks = 0

    # -- the worker thread: talks to the SDK, never to the callbacks ------------------------------

    def _consume(self) -> None:
        exit_error = sdk().CommandExitException
        options = self.settings
        try:
            handle = self.sbx.sdk.commands.run(
                self.command,
                background=True,
                envs=self.env,
                cwd=options.workdir,
                # No SDK kill at 60 s: 0 unless the caller set a timeout, then a backstop past ours.
                # Whole seconds: SDKs before 2.35 send the float as is and envd accepts integers only.
                timeout=0 if self.timeout_s is None else math.ceil(self.timeout_s + options.check_interval_s) + 30,
            )
            self.events.put(("pid", handle))
            try:
                result = handle.wait(
                    on_stdout=lambda text: self.events.put(("out", text)),
                    on_stderr=lambda text: self.events.put(("err", text)),
                )
                self.events.put(("exit", result.exit_code, result.error))
            except exit_error as e:
                self.events.put(("exit", e.exit_code, e.error))
        except BaseException as e:
            self.events.put(("error", e))

    # -- the caller's thread ---------------------------------------------------------------------

    def run(self) -> int:
        options = self.settings
        threading.Thread(target=self._consume, name=f"e2b-run-{self.sbx.id}", daemon=True).start()
        now = time.monotonic()
        deadline = None if self.timeout_s is None else now + self.timeout_s
        start_deadline = now + options.request_timeout_s
        last_check = now
        while True:
            now = time.monotonic()
            # Recomputed each time: the granted lifetime may be learned while the command runs.
            next_check = last_check + min(options.check_interval_s, self.sbx.refresh_every())
            waits = [0.5, next_check - now] + ([deadline - now] if deadline is not None else [])
            try:
                event = self.events.get(timeout=max(0.0, min(waits)))
            except queue.Empty:
                event = None
            if event is not None:
                code = self._deliver(event)
                if code is not None:
                    return code
            # Checked after every event too: a command that floods output must still be kept alive.
            now = time.monotonic()
            if self.handle is None and now >= start_deadline:
                raise SandboxUnavailable(
                    f"Sandbox {self.sbx.id} did not start the command within {options.request_timeout_s:.0f} s.",
                    sandbox_id=self.sbx.id,
                )
            if deadline is not None and now >= deadline:
                self._kill()
                raise CommandTimeout(
                    f"Command timed out after {self.timeout_s} s in sandbox {self.sbx.id}; its processes were killed.",
                    timeout_s=self.timeout_s or 0.0,
                    sandbox_id=self.sbx.id,
                )
            if now >= next_check:
                self._check()
                last_check = time.monotonic()

    def _deliver(self, event: tuple[Any, ...]) -> int | None:
        kind = event[0]
        if kind == "pid":
            self.handle = event[1]
        elif kind == "out":
            self.on_stdout(event[1])
        elif kind == "err":
            self.on_stderr(event[1])
        elif kind == "exit":
            return exit_status(event[1], event[2])
        else:
            raise self._failure(event[1])
        return None

    def _failure(self, error: BaseException) -> SandboxError:
        """Why the stream ended without an exit code: a dead sandbox, or the error itself."""
        if self.sbx.destroyed or not self.sbx.is_alive():
            return SandboxUnavailable(
                f"Sandbox {self.sbx.id} died, expired or was destroyed while the command ran ({error!r}).",
                sandbox_id=self.sbx.id,
            )
        if self.handle is None:
            return translate(error, "starting a command", sandbox_id=self.sbx.id, envd=True)
        return SandboxUnavailable(
            f"Lost the output stream of the command in sandbox {self.sbx.id} ({error!r}); its result is unknown.",
            sandbox_id=self.sbx.id,
        )

    def _check(self) -> None:
        """Keep the sandbox alive and make sure the stream is not silently stuck."""
        sid = self.sbx.id
        try:
            self.sbx.keep_alive()
            running = self.sbx.running_pids() if self.handle is not None else None
            self.failed_checks = 0
        except SandboxUnavailable:
            raise
        except SandboxError as e:
            # One lost check is a hiccup; three in a row is an unreachable sandbox.
            self.failed_checks += 1
            if self.failed_checks >= 3:
                raise SandboxUnavailable(f"Sandbox {sid} stopped answering: {e}", sandbox_id=sid) from e
            return
        if running is None or self.handle.pid in running:
            self.gone_since = None
            return
        now = time.monotonic()
        if self.gone_since is None:
            self.gone_since = now
        elif now - self.gone_since >= 1.0:
            # Two checks apart the process is gone, yet its stream delivered no exit code.
            with contextlib.suppress(Exception):
                self.handle.disconnect()
            raise SandboxUnavailable(
                f"The output stream of the command in sandbox {sid} stalled: the process ended but E2B never "
                "delivered its exit code.",
                sandbox_id=sid,
            )

    def _kill(self) -> None:
        """Kill the process and its whole group; the timeout must leave nothing running."""
        if self.handle is None:
            return
        pid = self.handle.pid
        commands = self.sbx.sdk.commands
        # The process group first (background children share it), then the process by pid.
        _bounded(lambda: commands.run(f"kill -9 -- -{pid} 2>/dev/null; true", timeout=10), 15)
        with contextlib.suppress(Exception):
            commands.kill(pid, request_timeout=10)
        with contextlib.suppress(Exception):
            self.handle.disconnect()
