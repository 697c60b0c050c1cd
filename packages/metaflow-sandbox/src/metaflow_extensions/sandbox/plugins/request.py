"""The request contract between the two processes of a sandboxed task: the ``TaskRequest`` the
runtime writes (``reroute``) and the launcher reads, and the private files it travels in.

Layer: plugins (bottom: used by ``reroute`` in the runtime and by ``launcher``/``executor``).
Imports: the core API (``Resources``), ``plugins.staging`` and the standard library — never
metaflow, which the launcher process does not load.

The request may hold ``@sandbox(env=...)`` values and credentials: it never travels on a command
line, only as a file this user alone can read, deleted by the launcher once read. The launcher's
scratch directories live in a private folder the same way, and are swept the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from metaflow_extensions.sandbox.core import Resources

from . import staging
from .kills import private_dir


@dataclass(frozen=True)
class TaskRequest:
    """Everything needed to run one task attempt in a sandbox (built by ``reroute`` in the runtime)."""

    backend: str
    backend_options: Mapping[str, Any]
    step_command: str  # the real ``python flow.py ... step ...``, run from the unpacked code
    location: staging.TaskLocation
    input_paths: list[str]
    extract_commands: list[str]
    extract_env: Mapping[str, str]
    env: Mapping[str, str]
    labels: Mapping[str, str]
    hard_limit_s: int
    attempt: int = 0
    package: str = ""  # the code package file as Metaflow made it (used when code_tar is None)
    code_tar: str | None = None  # the package's files as a plain tar (staging.code_archive), if it is a tarball
    code_dir: str = ""  # or as a directory the backend mounts read-only as `code` (staging.code_directory)
    image: str | None = None
    resources: Resources = field(default_factory=Resources)
    network: bool = True
    extra_inputs: list[str] = field(default_factory=list)
    retry_delay_s: int = 0  # @retry(minutes_between_retries) before this attempt
    data_path: str = "relay"  # "direct": the task reads and writes the remote datastore itself
    datastore: str = "local"
    # Relay path on a remote datastore: ``location`` is the task's local mirror, these the remote
    # datastore's and card store's roots where the launcher pushes the outputs (``relay``).
    remote_root: str = ""
    remote_card_root: str = ""
    # Credentials: uploaded as a file the script sources (never in a command, a label or a log).
    secret_env: Mapping[str, str] = field(default_factory=dict)
    metadata_root: str = ""  # direct path with local metadata: the launcher's `.metaflow` to copy it to
    flow_dir: str = ""  # the flow's directory on the launcher's machine: tracebacks name its files
    # Warnings the runtime showed once for the whole run (``preflight``): the launcher stays quiet.
    shown_warnings: list[str] = field(default_factory=list)
    runtime: str = ""  # "pid:start" of the runtime (kills.process_identity): the launcher ends with it
    # Metadata service on the relay path: the launcher heartbeats and replays (headers are secrets).
    service_url: str = ""
    service_headers: Mapping[str, str] = field(default_factory=dict)
    # An environment the bootstrap builds in the code directory (``environments``): its type
    # (``uv``) and its entry in the code cache, reused by the run's later tasks.
    environment: str = ""
    environment_cache: str = ""

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as out:
            json.dump(dataclasses.asdict(self), out)

    @classmethod
    def load(cls, path: str) -> TaskRequest:
        with open(path, encoding="utf-8") as data:
            fields = json.load(data)
        fields["location"] = staging.TaskLocation(**fields["location"])
        fields["resources"] = Resources(**fields["resources"])
        return cls(**fields)


def _requests_dir() -> str:
    return os.path.join(tempfile.gettempdir(), f"metaflow-sandbox-requests-{os.getuid()}")


def save_request(req: TaskRequest) -> str:
    """Write ``req`` where only this user can read it (it may hold ``env`` values) and return the
    path. The launcher deletes it once read; what a launcher never read (it failed to start) is
    removed when the run ends (``forget_requests``) or, after a crash of the runtime, by the next
    runtime (files are named after the runtime's pid)."""
    folder = private_dir(_requests_dir())
    fd, path = tempfile.mkstemp(prefix=f"{os.getpid()}-", suffix=".json", dir=folder)  # mode 0600
    os.close(fd)
    req.save(path)
    return path


def scratch_dir() -> tempfile.TemporaryDirectory[str]:
    """The launcher's scratch directory (the inbound and outbound archives, the credentials file),
    private and named after the launcher's pid: removed when the task ends, and the one of a
    launcher killed with SIGKILL by the next launcher (as request files are)."""
    folder = private_dir(os.path.join(tempfile.gettempdir(), f"metaflow-sandbox-scratch-{os.getuid()}"))
    return tempfile.TemporaryDirectory(prefix=f"{os.getpid()}-", dir=folder)


def mirror_root() -> str:
    """A new datastore root (``.../.metaflow``) for one task on the relay path of a remote datastore
    (``relay``): private, named after the runtime's pid (swept as the request files are); the
    launcher removes it when the task ends."""
    folder = private_dir(os.path.join(tempfile.gettempdir(), f"metaflow-sandbox-relay-{os.getuid()}"))
    return os.path.join(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=folder), ".metaflow")


def forget_requests() -> None:
    """Remove the request files of this runtime that no launcher read (called when the run ends)."""
    folder = _requests_dir()
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name.startswith(f"{os.getpid()}-"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
