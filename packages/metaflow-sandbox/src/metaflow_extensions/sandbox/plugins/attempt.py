"""One attempt of one sandboxed task, in the process that owns it: signal handling, the ``@retry``
delay, ``executor.execute`` and an immediate exit with the task's code.

Layer: plugins (run by ``launcher`` in its own process for the in-process backends, and by
``runservice`` in a process forked per attempt for the others). Imports: the core API,
``plugins.executor``, ``plugins.kills`` and the standard library — never metaflow.

SIGINT and SIGTERM destroy the live sandbox before the process exits, so Ctrl-C leaves nothing
running; SIGINT only when the launcher did not inherit it ignored (a run started in the
background by a script: its plain tasks ignore Ctrl-C, so its sandboxed ones do too). When the
runtime vanishes (SIGTERM or SIGKILL of ``flow.py run``), ``kills.die_with_runtime`` turns that
into the same SIGTERM. Once the task's outcome is known the process ends at once
(``os._exit``): a thread still blocked on a provider's silent stream must not keep it alive.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from metaflow_extensions.sandbox.core import destroy_all_live

from . import kills
from .executor import execute
from .logs import say
from .request import TaskRequest


def _install_signal_handlers(sigint_ignored: bool) -> None:
    def handler(signum: int, _frame: Any) -> None:
        # Once: a second signal (the parent-death signal and the runtime watcher both send one)
        # would re-enter a destroy holding its lock in this very thread, and deadlock.
        for other in (signal.SIGINT, signal.SIGTERM):
            signal.signal(other, signal.SIG_IGN)
        destroy_all_live()
        # Unwind (saving the captured logs on the way) and exit like a killed process.
        raise SystemExit(128 + signum)

    # Python keeps an inherited "ignore" for SIGINT (no KeyboardInterrupt then): respect it.
    if not sigint_ignored:
        signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def main(request_file: str, sigint_ignored: bool) -> int:
    _install_signal_handlers(sigint_ignored)
    try:
        req = TaskRequest.load(request_file)
    finally:
        # Written for this process only (it may hold @sandbox(env=...) values): read once, then gone.
        Path(request_file).unlink(missing_ok=True)
    kills.die_with_runtime(req.runtime, lambda: os.kill(os.getpid(), signal.SIGTERM))
    if req.retry_delay_s:
        minutes = req.retry_delay_s / 60
        say(f"Sleeping {minutes:g} minutes before the next sandbox retry (@retry minutes_between_retries).")
        time.sleep(req.retry_delay_s)
    return execute(req)


def run(request_file: str, sigint_ignored: bool) -> int:
    """``main``, then everything that must happen before the process ends, whatever happened: every
    sandbox destroyed, the output flushed. Returns the exit code for ``os._exit``."""
    try:
        code = main(request_file, sigint_ignored)
    except SystemExit as e:  # a signal handler's
        code = e.code if isinstance(e.code, int) else 1
    except Exception:  # a bug or a broken pipe to a vanished runtime: still end now
        with contextlib.suppress(OSError, ValueError):
            traceback.print_exc()
        code = 1
    destroy_all_live()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # the runtime (the pipe's reader) may be gone
            stream.flush()
    return code


def run_and_exit(request_file: str) -> None:
    """``run`` in this process, then end it at once with its exit code: a non-daemon thread (or an
    executor's worker) still blocked on a provider's stream would otherwise keep the interpreter
    from exiting, and the run waiting."""
    os._exit(run(request_file, signal.getsignal(signal.SIGINT) is signal.SIG_IGN))
