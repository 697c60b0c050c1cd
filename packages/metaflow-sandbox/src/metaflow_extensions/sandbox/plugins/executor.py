"""Runs one Metaflow task in a sandbox: create, stage in, run with live logs, stage out, destroy.

Layer: plugins (middle: run by ``launcher``; uses ``task_script``, ``logs``, ``staging``,
``direct``, ``relay`` and ``metadata``). Imports: the core API (``get_backend`` and the ABC; never a backend
module by name) and the standard library — never metaflow, which the launcher process does not
load (see ``launcher``).

Exit codes: the task's own; ``EXIT_INFRA_RETRYABLE`` (1) when the sandbox failed underneath the
task (``@retry`` retries it, as with a crashed ``@batch`` job); ``METAFLOW_EXIT_DISALLOW_RETRY``
(202) when no sandbox could be created for a reason retrying cannot fix (configuration,
credentials, image), as ``@batch`` does on launch failures, and when ``flow.py sandbox kill``
destroyed the sandbox on purpose (``kills``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tarfile
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from metaflow_extensions.sandbox.core import (
    CommandTimeout,
    ConfigurationError,
    ImageError,
    Sandbox,
    SandboxBackend,
    SandboxError,
    SandboxFileNotFound,
    SandboxSpec,
    get_backend,
)

from . import direct, environments, kills, relay, service_relay, staging
from .background import Background
from .logs import TaskLogs, save_task_logs, say
from .metadata import sandbox_env
from .request import TaskRequest, scratch_dir
from .task_script import SECRETS_FILE, TIMINGS_ENV, script, write_secrets

EXIT_INFRA_RETRYABLE = 1
EXIT_DISALLOW_RETRY = 202  # metaflow.exception.METAFLOW_EXIT_DISALLOW_RETRY, stable since 2.x
CREATE_GRACE_S = 30  # on interruption, how long a sandbox being created may take to appear
PROGRESS_BYTES = 100 * 1024 * 1024  # staging more than this says so first: it takes a while
# The lifecycle line's phases, each the sum of the detailed timings it covers.
PHASES = {
    "create": ("create",),
    "stage": ("build_inputs", "upload"),
    "run": ("task",),
    "merge": ("download", "merge", "push", "sync_metadata", "replay_metadata", "keep_environment"),
}
ISOLATION_NAMES = {"bwrap": "bubblewrap"}  # a backend's ``isolation`` attribute, as users know it


# Backends made ahead of the attempts that use them (``runservice``): its SDK imported and its client
# set up once per run instead of once per task.
_ready: dict[str, SandboxBackend] = {}


def _backend_key(name: str, options: Mapping[str, Any]) -> str:
    return json.dumps([name, sorted(options.items())], default=str)


def prepare_backend(name: str, options: Mapping[str, Any]) -> None:
    """Make the backend ``name`` with ``options`` now, for every later attempt of this process and
    of the processes it forks. A configuration error is left for the attempt to report."""
    with contextlib.suppress(SandboxError):
        _ready[_backend_key(name, options)] = get_backend(name, **dict(options))


def backend_for(name: str, options: Mapping[str, Any]) -> SandboxBackend:
    """The prepared backend ``name`` with ``options``, or a new one."""
    return _ready.get(_backend_key(name, options)) or get_backend(name, **dict(options))


class SandboxTask:
    """One attempt of one task in one sandbox."""

    def __init__(self, req: TaskRequest):
        self.req = req
        self.logs = TaskLogs(req.flow_dir)
        self.sandbox: Sandbox | None = None
        self.isolation = "provider-isolated"  # a provider's sandbox is its own boundary
        self.creating: Background | None = None
        self.timings: dict[str, float] = {}

    def _timed(self, name: str, start: float) -> None:
        self.timings[name] = time.monotonic() - start

    def create(self) -> Sandbox:
        """Create the sandbox; configuration problems raise ``SandboxError`` before anything runs."""
        req = self.req
        start = time.monotonic()
        backend = backend_for(req.backend, req.backend_options)
        # The local backend says how it isolates (bubblewrap or plain processes).
        isolation = getattr(backend, "isolation", None)
        if isinstance(isolation, str):
            self.isolation = ISOLATION_NAMES.get(isolation, isolation)
        spec = SandboxSpec(
            image=req.image,
            env=dict(req.env),
            labels=dict(req.labels),
            resources=req.resources,
            lifetime_s=req.hard_limit_s + 300,
            network=req.network,
            read_only_dirs={staging.CODE_PREFIX: req.code_dir} if req.code_dir else {},
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
        if relay.is_remote_relay(req):  # the mirror of the remote datastore, filled first
            relay.fetch_inputs(req)
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
        progress(f"Uploading {{}} of task inputs to sandbox {sbx.id}...", inbound)
        sbx.upload(inbound, staging.IN_ARCHIVE)
        if req.secret_env:
            sbx.upload(write_secrets(req.secret_env, os.path.dirname(inbound)), SECRETS_FILE)
        reused = environments.upload_built(sbx, req.environment_cache)
        self._timed("upload", start)

        start = time.monotonic()
        env = {**sandbox_env(sbx.id, req.backend)}
        if os.environ.get(TIMINGS_ENV):
            env[TIMINGS_ENV] = "1"
        try:
            with service_relay.heartbeat(req.service_url, req.service_headers, req.location, say):
                result = sbx.run(
                    script(req, environment_reused=reused),
                    env=env,
                    timeout_s=req.hard_limit_s,
                    on_stdout=self.logs.sink("stdout"),
                    on_stderr=self.logs.sink("stderr"),
                )
        except CommandTimeout as e:
            # Retrying would run into the same limit: raising the limit is the fix.
            raise ConfigurationError(
                f"The task ran past the sandbox's hard limit of {req.hard_limit_s} s and was killed.",
                remedy="Use @timeout on the step (it fires first, and @retry and @catch handle it) or raise "
                "@sandbox(timeout=...).",
                sandbox_id=sbx.id,
            ) from e
        finally:
            self._timed("task", start)
        for (_, before), (name, after) in zip(self.logs.marks, self.logs.marks[1:], strict=False):
            self.timings[f"task.{name}"] = (after - before) / 1e9
        if self.logs.setup_error:
            raise SandboxError(f"Sandbox {sbx.id}: {self.logs.setup_error}.", sandbox_id=sbx.id)
        if req.environment_cache and not reused and result.exit_code == 0:
            start = time.monotonic()
            environments.keep_built(sbx, req.environment_cache)
            self._timed("keep_environment", start)
        if req.data_path == "direct":
            return self._finish_direct(result.exit_code)
        return self._finish_relay(sbx, os.path.join(os.path.dirname(inbound), "out.tar"), known_blobs, result.exit_code)

    def _finish_relay(self, sbx: Sandbox, outbound: str, known_blobs: set[str], exit_code: int) -> int:
        """Bring the task's outputs back into the datastore (and, from a remote one's mirror, push
        them on) while the sandbox is destroyed."""
        req = self.req
        start = time.monotonic()
        try:
            sbx.download(staging.OUT_ARCHIVE, outbound)
        except SandboxFileNotFound as e:
            raise SandboxError(f"Sandbox {sbx.id} returned no task outputs.", sandbox_id=sbx.id) from e
        self._timed("download", start)
        progress(f"Merging {{}} of task outputs from sandbox {sbx.id}...", outbound)
        # The sandbox is not needed any more: destroy it while the outputs are merged.
        destroying = Background(self.destroy)
        start = time.monotonic()
        written = staging.merge_outputs(outbound, req.location, known_blobs, attempt=req.attempt)
        self._timed("merge", start)
        if relay.is_remote_relay(req):
            start = time.monotonic()
            try:
                relay.push_outputs(req, written)
                relay.local_metadata(req, written)
            except direct.DirectError as e:  # without its data or metadata the task is not there
                destroying.result()
                raise SandboxError(str(e)) from e
            self._timed("push", start)
        destroying.result()
        if req.service_url:
            return self._replay(lambda: self._archive_meta(outbound), exit_code)
        return exit_code

    def _archive_meta(self, outbound: str) -> dict[str, bytes]:
        """The task's ``_meta`` files from the verified outbound archive (naming the remote
        datastore on the relay path of a remote one)."""
        files = service_relay.meta_files_in_archive(outbound, self.req.location)
        if relay.is_remote_relay(self.req):
            return {name: relay.rewrite_meta(data, self.req) for name, data in files.items()}
        return files

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
        if self.req.service_url:
            return self._replay(lambda: direct.task_meta_files(self.req), exit_code)
        return exit_code

    def _replay(self, files: Callable[[], dict[str, bytes]], exit_code: int) -> int:
        """Relayed metadata service: replay what the task recorded in the sandbox (the merge or the
        datastore has it by now). A successful task whose metadata cannot reach the service fails:
        the Client API would not see it."""
        req, start = self.req, time.monotonic()
        try:
            service_relay.replay(req.service_url, req.service_headers, req.location, files())
        except (service_relay.RelayError, direct.DirectError, OSError, tarfile.TarError) as e:
            if exit_code == 0:
                raise SandboxError(f"Could not relay the task's metadata: {e}") from e
            say(f"Could not relay the task's metadata: {e}")
        self._timed("replay_metadata", start)
        return exit_code

    def lifecycle(self) -> str:
        """The task's one line: where it ran and where the time went."""
        assert self.sandbox is not None
        req = self.req
        spent = [
            f"{phase} {sum(self.timings.get(name, 0.0) for name in names):.2f}s"
            for phase, names in PHASES.items()
            if any(name in self.timings for name in names)
        ]
        relayed = ", metadata relay" if req.service_url else ""
        where = f"Sandbox {self.sandbox.id} ({req.backend}, {self.isolation}, data path {req.data_path}{relayed})"
        return f"{where}: {', '.join(spent)}."

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


def progress(message: str, path: str) -> None:
    """Say ``message`` (``{}``: the size of ``path``) when the file is large enough to take a while."""
    size = os.path.getsize(path)
    if size > PROGRESS_BYTES:
        say(message.format(f"{size / 1e6:.0f} MB"))


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
    for message in req.shown_warnings:  # the runtime said it once for the whole run
        warnings.filterwarnings("ignore", message=re.escape(message))
    task = SandboxTask(req)
    age = process_age_s()
    if age is not None:
        task.timings["launcher_start"] = age
    with scratch_dir() as tmp:
        try:
            return _execute(task, tmp)
        finally:
            if task.creating is not None:
                # Interrupted while the sandbox was being created: let it finish, then destroy it.
                task.creating.wait(CREATE_GRACE_S)
            task.destroy()
            save_task_logs(req, task.logs.blobs())
            if relay.is_remote_relay(req):
                relay.remove_mirror(req)
            if task.sandbox is not None:
                say(task.lifecycle())
            if os.environ.get(TIMINGS_ENV):
                say("sandbox timings: " + ", ".join(f"{k}={v * 1000:.0f}ms" for k, v in task.timings.items()))


def _execute(task: SandboxTask, tmp: str) -> int:
    # Creating a provider sandbox takes seconds: build the inputs meanwhile.
    creating = task.creating = Background(task.create)
    try:
        inbound, known_blobs = task.build_inputs(tmp)
    except (staging.StagingError, direct.DirectError) as e:
        creating.wait()
        say(f"Could not stage the task inputs: {e}")
        return EXIT_INFRA_RETRYABLE
    try:
        sbx = creating.result()
    except SandboxError as e:
        say(f"Could not create a {task.req.backend!r} sandbox: {e}")
        return exit_code_for(e)
    try:
        return task.run(sbx, inbound, known_blobs)
    except staging.UntrustedOutput as e:
        say(f"Refused the outputs of sandbox {sbx.id}: {e} Nothing of this attempt was saved; it is not retried.")
        return EXIT_DISALLOW_RETRY
    except (SandboxError, staging.StagingError) as e:
        if kills.was_killed(task.req.backend, sbx.id):
            say(f"Task killed by `sandbox kill` (sandbox {sbx.id} destroyed): this attempt ends here, not retried.")
            return EXIT_DISALLOW_RETRY
        if exit_code_for(e) == EXIT_DISALLOW_RETRY:
            say(f"Sandbox {sbx.id}: {e} Retrying cannot help: this attempt is not retried.")
        else:
            say(f"Infrastructure failure in sandbox {sbx.id}: {e} This may be transient: use @retry to retry.")
        return exit_code_for(e)
