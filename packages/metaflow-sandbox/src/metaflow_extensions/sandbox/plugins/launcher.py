"""``python -m metaflow_extensions.sandbox.plugins.launcher REQUEST``: the launcher of one sandboxed task.

Layer: plugins (the process the runtime starts instead of ``flow.py step``, see ``reroute``).
Imports: ``plugins.kills`` and the standard library — never metaflow, nor (on the service path)
core or a provider SDK: this process only relays.

Why not ``flow.py sandbox step`` (as ``@batch`` has ``flow.py batch step``): that process imports
Metaflow and the flow, parses the whole CLI and initialises every decorator, ~0.3-0.6 s that each
sandboxed task would pay on top of its own ``flow.py step`` in the sandbox. The runtime, which has
all of that loaded already, writes everything the task needs into a ``TaskRequest`` file.

Why a service (``runservice``) for the provider backends: importing a provider's SDK and setting up
its client took 0.9-1.8 s of every task. One service per runtime and (backend, options) does that
once and forks a process per attempt (``attempt``), which inherits the prepared backend. This
launcher hands that process its request file and its own stdout and stderr (the runtime's pipes,
passed over the socket), so the task's lines reach the runtime exactly as before; it forwards
SIGINT and SIGTERM, and ends with the attempt's exit code. When this launcher dies, the attempt
sees its connection close and destroys its sandbox. A service that cannot be started or does not
answer fails the task retryably (exit 1), naming the cause; it never hangs it.

The ``local`` backend runs the attempt in this process (``IN_PROCESS``): its start-up is core
only, which a fork saves little of, and its sandboxes are processes of this one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from . import kills

SERVICE = "metaflow_extensions.sandbox.plugins.runservice"
IN_PROCESS = frozenset({"local"})
START_TIMEOUT_S = 120.0  # importing a provider's SDK on a loaded machine
ANSWER_TIMEOUT_S = 30.0  # a service that does not start an attempt within this is wedged
READY = b"READY\n"
EXIT_INFRA_RETRYABLE = 1  # executor.EXIT_INFRA_RETRYABLE (not imported: it loads core)
# After forwarding a signal, how long the attempt may take to destroy its sandbox and answer.
FORWARD_GRACE_S = 60.0
MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 107 bytes


class ServiceError(Exception):
    """The run's sandbox service could not be started or reached."""


def say(message: str) -> None:
    """As ``logs.say`` (not imported: it loads core)."""
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()


def socket_path(runtime: str, backend: str, options: Any) -> str:
    """The service's socket for ``runtime`` and (``backend``, ``options``), in a folder only this user
    can enter. Named after the runtime's pid: what a dead runtime's service left is swept."""
    folder = kills.private_dir(os.path.join(tempfile.gettempdir(), f"metaflow-sandbox-service-{os.getuid()}"))
    made = os.lstat(folder)
    # Another user may have made it first in a shared /tmp: never hand our streams to their socket.
    if made.st_uid != os.getuid() or made.st_mode & 0o077 or not os.path.isdir(folder) or os.path.islink(folder):
        raise ServiceError(f"{folder} is not a folder private to this user: remove it, or set TMPDIR elsewhere")
    key = hashlib.sha256(json.dumps([runtime, backend, options], sort_keys=True, default=str).encode()).hexdigest()
    return os.path.join(folder, f"{runtime.partition(':')[0]}-{key[:20]}.sock")


def _connect(path: str) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None
    return conn


def _start(path: str, config: dict[str, Any]) -> None:
    """Start the service for ``path`` and wait until it listens. Its configuration goes on stdin
    (never on a command line); it answers ``READY`` or why it could not start."""
    service = subprocess.Popen(
        [sys.executable, "-m", SERVICE, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # not in the runtime's process group: Ctrl-C reaches it through us
    )
    assert service.stdin is not None and service.stdout is not None
    with service.stdin:
        service.stdin.write(json.dumps(config).encode())
    said = b""
    deadline = time.monotonic() + START_TIMEOUT_S
    with selectors.DefaultSelector() as waiting, service.stdout:
        waiting.register(service.stdout, selectors.EVENT_READ)
        while not said.endswith(READY):
            left = deadline - time.monotonic()
            if left <= 0 or not waiting.select(left):
                service.kill()
                raise ServiceError(f"the run's sandbox service did not start within {START_TIMEOUT_S:g} s")
            chunk = os.read(service.stdout.fileno(), 65536)
            if not chunk:
                detail = said.decode(errors="replace").strip()[-2000:]
                raise ServiceError(f"the run's sandbox service failed to start: {detail or 'no output'}")
            said += chunk


def connect(request: dict[str, Any]) -> socket.socket:
    """A connection to the service of this task's runtime and backend, started if there is none."""
    config = {k: request.get(k) for k in ("runtime", "backend", "backend_options")}
    path = socket_path(request["runtime"], request["backend"], request["backend_options"])
    if len(path) > MAX_SOCKET_PATH:
        raise ServiceError(f"the service's socket path {path} is too long for a Unix socket: set a shorter TMPDIR")
    conn = _connect(path)
    if conn is not None:
        return conn
    # One launcher starts it; the others of the same moment wait on the lock, then connect.
    fd = os.open(f"{path[: -len('.sock')]}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        conn = _connect(path)
        if conn is None:
            _start(path, config)
            conn = _connect(path)
    finally:
        os.close(fd)
    if conn is None:
        raise ServiceError("the run's sandbox service started but does not accept connections")
    return conn


def relay(conn: socket.socket, request_file: str, runtime: str) -> int:
    """Have the service run the attempt with our stdout and stderr; forward signals; its exit code."""
    sigint_ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    hello = json.dumps({"request": os.path.abspath(request_file), "sigint_ignored": sigint_ignored})
    conn.settimeout(ANSWER_TIMEOUT_S)
    answers = conn.makefile("rb")
    try:
        socket.send_fds(conn, [hello.encode()], [sys.stdout.fileno(), sys.stderr.fileno()])
        started = answers.readline()
    except TimeoutError as e:
        raise ServiceError(f"the run's sandbox service did not answer within {ANSWER_TIMEOUT_S:g} s") from e
    except OSError:
        started = b""  # it went away meanwhile
    if not started.startswith(b"started "):
        raise ServiceError("the run's sandbox service closed the connection before starting the task")
    conn.settimeout(None)
    forwarded: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        if forwarded:
            return
        forwarded.append(signum)
        with contextlib.suppress(OSError):
            conn.sendall(bytes([signum]))
        # The attempt destroys its sandbox, then answers; if it cannot, end anyway.
        timer = threading.Timer(FORWARD_GRACE_S, os._exit, args=(128 + signum,))
        timer.daemon = True
        timer.start()

    if not sigint_ignored:
        signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    kills.die_with_runtime(runtime, lambda: os.kill(os.getpid(), signal.SIGTERM))
    ended = answers.readline()
    if not ended.startswith(b"exit "):
        if forwarded:
            return 128 + forwarded[0]
        say(
            "The process of the run's sandbox service running this task ended without its outcome; its "
            "sandbox is destroyed with it. This may be transient: use @retry to retry."
        )
        return EXIT_INFRA_RETRYABLE
    return int(ended.split()[1])


def main(argv: list[str]) -> int:
    # The runtime appends the options it gives every task after ours (``--local-config-file``
    # from 2.13): the task does not need them, it reads its configuration from the code package.
    if not argv:
        say("usage: python -m metaflow_extensions.sandbox.plugins.launcher REQUEST (started by Metaflow's runtime)")
        return 2
    request_file = argv[0]
    try:
        request = json.loads(Path(request_file).read_text(encoding="utf-8"))
        runtime, backend = request["runtime"], request["backend"]
    except (OSError, ValueError, KeyError, TypeError):
        request, runtime, backend = {}, "", ""
    # Without the runtime's identity (a launcher started by hand, or off Linux) nothing would end a
    # service with the run: the attempt runs here.
    if backend in IN_PROCESS or not runtime:
        # Imported here: only this path loads core and the executor into the launcher.
        from .attempt import run_and_exit

        run_and_exit(request_file)  # does not return
    try:
        return relay(connect(request), request_file, runtime)
    except ServiceError as e:
        Path(request_file).unlink(missing_ok=True)  # it may hold @sandbox(env=...) values
        say(f"Could not run the task: {e}. This may be transient: use @retry to retry.")
        return EXIT_INFRA_RETRYABLE


if __name__ == "__main__":
    code = 1
    try:
        code = main(sys.argv[1:])
    except Exception:  # a bug or a broken pipe to a vanished runtime: still end now
        with contextlib.suppress(OSError, ValueError):
            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # the runtime (the pipe's reader) may be gone
                stream.flush()
        os._exit(code)
