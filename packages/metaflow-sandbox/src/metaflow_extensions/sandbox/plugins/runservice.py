"""``python -m metaflow_extensions.sandbox.plugins.runservice SOCKET``: the sandbox service of one
runtime and one (backend, options), started by the first ``launcher`` that needs it.

Layer: plugins (a process of its own; runs ``attempt`` in a process forked per attempt). Imports:
``plugins.attempt``, ``plugins.executor``, ``plugins.kills`` and the standard library — never
metaflow.

It makes the backend once (the provider's SDK imported, its options resolved: ``executor.
prepare_backend``), then listens on a Unix socket in a folder only this user can enter. Each
launcher connects, passes its request file's path and its stdout and stderr (``SCM_RIGHTS``), and
the service forks a process for that attempt, which inherits the prepared backend and runs
``attempt.run`` exactly as a launcher would in its own process: the same signal handling, live
lines straight into the runtime's pipes, the same exit code, sent back to the launcher.

Why fork rather than threads: an attempt owns process-wide things (signal handlers, its standard
streams, ``destroy_all_live`` at exit, ``os._exit`` once its outcome is known), and a provider
client may hold threads and connections; a fork of a process that has not yet used the network
keeps each attempt exactly what it was, minus the start-up. The service itself stays one thread
(forking a multi-threaded process is unsafe), and never connects to the provider itself.

Lifetime: the service ends when its runtime does (``kills.alive``, checked every second), after
signalling the attempts it started; each attempt also watches the runtime, ends when its launcher's
connection closes (the launcher died: the sandbox is destroyed), and when the service dies (the
parent-death signal ``kills.die_with_runtime`` arms), so nothing outlives the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

from . import attempt, kills
from .executor import EXIT_INFRA_RETRYABLE, prepare_backend
from .logs import say

SETTLE_S = 60.0  # how long the backend's own start-up threads (an SDK import) may take to finish
ACCEPT_TIMEOUT_S = 10.0  # a connection that sends no request within this is dropped


def _settle_threads() -> None:
    """Wait for the threads preparing the backend started (Daytona imports its SDK in one): the
    service forks, and must hold no other thread when it does."""
    deadline = time.monotonic() + SETTLE_S
    for thread in threading.enumerate():
        if thread is not threading.main_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


def _attempt(conn: socket.socket, hello: dict[str, Any], fds: list[int], service: int) -> None:
    """In the forked process: become the task's launcher for this attempt, then exit."""
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in fds:
        os.close(fd)
    finished = threading.Event()
    forwarded: list[int] = []

    def listen() -> None:
        """A byte from the launcher is a signal it received; end of stream: the launcher is gone."""
        while True:
            try:
                data = conn.recv(1)
            except OSError:
                data = b""
            if finished.is_set():
                return
            signum = data[0] if data else signal.SIGTERM
            forwarded.append(signum)
            os.kill(os.getpid(), signum)
            if not data:
                return

    conn.sendall(f"started {os.getpid()}\n".encode())
    threading.Thread(target=listen, daemon=True, name="launcher-watch").start()
    code = attempt.run(hello["request"], bool(hello["sigint_ignored"]))
    finished.set()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.getppid() != service and not forwarded:
        say(
            "The run's sandbox service ended while this task ran: its sandbox was destroyed. "
            "This may be transient: use @retry to retry."
        )
        code = EXIT_INFRA_RETRYABLE
    with contextlib.suppress(OSError):
        conn.sendall(f"exit {code}\n".encode())
    os._exit(code)


def serve(listener: socket.socket, runtime: str) -> None:
    """Fork an attempt per connection until the runtime is gone."""
    service = os.getpid()
    children: set[int] = set()
    while kills.alive(runtime):
        for pid in list(children):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    children.discard(pid)
        if not select.select([listener], [], [], kills.WATCH_INTERVAL_S)[0]:
            continue
        conn, _ = listener.accept()
        try:
            conn.settimeout(ACCEPT_TIMEOUT_S)
            message, fds, _, _ = socket.recv_fds(conn, 65536, 2)
            hello = json.loads(message)
            conn.settimeout(None)
        except (OSError, ValueError):
            conn.close()
            continue
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:
            listener.close()
            try:
                _attempt(conn, hello, fds, service)
            finally:
                os._exit(EXIT_INFRA_RETRYABLE)  # _attempt exits itself; this is for a bug in it
        children.add(pid)
        for fd in fds:
            os.close(fd)
        conn.close()
    for pid in children:  # they watch the runtime too; this only makes it sooner
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def main(path: str) -> int:
    try:
        config = json.loads(sys.stdin.read())
        runtime = str(config["runtime"])
        prepare_backend(config["backend"], config["backend_options"] or {})
        _settle_threads()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a dead service's (the launcher holds the start lock)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(128)
    except Exception:
        traceback.print_exc()
        return 1
    sys.stdout.buffer.write(b"READY\n")
    sys.stdout.flush()
    # The launcher that started us reads no more: the standard streams go nowhere from now on.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    try:
        serve(listener, runtime)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
