"""``python -I -S supervisor.py PARENT_PID ARGV...``: runs one command of a process-mode sandbox so that nothing
it starts outlives it.

Layer: core/local (a standalone script the local backend puts in front of every command when
bubblewrap is not used). Imports: the standard library only, and nothing of this package: it
runs with ``-I -S`` to start in ~15 ms.

Without bubblewrap there is no pid namespace whose end takes every process with it, and a
process group is not enough: a daemon (``setsid nohup sleep 300 &``) leaves the group, and once
its parent exits it is re-parented to init, out of reach of a walk down the process tree. This
supervisor makes itself a *child subreaper* (``PR_SET_CHILD_SUBREAPER``): every orphan below it is
re-parented to it instead of init. When the command exits, it kills whatever is left below it
and reaps it, then exits as the command did (same code, or the same signal). It also dies with its
parent (``PR_SET_PDEATHSIG``), taking the command's processes with it, so a launcher killed with
SIGKILL leaves nothing running.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _children() -> list[int]:
    """Processes whose parent is this one (orphans of the command included, once re-parented)."""
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as stat:
                # The command name may hold spaces and parentheses: fields start after the last ')'.
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me:
            found.append(int(name))
    return found


def _kill_everything_below() -> None:
    """SIGKILL every process below this one and reap it; a killed process's own children are
    re-parented here, so repeat until none is left."""
    while True:
        for pid in _children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def main(argv: list[str]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.stderr.write(f"supervisor: cannot become a subreaper: {os.strerror(ctypes.get_errno())}\n")
        return 125
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    parent, argv = int(argv[0]), argv[1:]
    if os.getppid() != parent:
        return 125  # the launcher died before the line above: nothing to run for

    def end(signum: int, _frame: object) -> None:
        _kill_everything_below()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, end)
    pid = os.fork()
    if pid == 0:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        try:
            os.execvp(argv[0], argv)
        except OSError as e:
            sys.stderr.write(f"{argv[0]}: {e.strerror}\n")
        os._exit(127)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    _kill_everything_below()
    if os.WIFSIGNALED(status):
        # End the same way, so the caller sees the signal (SIGKILL and SIGSTOP need no reset).
        if os.WTERMSIG(status) not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
