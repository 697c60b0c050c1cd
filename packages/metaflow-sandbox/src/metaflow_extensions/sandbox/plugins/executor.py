"""Runs one Metaflow task in a sandbox: create, stage in, run with live logs, stage out, destroy.

Layer: plugins (middle: run by ``launcher``; uses ``staging`` and ``metadata``). Imports: the
core API (``get_backend`` and the ABC; never a backend module by name) and the standard library —
never metaflow, which the launcher process does not load (see ``launcher``).

The task's output is captured here, on the launcher side, in mflog format: each line is echoed
live as a structured line (the runtime shows it with the task prefix and does not persist it
twice) and saved as the attempt's ``task`` logs when the task ends, even when the sandbox died.
This costs nothing inside the sandbox (no tee or save_logs processes) and is the same on every
backend.

Exit codes: the task's own; ``EXIT_INFRA_RETRYABLE`` (1) when the sandbox failed underneath the
task (``@retry`` retries it, as with a crashed ``@batch`` job); ``METAFLOW_EXIT_DISALLOW_RETRY``
(202) when no sandbox could be created for a reason retrying cannot fix (configuration,
credentials, image), as ``@batch`` does on launch failures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from metaflow_extensions.sandbox.core import (
    CommandTimeout,
    ConfigurationError,
    ImageError,
    Resources,
    Sandbox,
    SandboxError,
    SandboxFileNotFound,
    SandboxSpec,
    get_backend,
)

from . import direct, staging
from .metadata import sandbox_env

EXIT_INFRA_RETRYABLE = 1
EXIT_DISALLOW_RETRY = 202  # metaflow.exception.METAFLOW_EXIT_DISALLOW_RETRY, stable since 2.x
SETUP_FAILED = "__MFSBX_SETUP_FAILED__"
MARK = "__MFSBX_T__"  # phase timestamps, printed only when timings are on
TIMINGS_ENV = "METAFLOW_SANDBOX_TIMINGS"
MARKER = "mfsbx/marker"
SECRETS_FILE = "mfsbx/secrets.env"  # credentials, sourced then deleted before the task starts
CREATE_GRACE_S = 30  # on interruption, how long a sandbox being created may take to appear


@dataclass(frozen=True)
class TaskRequest:
    """Everything needed to run one task attempt in a sandbox (built by ``launch`` in the runtime)."""

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
    image: str | None = None
    resources: Resources = field(default_factory=Resources)
    network: bool = True
    extra_inputs: list[str] = field(default_factory=list)
    retry_delay_s: int = 0  # @retry(minutes_between_retries) before this attempt
    data_path: str = "relay"  # "direct": the task reads and writes the remote datastore itself
    datastore: str = "local"
    # Credentials: uploaded as a file the script sources (never in a command, a label or a log).
    secret_env: Mapping[str, str] = field(default_factory=dict)
    metadata_root: str = ""  # direct path with local metadata: the launcher's `.metaflow` to copy it to

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


class Background:
    """A call running in a daemon thread; ``result()`` returns its value or raises its exception."""

    def __init__(self, call: Callable[[], Any]):
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self._value = call()
        except BaseException as e:  # handed to the caller of result()
            self._error = e

    def wait(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def mflog_line(line: str, source: str = "task") -> bytes:
    """``line`` as a Metaflow structured log line: ``[MFLOG|0|<UTC time>Z|<source>|<id>]<line>``,
    the format of ``metaflow.mflog.decorate`` (version 0, unchanged since Metaflow 2.0). Written
    here so the launcher does not import Metaflow; a unit test parses it with Metaflow's parser."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return f"[MFLOG|0|{now}Z|{source}|{uuid.uuid4()}]".encode() + line.encode("utf-8", errors="replace")


class TaskLogs:
    """Echo the task's lines live as mflog lines and keep them for the datastore."""

    def __init__(self) -> None:
        self.lines: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self.setup_error: str | None = None
        self.marks: list[tuple[str, int]] = []
        self._lock = threading.Lock()

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


def script(req: TaskRequest) -> str:
    """The one bash command run in the sandbox: unpack, run the task, pack outputs, exit with the task's code."""

    def fail(what: str) -> str:
        return f'{{ echo "{SETUP_FAILED} {what}" >&2; exit 97; }}'

    # Metaflow's own variables, whose values expand $PWD: double quotes on purpose.
    exports = "".join(f'export {k}="{v}"; ' for k, v in req.extract_env.items())
    extract = " && ".join(req.extract_commands)
    inline = req.code_tar is not None
    unpack_code = (
        "cd code"
        if inline
        else f"mkdir -p code && cd code && {{ {extract.replace('job.tar', '../' + staging.PACKAGE_MEMBER)}; }} "
        f"|| {fail('unpacking the code package failed')}"
    )
    return "\n".join(
        [
            f'mark() {{ [ -n "${{{TIMINGS_ENV}:-}}" ] && echo "{MARK} $1 $(date +%s%N)" >&2; true; }}',
            "mark start",
            f"{staging.unpack_command(inline_code=inline)} || {fail('unpacking the task inputs failed')}",
            "mark unpack_inputs",
            unpack_code,
            f"{_datastore_setup(req)} && {exports}touch ../{MARKER}",
            "mark unpack_code",
            f"( {req.step_command} )",
            "c=$?",
            "mark step",
            "cd ..",
            _pack_outputs(req),
            "mark pack_outputs",
            "exit $c",
        ]
    )


def _datastore_setup(req: TaskRequest) -> str:
    """Shell run in the code directory before the task."""
    if req.data_path == "direct":
        # Local metadata (if any) stays in the sandbox's own directory, never a parent's `.metaflow`;
        # the task sends it through the datastore (see the decorator's ``task_finished``).
        setup = 'export METAFLOW_DATASTORE_SYSROOT_LOCAL="$PWD"'
        if req.secret_env:
            # A file, not the command's environment: some backends send the environment as part of
            # the command text, which providers keep (and list) with the sandbox.
            setup = f"set -a && . ../{SECRETS_FILE} && set +a && rm -f ../{SECRETS_FILE} && {setup}"
        if req.code_tar is None and req.metadata_root:
            # Without inline code the unpack step skipped code/ members: the run's metadata is one.
            setup = f"tar -x -f ../{staging.IN_ARCHIVE} --strip-components=1 --wildcards 'code/*' && {setup}"
        return setup
    # Metaflow finds the card root (and a default datastore) by walking up to `.metaflow`.
    return f"ln -sfn {shlex.quote(req.location.root)} .metaflow"


def write_secrets(secrets: Mapping[str, str], folder: str) -> str:
    """``secrets`` as a shell file of assignments in ``folder`` (private: the launcher's temporary
    directory), readable by this user only; returns its path."""
    path = os.path.join(folder, "secrets.env")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.writelines(f"{name}={shlex.quote(value)}\n" for name, value in secrets.items())
    return path


def _pack_outputs(req: TaskRequest) -> str:
    """Shell run after the task: on the relay path, pack its outputs for the launcher."""
    if req.data_path == "direct":
        return "true"  # the task wrote its outputs to the datastore itself
    return f"{staging.pack_command(req.location, MARKER)} || echo 'packing the task outputs failed' >&2"


class SandboxTask:
    """One attempt of one task in one sandbox."""

    def __init__(self, req: TaskRequest):
        self.req = req
        self.logs = TaskLogs()
        self.sandbox: Sandbox | None = None
        self.creating: Background | None = None
        self.timings: dict[str, float] = {}

    def _timed(self, name: str, start: float) -> None:
        self.timings[name] = time.monotonic() - start

    def create(self) -> Sandbox:
        """Create the sandbox; configuration problems raise ``SandboxError`` before anything runs."""
        req = self.req
        start = time.monotonic()
        backend = get_backend(req.backend, **dict(req.backend_options))
        spec = SandboxSpec(
            image=req.image,
            env=dict(req.env),
            labels=dict(req.labels),
            resources=req.resources,
            lifetime_s=req.hard_limit_s + 300,
            network=req.network,
        )
        self.sandbox = backend.create(spec)
        self._timed("create", start)
        return self.sandbox

    def build_inputs(self, tmp: str) -> tuple[str, set[str]]:
        """The inbound archive (code package and the datastore files the task reads), built
        locally while the sandbox is being created."""
        start = time.monotonic()
        req = self.req
        files: list[str] = []
        known_blobs: set[str] = set()
        if req.data_path != "direct":  # direct: the task reads its inputs from the datastore
            files, known_blobs = staging.input_files(req.location, req.input_paths, req.extra_inputs)
        inbound = os.path.join(tmp, "in.tar")
        named = direct.metadata_inputs(req) if req.data_path == "direct" else {}
        staging.build_inputs(inbound, files, package=req.package, code_tar=req.code_tar, named=named)
        self._timed("build_inputs", start)
        return inbound, known_blobs

    def run(self, sbx: Sandbox, inbound: str, known_blobs: set[str]) -> int:
        """Upload, run, bring the outputs back. Returns the task's exit code; raises
        ``SandboxError`` on infrastructure failures (the caller maps them to exit codes)."""
        req = self.req
        start = time.monotonic()
        sbx.upload(inbound, staging.IN_ARCHIVE)
        if req.secret_env:
            sbx.upload(write_secrets(req.secret_env, os.path.dirname(inbound)), SECRETS_FILE)
        self._timed("upload", start)

        start = time.monotonic()
        env = {**sandbox_env(sbx.id, req.backend)}
        if os.environ.get(TIMINGS_ENV):
            env[TIMINGS_ENV] = "1"
        try:
            result = sbx.run(
                script(req),
                env=env,
                timeout_s=req.hard_limit_s,
                on_stdout=self.logs.sink("stdout"),
                on_stderr=self.logs.sink("stderr"),
            )
        except CommandTimeout as e:
            raise SandboxError(
                f"The task ran past the sandbox's hard limit of {req.hard_limit_s} s and was killed. "
                "Use @timeout on the step (it fires first, and @catch can handle it) or raise "
                "@sandbox(timeout=...).",
                sandbox_id=sbx.id,
            ) from e
        self._timed("task", start)
        for (_, before), (name, after) in zip(self.logs.marks, self.logs.marks[1:], strict=False):
            self.timings[f"task.{name}"] = (after - before) / 1e9
        if self.logs.setup_error:
            raise SandboxError(f"Sandbox {sbx.id}: {self.logs.setup_error}.", sandbox_id=sbx.id)
        if req.data_path == "direct":
            return self._finish_direct(result.exit_code)

        start = time.monotonic()
        outbound = os.path.join(os.path.dirname(inbound), "out.tar")
        try:
            sbx.download(staging.OUT_ARCHIVE, outbound)
        except SandboxFileNotFound as e:
            raise SandboxError(f"Sandbox {sbx.id} returned no task outputs.", sandbox_id=sbx.id) from e
        self._timed("download", start)
        # The sandbox is not needed any more: destroy it while the outputs are merged.
        destroying = Background(self.destroy)
        start = time.monotonic()
        staging.merge_outputs(outbound, req.location, known_blobs, attempt=req.attempt)
        self._timed("merge", start)
        destroying.result()
        return result.exit_code

    def _finish_direct(self, exit_code: int) -> int:
        """The task wrote its outputs to the datastore (DONE last, Metaflow's own rule): copy its
        local metadata back while the sandbox is destroyed."""
        destroying = Background(self.destroy)
        start = time.monotonic()
        try:
            direct.sync_local_metadata(self.req)
        except direct.DirectError as e:
            if exit_code == 0:  # without its metadata the Client API would not see the task
                raise SandboxError(str(e)) from e
            say(str(e))
        self._timed("sync_metadata", start)
        destroying.result()
        return exit_code

    def destroy(self) -> None:
        if self.sandbox is not None and not self.sandbox.destroyed:
            start = time.monotonic()
            try:
                self.sandbox.destroy()
            except SandboxError as e:
                say(f"Could not destroy sandbox {self.sandbox.id} ({e}); its lifetime limit will remove it.")
            self._timed("destroy", start)


def exit_code_for(error: BaseException) -> int:
    """Configuration, credentials, images: retrying cannot help. Everything else may be transient."""
    if isinstance(error, (ConfigurationError, ImageError)):
        return EXIT_DISALLOW_RETRY
    return EXIT_INFRA_RETRYABLE


def process_age_s() -> float | None:
    """Seconds since this process started (Linux), for the launcher's own start-up timing."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started = int(stat.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
            return float(uptime.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None


def execute(req: TaskRequest) -> int:
    """Run ``req`` end to end; always destroy the sandbox and save the captured logs."""
    task = SandboxTask(req)
    age = process_age_s()
    if age is not None:
        task.timings["launcher_start"] = age
    with tempfile.TemporaryDirectory(prefix="mfsbx-") as tmp:
        try:
            return _execute(task, tmp)
        finally:
            if task.creating is not None:
                # Interrupted while the sandbox was being created: let it finish, then destroy it.
                task.creating.wait(CREATE_GRACE_S)
            task.destroy()
            save_task_logs(req, task.logs.blobs())
            if os.environ.get(TIMINGS_ENV):
                say("sandbox timings: " + ", ".join(f"{k}={v * 1000:.0f}ms" for k, v in task.timings.items()))


def save_task_logs(req: TaskRequest, logs: dict[str, bytes]) -> None:
    """Where ``flow.py logs`` reads them: the local datastore, or the remote one on the direct path."""
    if req.data_path != "direct":
        staging.save_task_logs(req.location, req.attempt, logs)
        return
    try:
        direct.save_task_logs(req.datastore, req.location, req.attempt, logs)
    except direct.DirectError as e:
        say(str(e))


def _execute(task: SandboxTask, tmp: str) -> int:
    # Creating a provider sandbox takes seconds: build the inputs meanwhile.
    creating = task.creating = Background(task.create)
    try:
        inbound, known_blobs = task.build_inputs(tmp)
    except staging.StagingError as e:
        creating.wait()
        say(f"Could not stage the task inputs: {e}")
        return EXIT_INFRA_RETRYABLE
    try:
        sbx = creating.result()
    except SandboxError as e:
        say(f"Could not create a {task.req.backend!r} sandbox: {e}")
        return exit_code_for(e)
    say(f"Sandbox {sbx.id} ({task.req.backend}) is running the task (data path: {task.req.data_path}).")
    try:
        return task.run(sbx, inbound, known_blobs)
    except staging.UntrustedOutput as e:
        say(f"Refused the outputs of sandbox {sbx.id}: {e} Nothing of this attempt was saved; it is not retried.")
        return EXIT_DISALLOW_RETRY
    except (SandboxError, staging.StagingError) as e:
        say(f"Infrastructure failure in sandbox {sbx.id}: {e} This may be transient: use @retry to retry.")
        return exit_code_for(e)
