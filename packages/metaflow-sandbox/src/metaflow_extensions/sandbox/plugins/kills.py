"""How a launcher ends when it is not told by its task: its runtime vanished, or a user destroyed
its sandbox with ``flow.py sandbox kill``.

Layer: plugins (bottom: used by ``launcher``, ``executor`` and ``sandbox_cli``). Imports: the
standard library only — the launcher loads it, and the launcher never imports metaflow.

*The runtime vanished.* ``flow.py run`` killed with SIGTERM (its default action: Metaflow has no
handler) or SIGKILL never tells its tasks. The runtime starts each launcher itself
(``subprocess.Popen`` of the rerouted command line, no shell in between, 2.12 to 2.19), so the
launcher asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``) and also watches
the runtime's pid from the ``TaskRequest`` (the parent-death signal follows the parent *thread*,
and a wrapper process could sit in between). Either way the launcher's SIGTERM handler destroys
the sandbox and exits.

*A deliberate kill.* ``sandbox kill`` leaves a mark per sandbox (a file in a directory only this
user can read) before destroying it; a launcher whose sandbox vanishes under its task looks for
the mark and ends the attempt as killed (no ``@retry``) instead of as an infrastructure failure.
Marks are per machine: a kill from another machine is seen as the sandbox dying.

*What a dead process left.* Request files, scratch directories and service sockets live in
folders only this user can enter (``private_dir``), named after the process they belong to, so
that what a process killed with SIGKILL left is swept by the next one.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1
WATCH_INTERVAL_S = 1.0
# After asking the main thread to end (SIGTERM), how long before the watcher ends the process itself.
EXIT_GRACE_S = 20.0
MARK_TTL_S = 24 * 3600


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a live process from a reused pid), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_identity(pid: int) -> str:
    """``pid:start`` of a live process (what ``TaskRequest.runtime`` holds), or ``""`` off Linux."""
    start = _start_time(pid)
    return f"{pid}:{start}" if start is not None else ""


def alive(identity: str) -> bool:
    """Whether the process ``identity`` names still runs (an empty identity: assume so)."""
    if not identity:
        return True
    pid, _, start = identity.partition(":")
    return _start_time(int(pid)) == start


def die_with_runtime(identity: str, on_gone: Callable[[], None]) -> None:
    """Call ``on_gone`` once when the runtime ``identity`` names is gone; and SIGTERM on parent death.

    ``on_gone`` runs in a daemon thread; if the process is still running ``EXIT_GRACE_S`` after,
    the thread ends it (``os._exit``): a launcher without its runtime must never linger.
    """
    with contextlib.suppress(OSError, AttributeError):  # Linux only; elsewhere the watcher suffices
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if not identity:
        return

    def watch() -> None:
        while alive(identity):
            time.sleep(WATCH_INTERVAL_S)
        on_gone()
        time.sleep(EXIT_GRACE_S)
        os._exit(128 + signal.SIGTERM)

    if not alive(identity):  # gone before the parent-death signal was armed
        on_gone()
    threading.Thread(target=watch, daemon=True, name="runtime-watch").start()


def _marks_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"metaflow-sandbox-kills-{os.getuid()}"


def _mark(backend: str, sandbox_id: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{backend}-{sandbox_id}")
    return _marks_dir() / safe


def mark_killed(backend: str, sandbox_id: str) -> None:
    """Record that this user is destroying ``sandbox_id`` on purpose (called before destroying it)."""
    folder = _marks_dir()
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid():
        return  # not ours (another user made it first): the kill is then seen as a failure
    now = time.time()
    for old in folder.iterdir():  # marks no launcher consumed (its task had ended already)
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > MARK_TTL_S:
                old.unlink()
    _mark(backend, sandbox_id).touch()


def was_killed(backend: str, sandbox_id: str) -> bool:
    """Whether ``sandbox kill`` destroyed ``sandbox_id`` (the mark is consumed). Only marks in a
    directory of this user count: another user must not turn a failure into a non-retried one."""
    try:
        if _marks_dir().stat().st_uid != os.getuid():
            return False
        _mark(backend, sandbox_id).unlink()
    except OSError:
        return False
    return True


def private_dir(folder: str) -> str:
    """``folder``, made private to this user, without what dead processes left in it."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    sweep_dead_owners(folder)
    return folder


@functools.cache  # once per process and folder
def sweep_dead_owners(folder: str) -> None:
    """Remove the entries ``<pid>-...`` of ``folder`` whose process is gone."""
    for name in os.listdir(folder):
        owner = name.split("-", 1)[0]
        if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)
