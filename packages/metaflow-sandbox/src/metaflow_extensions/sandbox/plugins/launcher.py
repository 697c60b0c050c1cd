"""``python -m metaflow_extensions.sandbox.plugins.launcher REQUEST``: the launcher of one sandboxed task.

Layer: plugins (the process the runtime starts instead of ``flow.py step``, see ``launch``).
Imports: the core API, ``plugins.executor`` and the standard library — never metaflow.

Why not ``flow.py sandbox step`` (as ``@batch`` has ``flow.py batch step``): that process imports
Metaflow and the flow, parses the whole CLI and initialises every decorator, ~0.3-0.6 s that each
sandboxed task would pay on top of its own ``flow.py step`` in the sandbox. The runtime, which has
all of that loaded already, writes everything the task needs into a ``TaskRequest`` file; this
process only creates the sandbox, stages, runs, merges and destroys. A unit test checks that
importing it loads no Metaflow.

SIGINT and SIGTERM destroy the live sandbox before the launcher exits, so Ctrl-C leaves nothing
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


def _install_signal_handlers() -> None:
    def handler(signum: int, _frame: Any) -> None:
        # Once: a second signal (the parent-death signal and the runtime watcher both send one)
        # would re-enter a destroy holding its lock in this very thread, and deadlock.
        for other in (signal.SIGINT, signal.SIGTERM):
            signal.signal(other, signal.SIG_IGN)
        destroy_all_live()
        # Unwind (saving the captured logs on the way) and exit like a killed process.
        raise SystemExit(128 + signum)

    # Python keeps an inherited "ignore" for SIGINT (no KeyboardInterrupt then): respect it.
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str]) -> int:
    # The runtime appends the options it gives every task after ours (``--local-config-file``
    # from 2.13): the task does not need them, it reads its configuration from the code package.
    if not argv:
        say("usage: python -m metaflow_extensions.sandbox.plugins.launcher REQUEST (started by Metaflow's runtime)")
        return 2
    _install_signal_handlers()
    try:
        req = TaskRequest.load(argv[0])
    finally:
        # Written for this process only (it may hold @sandbox(env=...) values): read once, then gone.
        Path(argv[0]).unlink(missing_ok=True)
    kills.die_with_runtime(req.runtime, lambda: os.kill(os.getpid(), signal.SIGTERM))
    if req.retry_delay_s:
        minutes = req.retry_delay_s / 60
        say(f"Sleeping {minutes:g} minutes before the next sandbox retry (@retry minutes_between_retries).")
        time.sleep(req.retry_delay_s)
    return execute(req)


def run_and_exit(argv: list[str]) -> None:
    """``main``, then end the process at once with its exit code: every sandbox is destroyed and
    the logs saved by then, and a non-daemon thread (or an executor's worker) still blocked on a
    provider's stream would otherwise keep the interpreter from exiting, and the run waiting."""
    try:
        code = main(argv)
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
    os._exit(code)


if __name__ == "__main__":
    run_and_exit(sys.argv[1:])
