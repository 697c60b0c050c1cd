"""What a sandboxed task records about its sandbox: labels on the sandbox, metadata on the task.

Layer: plugins (bottom: used by the decorator, the CLI and the executor). Imports: metaflow,
``plugins.compat``.

Labels let ``flow.py sandbox list|kill`` find sandboxes again (flow, run, step, task, attempt,
user); the sandbox id and backend become task metadata (visible as ``Task.metadata_dict``), so a
finished task says where it ran.
"""

from __future__ import annotations

import os
import re
from typing import Any

from .compat import metadatum

SANDBOX_ID_ENV = "METAFLOW_SANDBOX_ID"
TASK_BACKEND_ENV = "METAFLOW_SANDBOX_BACKEND_NAME"
"""Set in the sandbox: the backend the task runs on (``METAFLOW_SANDBOX_BACKEND`` is the user's choice)."""
LABEL_PREFIX = "metaflow-"
# Providers restrict label values; keep a portable subset (letters, digits, - _ .), <= 63 chars.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def label_value(value: Any) -> str:
    return _UNSAFE.sub("_", str(value))[:63]


def task_labels(flow: str, run_id: str, step: str, task_id: str, *, attempt: int, user: str) -> dict[str, str]:
    """The labels every sandbox of a task carries."""
    fields = {"flow": flow, "run": run_id, "step": step, "task": task_id, "attempt": attempt, "user": user}
    return {f"{LABEL_PREFIX}{key}": label_value(value) for key, value in fields.items()}


def selector(flow: str, run_id: str | None = None, user: str | None = None) -> dict[str, str]:
    """Labels that select the sandboxes of a flow, optionally of one run and one user."""
    wanted = {"flow": flow, "run": run_id, "user": user}
    return {f"{LABEL_PREFIX}{k}": label_value(v) for k, v in wanted.items() if v is not None}


def sandbox_env(sandbox_id: str, backend: str) -> dict[str, str]:
    """Environment the launcher sets in the sandbox so the task can record where it ran."""
    return {SANDBOX_ID_ENV: sandbox_id, TASK_BACKEND_ENV: backend}


def register_sandbox_metadata(metadata: Any, run_id: str, step: str, task_id: str, attempt: int) -> None:
    """Record the sandbox id and backend as metadata of this attempt (called inside the sandbox)."""
    tags = [f"attempt_id:{attempt}"]
    entries = [
        metadatum("sandbox-id", os.environ[SANDBOX_ID_ENV], "sandbox-id", tags),
        metadatum("sandbox-backend", os.environ.get(TASK_BACKEND_ENV, "unknown"), "sandbox-backend", tags),
    ]
    metadata.register_metadata(run_id, step, task_id, entries)
