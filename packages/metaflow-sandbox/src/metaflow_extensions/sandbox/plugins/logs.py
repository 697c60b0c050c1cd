"""The launcher's output: the task's lines as Metaflow structured log lines (echoed live and kept
for the datastore) and the launcher's own messages.

Layer: plugins (used by ``executor``). Imports: ``plugins.task_script`` (the markers its lines
carry), ``plugins.staging``, ``plugins.direct``, ``plugins.relay`` and the standard library — never
metaflow itself (``direct`` and ``relay`` load it lazily for a remote datastore).

The task's output is captured here, on the launcher side, in mflog format: each line is echoed
live as a structured line (the runtime shows it with the task prefix and does not persist it
twice) and saved as the attempt's ``task`` logs when the task ends, even when the sandbox died.
This costs nothing inside the sandbox (no tee or save_logs processes) and is the same on every
backend.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timezone

from . import direct, relay, staging
from .request import TaskRequest
from .task_script import CODE_DIR, MARK, SETUP_FAILED


def mflog_line(line: str, source: str = "task") -> bytes:
    """``line`` as a Metaflow structured log line: ``[MFLOG|0|<UTC time>Z|<source>|<id>]<line>``,
    the format of ``metaflow.mflog.decorate`` (version 0, unchanged since Metaflow 2.0). Written
    here so the launcher does not import Metaflow; a unit test parses it with Metaflow's parser."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return f"[MFLOG|0|{now}Z|{source}|{uuid.uuid4()}]".encode() + line.encode("utf-8", errors="replace")


class TaskLogs:
    """Echo the task's lines live as mflog lines and keep them for the datastore.

    ``flow_dir``: the flow's directory on this machine. A traceback line naming a file of the
    unpacked code in the sandbox (``/home/sandbox/code/flow.py``) names the user's own file instead,
    when that file exists here (the code package holds the flow's directory as it is)."""

    def __init__(self, flow_dir: str = "") -> None:
        self.lines: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self.setup_error: str | None = None
        self.marks: list[tuple[str, int]] = []
        self.flow_dir = flow_dir
        self._code_file: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    def _local_path(self, match: re.Match[str]) -> str:
        path = os.path.join(self.flow_dir, match.group(2))
        return f'{match.group(1)}{path}"' if os.path.isfile(path) else match.group(0)

    def sink(self, stream: str) -> Callable[[str], None]:
        out = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer

        def write(line: str) -> None:
            if stream == "stderr" and line.startswith(SETUP_FAILED):
                self.setup_error = line[len(SETUP_FAILED) :].strip()
                return
            if stream == "stderr" and line.startswith(MARK):
                _, name, ns = line.split()
                self.marks.append((name, int(ns)))
                return
            if stream == "stderr" and line.startswith(CODE_DIR):
                code_dir = line[len(CODE_DIR) :].strip()
                if self.flow_dir and code_dir:
                    self._code_file = re.compile(r'(File ")' + re.escape(code_dir.rstrip("/")) + r'/([^"]+)"')
                return
            if self._code_file is not None and 'File "' in line:
                line = self._code_file.sub(self._local_path, line)
            record = mflog_line(line)
            with self._lock:
                self.lines[stream].append(record)
                out.write(record + b"\n")
                out.flush()

        return write

    def blobs(self) -> dict[str, bytes]:
        return {stream: b"".join(line + b"\n" for line in lines) for stream, lines in self.lines.items()}


def say(message: str) -> None:
    """A launcher message: plain text, so the runtime persists it in the attempt's runtime log."""
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()


def save_task_logs(req: TaskRequest, logs: dict[str, bytes]) -> None:
    """Where ``flow.py logs`` reads them: the local datastore, or the remote one on the direct path."""
    if req.datastore == "local":
        staging.save_task_logs(req.location, req.attempt, logs)
        return
    # On the relay path ``location`` is the task's mirror: the logs go to the remote datastore.
    loc = relay.remote_location(req) if relay.is_remote_relay(req) else req.location
    try:
        direct.save_task_logs(req.datastore, loc, req.attempt, logs)
    except direct.DirectError as e:
        say(str(e))
