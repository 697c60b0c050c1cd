"""Running one command in a Daytona sandbox: an async session command with its logs followed.

Layer: backend. Imports: the standard library, core (``errors``, ``retry``) and this package's
``errors``. The SDK objects arrive as arguments.

Each command gets its own session (sessions run one command at a time; a fresh one also makes
"did my command start?" answerable after a lost response: it did if the session has a command).
Its output is followed over the log WebSocket. A dropped stream is reconnected: the daemon replays
the log from the start, and what was already delivered is skipped. The exit code comes from the
command record; -1 there means the daemon lost the command (an infrastructure failure, never
retried: a user command is not re-run behind the caller's back).

The script runs under ``bash -c`` in the working directory, records its pid (so that a timeout can
kill its whole tree even where deleting the session would only kill the session's shell), exports
the environment and evaluates the user's command.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from metaflow_extensions.sandbox.core import SandboxError, SandboxUnavailable, TransientError
from metaflow_extensions.sandbox.core.retry import create_with_reconcile

from .errors import call, is_conflict

PID_DIR = "/tmp/.metaflow-sandbox"
# Kills the recorded process and its descendants: the whole tree is listed first, then killed root
# first (a parent killed last could still react to its children dying). The cmdline check makes
# sure a recycled pid (or, on an emulator, another pid namespace) never takes down an unrelated one.
_KILL = (
    'tree() {{ echo "$1"; for c in $(awk -v p="$1" \'$4 == p {{print $1}}\' /proc/[0-9]*/stat 2>/dev/null); '
    'do tree "$c"; done; }}; '
    'p=$(cat {pidfile} 2>/dev/null) && tr "\\0" " " < /proc/$p/cmdline 2>/dev/null | grep -q {key} '
    '&& kill -KILL $(tree "$p") 2>/dev/null; '
    "rm -f {pidfile}"
)
_MAX_RECONNECTS = 20


def wrap(command: str, env: Mapping[str, str], workdir: str | None, key: str) -> str:
    """The session command that runs ``command`` the way ``Sandbox.run`` promises."""
    pidfile = f"{PID_DIR}/{key}.pid"
    lines = [f"mkdir -p {PID_DIR} && echo $$ > {pidfile}", f"trap 'rm -f {pidfile}' EXIT"]
    if workdir:
        lines.append(f"cd {shlex.quote(workdir)} || exit 1")
    lines += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    # eval in a fresh line keeps the user's own syntax errors the user's (exit 2, message on stderr).
    lines.append(f"eval {shlex.quote(command)}")
    return f"bash -c {shlex.quote(chr(10).join(lines))}"


def kill_script(key: str) -> str:
    return _KILL.format(pidfile=f"{PID_DIR}/{key}.pid", key=key)


class Delivered:
    """Chars already handed to the caller per stream, so a replayed log is not delivered twice."""

    def __init__(self, on_stdout: Callable[[str], None], on_stderr: Callable[[str], None], stop: threading.Event):
        self.sinks = {"out": on_stdout, "err": on_stderr}
        self.count = {"out": 0, "err": 0}
        self.stop = stop
        self.lock = threading.Lock()

    def total(self) -> int:
        return self.count["out"] + self.count["err"]

    def connection(self) -> tuple[Callable[[str], None], Callable[[str], None]]:
        """Callbacks for one (re)connection of the log stream, which starts at the log's beginning."""
        seen = {"out": 0, "err": 0}

        def make(kind: str) -> Callable[[str], None]:
            def deliver(text: str) -> None:
                with self.lock:
                    if self.stop.is_set():
                        return
                    start = seen[kind]
                    seen[kind] += len(text)
                    fresh = text[max(0, self.count[kind] - start) :]
                    if fresh:
                        self.count[kind] += len(fresh)
                        self.sinks[kind](fresh)

            return deliver

        return make("out"), make("err")


class SessionCommand:
    """One command's run; ``start`` it, then ``wait`` (or ``kill`` it)."""

    def __init__(self, sandbox: Any, sdk: Any, sandbox_id: str, check_alive: Callable[[], None]):
        self.sandbox = sandbox
        self.sdk = sdk
        self.sandbox_id = sandbox_id
        self.check_alive = check_alive
        self.key = f"mfsbx-{uuid.uuid4().hex[:16]}"
        self.session = self.key
        self.cmd_id: str | None = None
        self.stop = threading.Event()
        self.done = threading.Event()
        self.exit_code: int | None = None
        self.failure: BaseException | None = None
        self.delivered: Delivered | None = None
        self.caught_up = False  # the output was completed from the plain logs (a stalled stream)

    def _call(self, what: str, fn: Callable[[], Any], retry: bool = True) -> Any:
        return call(what, fn, retry=retry, sandbox_id=self.sandbox_id)

    def start(self, script: str) -> None:
        process = self.sandbox.process

        def create_session() -> None:
            try:
                process.create_session(self.session)
            except Exception as e:
                if not is_conflict(e):  # a retry after a lost answer: the session exists
                    raise

        self._call("creating a session", create_session)
        request = self.sdk.SessionExecuteRequest(command=script, run_async=True)

        def started() -> str | None:
            # Never start the command twice: the session is ours alone, so a command in it is ours.
            commands = self._call("checking the session", lambda: process.get_session(self.session).commands)
            return str(commands[0].id) if commands else None

        self.cmd_id = create_with_reconcile(
            lambda: str(self._call("starting a command", lambda: process.execute_session_command(
                self.session, request).cmd_id, retry=False)),
            started, attempts=6, base_s=0.25,
        )  # fmt: skip

    def follow(self, on_stdout: Callable[[str], None], on_stderr: Callable[[str], None]) -> None:
        """Deliver output and set ``exit_code`` (or ``failure``); runs in its own thread."""
        delivered = self.delivered = Delivered(on_stdout, on_stderr, self.stop)
        process = self.sandbox.process
        failures = 0
        try:
            while not self.stop.is_set():
                before = delivered.total()
                out, err = delivered.connection()
                stream_error: BaseException | None = None
                try:
                    asyncio.run(process.get_session_command_logs_async(self.session, self.cmd_id, out, err))
                except Exception as e:
                    stream_error = e
                if self.stop.is_set():
                    return
                if stream_error is not None:
                    # Dropped or closed with an error: gone sandbox → SandboxUnavailable; else reconnect
                    # (even when the command has ended: the rest of its output is still to come).
                    self.check_alive()
                elif self._finished():
                    return
                failures = 0 if delivered.total() > before else failures + 1
                if failures > _MAX_RECONNECTS:
                    raise TransientError(
                        f"Daytona: the log stream of a command in sandbox {self.sandbox_id} keeps failing "
                        f"({stream_error}).",
                        sandbox_id=self.sandbox_id,
                    )
                time.sleep(min(2.0, 0.05 * 2**failures))
        except BaseException as e:
            self.failure = e
        finally:
            self.done.set()

    def _finished(self) -> bool:
        """After a clean end of the stream: record the exit code, if the daemon has it yet."""
        process = self.sandbox.process
        try:
            record = self._call(
                "reading the command's state", lambda: process.get_session_command(self.session, self.cmd_id)
            )
        except TransientError:
            raise
        except SandboxError:
            self.check_alive()  # raises SandboxUnavailable when the sandbox is gone
            raise
        if record.exit_code is None:
            return False
        self.exit_code = int(record.exit_code)
        return True

    def check(self, grace_s: float = 2.0) -> bool:
        """Called periodically while waiting: has the command ended although its stream is silent?

        A log WebSocket can stall without closing (a proxy or keepalive drop); the command record
        still tells the truth. Raises ``SandboxUnavailable`` when the sandbox is gone.
        """
        process = self.sandbox.process
        try:
            record = self._call(
                "reading the command's state", lambda: process.get_session_command(self.session, self.cmd_id)
            )
        except SandboxError:
            self.check_alive()
            return False  # a passing problem: the stream or the next check will tell
        if record.exit_code is None or self.done.wait(grace_s):
            return self.done.is_set()
        # Ended, yet the stream is silent: stop following and take the rest from the plain logs.
        self.stop.set()
        logs = self._call(
            "reading the command's logs", lambda: process.get_session_command_logs(self.session, self.cmd_id)
        )
        delivered = self.delivered
        if delivered is not None:
            with delivered.lock:
                for kind, text in (("out", logs.stdout or ""), ("err", logs.stderr or "")):
                    fresh = text[delivered.count[kind] :]
                    if fresh:
                        delivered.count[kind] += len(fresh)
                        delivered.sinks[kind](fresh)
        self.exit_code, self.caught_up = int(record.exit_code), True
        return True

    def result(self) -> int:
        if self.caught_up and self.exit_code is not None and self.exit_code >= 0:
            return self.exit_code
        if self.failure is not None:
            raise self.failure
        code = self.exit_code
        if code is None or code < 0:
            raise SandboxUnavailable(
                f"Daytona lost the command in sandbox {self.sandbox_id} (exit code {code}): the sandbox "
                "stopped or its daemon restarted. The command is not re-run automatically.",
                sandbox_id=self.sandbox_id,
            )
        return code

    def kill(self) -> None:
        """Best effort: kill the command's process tree, then drop its session."""
        self.stop.set()
        process = self.sandbox.process
        # The sandbox may be gone already; deleting the session below still applies.
        with contextlib.suppress(SandboxError):
            self._call("killing a command", lambda: process.exec(kill_script(self.key), timeout=30))
        self.delete_session()

    def delete_session(self) -> None:
        # Sessions die with their sandbox; a leftover one holds no resources of note.
        with contextlib.suppress(SandboxError):
            self._call("deleting a session", lambda: self.sandbox.process.delete_session(self.session))
