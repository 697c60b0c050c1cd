"""Run one process with streamed output, a deadline, and no survivors.

Layer: core/local. Imports: the standard library and core (``errors``, ``backend``).

Every command starts in a new session (its own process group). When it exits, times out or its
sandbox is destroyed, the whole group and every descendant still running are killed, so a
command's background children never outlive it.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from ..backend import ByteDecoder

# After the main process exits, how long to keep reading pipes that a stray descendant may hold.
_DRAIN_S = 2.0
_READ_SIZE = 1 << 16


def _descendants(root_pid: int) -> list[int]:
    """PIDs below ``root_pid``, read from /proc (children that called setsid() included)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root_pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` and every descendant of ``pid``."""
    victims = _descendants(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for victim in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(victim, signal.SIGKILL)


class Stopped(Exception):
    """The process was killed because its deadline passed."""


def stream_process(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    on_stdout: Callable[[str], None] | None,
    on_stderr: Callable[[str], None],
    stdin: IO[bytes] | None = None,
    stdout_file: IO[bytes] | None = None,
    timeout_s: float | None = None,
    on_start: Callable[[subprocess.Popen[bytes]], None] = lambda p: None,
) -> int:
    """Run ``argv``; feed decoded output to the callbacks (or raw stdout to ``stdout_file``).

    Returns the exit code (negative for a signal, as ``subprocess`` does). Raises ``Stopped`` after
    killing the process tree when ``timeout_s`` passes.
    """
    proc = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=dict(env),
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=stdout_file or (subprocess.PIPE if on_stdout else subprocess.DEVNULL),
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    on_start(proc)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    selector = selectors.DefaultSelector()
    decoders: dict[int, ByteDecoder] = {}
    for pipe, sink in ((proc.stdout, on_stdout), (proc.stderr, on_stderr)):
        if pipe is not None and sink is not None:
            selector.register(pipe, selectors.EVENT_READ)
            decoders[pipe.fileno()] = ByteDecoder(sink)
    timed_out = False
    drain_until: float | None = None
    try:
        while selector.get_map():
            now = time.monotonic()
            if deadline is not None and now >= deadline and not timed_out:
                timed_out = True
                kill_tree(proc.pid)
            if drain_until is None and proc.poll() is not None:
                # The command is done: whatever still holds the pipes is a stray; end it.
                kill_tree(proc.pid)
                drain_until = now + _DRAIN_S
            if drain_until is not None and now >= drain_until:
                break
            wait = 0.2 if deadline is None or timed_out else max(0.0, min(0.2, deadline - now))
            for key, _ in selector.select(wait):
                data = os.read(key.fd, _READ_SIZE)
                if data:
                    decoders[key.fd].feed(data)
                else:
                    selector.unregister(key.fileobj)
        for decoder in decoders.values():
            decoder.close()
        code = proc.wait()
        kill_tree(proc.pid)
    except BaseException:
        # KeyboardInterrupt included: never leave the command running behind us.
        kill_tree(proc.pid)
        proc.wait()
        raise
    finally:
        selector.close()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    if timed_out:
        raise Stopped
    return code
