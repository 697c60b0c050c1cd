"""``@sandbox`` and its static aliases ``@daytona``, ``@e2b`` and ``@modal``: run a step in a sandbox.

Layer: plugins (top: the decorator). Imports: metaflow, ``plugins.exceptions``, ``plugins.compat``,
``plugins.metadata``; the core registry lazily (only where the launcher validates the backend).

This module is imported at every ``import metaflow``, in every task too: keep it light. The
decorator validates in ``step_init`` and reroutes the task to the ``launcher``
(``reroute.reroute``), which does the actual work.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, ClassVar

from metaflow.decorators import StepDecorator

from metaflow_extensions.sandbox.core import default_backend

from .exceptions import SandboxException
from .metadata import SANDBOX_ID_ENV

# Commands that compile the flow for another orchestrator: they never call the runtime hooks, so
# a sandboxed step would silently run in the orchestrator's pod instead.
DEPLOYER_COMMANDS = ("argo-workflows", "step-functions", "airflow")
# Commands that start tasks: the backends they use are checked before the first one starts.
STARTS_TASKS = ("run", "resume")
# Other compute decorators: a step runs in one place.
OTHER_COMPUTE = ("batch", "kubernetes", "slurm", "parallel", "nvidia", "nvct")
FAMILY = ("sandbox", "daytona", "e2b", "modal")
# Option names that carry credentials whatever the backend (backends name theirs precisely in
# ``Option(secret=True)`` in ``SandboxBackend.options``).
SECRET_WORDS = ("key", "token", "secret", "password", "credential")
# How long the sandbox outlives the task's own time limit, so that @timeout fires first and @catch
# can handle it; the hard kill is the backstop.
GRACE_S = 60
# Without @timeout, Metaflow's own default run time limit (5 days) would apply.
DEFAULT_RUN_TIME_LIMIT_S = 5 * 24 * 3600
# Linux refuses to start a program with one ``NAME=value`` over 128 KiB (MAX_ARG_STRLEN), and a
# whole environment near ARG_MAX (2 MiB with Metaflow's own variables and the command): refused
# in step_init rather than failing in every task.
MAX_ENV_ENTRY = 128 * 1024 - 1
MAX_ENV_TOTAL = 1024 * 1024
# Where every sandbox (local and the providers' Linux images) keeps bash, tar and coreutils.
SYSTEM_BIN = ("/usr/bin", "/bin")


def _is_true(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no"):
        return False
    return None


def _number(value: Any, name: str, step: str, *, integer: bool, minimum: float) -> float | int | None:
    """``value`` as a number (``--with`` passes strings), or a SandboxException naming the fix."""
    if value is None:
        return None
    try:
        number = int(value) if integer else float(value)
        if isinstance(value, bool) or (integer and float(value) != number):
            raise ValueError
    except (TypeError, ValueError):
        kind = "an integer" if integer else "a number"
        raise SandboxException(f"@sandbox on step *{step}*: {name}={value} must be {kind}.") from None
    if number < minimum:
        raise SandboxException(f"@sandbox on step *{step}*: {name}={value} must be at least {minimum:g}.")
    return number


class SandboxDecorator(StepDecorator):
    """
    Specifies that this step runs in a sandbox: an isolated machine or container from a sandbox
    backend (``local`` bubblewrap sandboxes, Daytona, E2B, or any installed third-party backend).

    Parameters
    ----------
    backend : str, optional, default METAFLOW_SANDBOX_BACKEND or "local"
        The sandbox backend to use (``pip install metaflow-sandbox-<name>`` adds one).
    cpu : float, optional, default None
        Number of CPUs. If ``@resources`` is also present, the maximum of both is used.
        ``None`` leaves the size to the backend.
    memory : int, optional, default None
        Memory in MB. If ``@resources`` is also present, the maximum of both is used.
    disk : int, optional, default None
        Disk size in MB. If ``@resources`` is also present, the maximum of both is used.
    gpu : int, optional, default None
        Number of GPUs. If ``@resources`` is also present, the maximum of both is used.
    image : str, optional, default None
        Backend-specific image (container image, template or snapshot); ``None`` is the backend's
        default. The ``local`` backend has no images.
    env : Dict[str, str], optional, default None
        Environment variables set in the sandbox. Only these, ``@environment`` and what Metaflow
        needs are forwarded: the launcher's environment does not leak in.
    timeout : int, optional, default None
        Hard limit in seconds for the sandbox; it is destroyed when the limit passes. By default
        the ``@timeout`` of the step (or Metaflow's 5 days) plus a 60 s grace period, so that
        ``@timeout`` fires first and ``@catch`` can handle it.
    network : bool, default True
        ``False`` cuts the sandbox off the network.
    options : Dict[str, str], optional, default None
        Backend-specific options passed to the backend's constructor (e.g. ``{"isolation": "bwrap"}``
        for ``local``).
    data_path : str, default "auto"
        How the task's data moves: ``"relay"`` (the launcher moves it; no credentials in the
        sandbox) or ``"direct"`` (the task in the sandbox reads and writes the remote datastore
        itself, as ``@batch`` does). ``"auto"``: relay for the local datastore, and for S3 when the
        sandbox has no network or the endpoint is loopback on a backend other than ``local``;
        direct otherwise.
    credentials : str, default "temporary"
        What the sandbox gets to reach a remote datastore on the direct path: ``"temporary"``
        (short-lived STS credentials; scoped to the flow's prefixes when
        ``METAFLOW_SANDBOX_S3_ROLE_ARN`` is set) or ``"forward"`` (your own keys, static ones
        included: an explicit opt-in).
    """

    name = "sandbox"
    defaults = {
        "backend": None,
        "cpu": None,
        "memory": None,
        "disk": None,
        "gpu": None,
        "image": None,
        "env": None,
        "timeout": None,
        "network": True,
        "options": None,
        "data_path": "auto",
        "credentials": "temporary",
    }
    # The backend an alias stands for; None for @sandbox itself.
    alias_of: ClassVar[str | None] = None

    # -- validation ------------------------------------------------------------------------------

    def step_init(  # noqa: PLR0917 - Metaflow hook signature
        self, flow: Any, graph: Any, step: str, decos: list[Any], environment: Any, flow_datastore: Any, logger: Any
    ) -> None:
        self.step = step
        self.flow_name = flow.name
        self.flow_datastore = flow_datastore
        self.environment = environment
        self.step_decorators = decos
        self.inert = self._dedupe(step, decos)
        if self.inert:
            return
        self._check_context(step, decos, flow_datastore)
        self.attributes["backend"] = self._resolve_backend(step)
        self._validate(step, decos)
        self._check_datastore(step, flow_datastore, logger)
        self._preflight(step, logger)

    def _dedupe(self, step: str, decos: list[Any]) -> bool:
        """``--with sandbox`` plus a static ``@daytona`` gives two decorators of one family: the
        statically declared one wins (it is the more specific), the first one among equals."""
        family = [d for d in decos if d.name in FAMILY]
        if len(family) == 1:
            return False
        static = [d for d in family if d.statically_defined]
        if len(static) > 1:
            names = ", ".join(f"@{d.name}" for d in static)
            raise SandboxException(f"Step *{step}* has {names}: use one sandbox decorator per step.")
        winner = static[0] if static else family[0]
        return winner is not self

    def _check_context(self, step: str, decos: list[Any], flow_datastore: Any) -> None:
        command = next((arg for arg in sys.argv[1:] if arg in DEPLOYER_COMMANDS), None)
        if command is not None:
            raise SandboxException(
                f"Step *{step}* uses @{self.name}, which `{command}` cannot deploy: the step would "
                f"silently run in the {command} pod instead of a sandbox. Remove @{self.name} (or the "
                f"`--with {self.name}` option) before deploying with {command}."
            )
        others = [d.name for d in decos if d.name in OTHER_COMPUTE]
        if others:
            raise SandboxException(
                f"Step *{step}* has both @{self.name} and @{others[0]}: a step runs in one place. Remove one of them."
            )
        from .environments import refusal

        # Before the datastore's checks: no bucket needs to answer for this to be refused.
        network = _is_true(self.attributes["network"]) is not False  # a bad value is refused later
        refused = refusal(str(getattr(self.environment, "TYPE", "")), decos, flow_datastore.TYPE, network)
        if refused:
            raise SandboxException(f"@{self.name} on step *{step}*: {refused}")

    def _check_datastore(self, step: str, flow_datastore: Any, logger: Any) -> None:
        """The data path and credentials for this datastore; on a remote one, before the run (and
        only on the launcher side), that its bucket, endpoint and credentials work."""
        from . import datastores

        where = f"@{self.name} on step *{step}*"
        attrs = self.attributes
        self.data_path = datastores.data_path(
            flow_datastore.TYPE, attrs["data_path"], where, backend=attrs["backend"], network=attrs["network"]
        )
        attrs["credentials"] = datastores.credentials_mode(attrs["credentials"], where)
        starting = any(arg in ("run", "resume") for arg in sys.argv[1:])
        if flow_datastore.TYPE == "local" or not starting or os.environ.get(SANDBOX_ID_ENV) is not None:
            return
        root = flow_datastore.datastore_root
        if self.data_path == "relay":
            datastores.check_bucket(root)
            datastores.announce(
                logger,
                f"The launcher relays sandboxed steps' data to and from {root} (no credentials in the sandboxes).",
            )
            return
        from metaflow import util

        user = util.get_username() or "unknown"
        kind = datastores.check_s3(root, attrs["credentials"], self.flow_name, user)
        datastores.announce(logger, f"Sandboxed steps read and write {root} with {kind}.")

    def _resolve_backend(self, step: str) -> str:
        requested = self.attributes["backend"]
        if self.alias_of is not None:
            if requested not in (None, self.alias_of):
                raise SandboxException(
                    f"@{self.name} on step *{step}* always uses the {self.alias_of!r} backend "
                    f"(got backend={requested!r}). Use @sandbox(backend={requested!r}) instead."
                )
            requested = self.alias_of
        backend = str(requested or default_backend()).strip()
        if not backend:
            raise SandboxException(f"@{self.name} on step *{step}*: backend must not be empty.")
        if os.environ.get(SANDBOX_ID_ENV) is None:
            # Only the launcher creates sandboxes; entry points do not exist inside one.
            from metaflow_extensions.sandbox.core import SandboxError
            from metaflow_extensions.sandbox.core.registry import backend_class

            try:
                backend_class(backend)
            except SandboxError as e:
                raise SandboxException(f"@{self.name} on step *{step}*: {e}") from e
        return backend

    def _validate(self, step: str, decos: list[Any]) -> None:
        attrs = self.attributes
        attrs["cpu"] = _number(attrs["cpu"], "cpu", step, integer=False, minimum=0.001)
        for name in ("memory", "disk"):
            attrs[name] = _number(attrs[name], name, step, integer=True, minimum=1)
        attrs["gpu"] = _number(attrs["gpu"], "gpu", step, integer=True, minimum=0)
        attrs["timeout"] = _number(attrs["timeout"], "timeout", step, integer=True, minimum=1)
        self._merge_resources(decos)
        network = _is_true(attrs["network"])
        if network is None:
            raise SandboxException(f"@{self.name} on step *{step}*: network={attrs['network']!r} must be True/False.")
        attrs["network"] = network
        for name in ("env", "options"):
            attrs[name] = self._str_map(attrs[name], name, step)
        self._check_env(step, decos)
        self._refuse_secret_options(step)
        if attrs["image"] is not None and not isinstance(attrs["image"], str):
            raise SandboxException(f"@{self.name} on step *{step}*: image={attrs['image']!r} must be a string.")
        self._check_metadata_path(step)

    def _check_metadata_path(self, step: str) -> None:
        """``METAFLOW_SANDBOX_METADATA_PATH`` (for ``--metadata service``) is possible for this step."""
        from . import service

        try:
            service.requested_path(self.attributes["network"])
        except SandboxException as e:
            raise SandboxException(f"@{self.name} on step *{step}*: {e}") from None

    def _preflight(self, step: str, logger: Any) -> None:
        """Before ``run`` or ``resume`` starts tasks: the backend works with these options. Its
        warnings are said here, once for the run (the launchers stay quiet)."""
        if os.environ.get(SANDBOX_ID_ENV) is not None or not any(a in STARTS_TASKS for a in sys.argv[1:]):
            return
        from metaflow_extensions.sandbox.core import SandboxError, backend_class

        from .preflight import check_backend

        backend, image = self.attributes["backend"], self.attributes["image"]
        try:
            if image is not None and not backend_class(backend).runs_images:
                raise SandboxException(
                    f"@{self.name} on step *{step}*: the {backend} backend runs no images (image={image!r}); "
                    "its sandboxes use this machine's system and the Python you launch the flow with. "
                    "Remove image=, or choose a backend that runs images, e.g. @sandbox(backend='daytona', image=...)."
                )
            news = check_backend(backend, self.attributes["options"])
        except SandboxError as e:
            raise SandboxException(f"@{self.name} on step *{step}*: {e}") from e
        for message in news:
            logger(f"Warning: {message}")

    def _check_env(self, step: str, decos: list[Any]) -> None:
        """Every variable name the sandbox gets (``env=`` and ``@environment``) must be a shell
        identifier: backends export them in shell scripts, where any other name is shell code."""
        from metaflow_extensions.sandbox.core import SandboxError
        from metaflow_extensions.sandbox.core.spec import check_env

        sources = [(f"@{self.name}(env=...)", self.attributes["env"])]
        sources += [
            ("@environment(vars=...)", d.attributes.get("vars") or {}) for d in decos if d.name == "environment"
        ]
        total = 0
        for what, env in sources:
            where = f"{what} on step *{step}*"
            try:
                check_env({str(k): str(v) for k, v in env.items()}, where)
            except SandboxError as e:
                raise SandboxException(str(e)) from e
            for name, value in env.items():
                size = len(f"{name}={value}".encode())
                total += size
                if size > MAX_ENV_ENTRY:
                    raise SandboxException(
                        f"{where}: {name} is {size // 1024} KiB; one environment variable holds at most "
                        "128 KiB (a Linux limit). Pass large data as an artifact, a Parameter or IncludeFile, "
                        "or a file in the code package (--package-suffixes)."
                    )
            path = env.get("PATH")
            if path is not None and not set(str(path).split(":")) & set(SYSTEM_BIN):
                raise SandboxException(
                    f"{where}: PATH={path!r} leaves out /usr/bin and /bin, where the sandbox's shell and tools "
                    f"are, so the task could not start. Keep them, e.g. PATH='{path}:/usr/local/bin:/usr/bin:/bin'."
                )
        if total > MAX_ENV_TOTAL:
            raise SandboxException(
                f"@{self.name} on step *{step}*: env and @environment add up to {total // 1024} KiB, over the "
                f"{MAX_ENV_TOTAL // 1024} KiB a sandbox's environment can hold. Pass large data as an artifact, a "
                "Parameter or IncludeFile, or a file in the code package (--package-suffixes)."
            )

    def _refuse_secret_options(self, step: str) -> None:
        """Metaflow saves decorator attributes with the run (``_graph_info``), in plain text: a
        credential among ``options`` would be persisted. Credentials come from the environment."""
        backend = self.attributes["backend"]
        declared: dict[str, str] = {}
        if os.environ.get(SANDBOX_ID_ENV) is None:  # entry points exist only on the launcher side
            from metaflow_extensions.sandbox.core.options import secret_variables
            from metaflow_extensions.sandbox.core.registry import backend_class

            declared = secret_variables(backend, backend_class(backend).options or ())
        for option in self.attributes["options"]:
            if option in declared:
                variable = f"${declared[option]}"
            elif any(word in option.lower() for word in SECRET_WORDS):
                variable = f"the environment variable the {backend} backend reads for it"
            else:
                continue
            raise SandboxException(
                f"@{self.name} on step *{step}*: options={{{option!r}: ...}} is a credential, and Metaflow "
                f"saves decorator options with the run in plain text. Remove it and set {variable} in "
                "the environment of the run instead."
            )

    def _str_map(self, value: Any, name: str, step: str) -> dict[str, str]:
        if value is None:
            return {}
        given = value
        if isinstance(value, str):  # --with sandbox:env={"K":"v"} may arrive unparsed
            try:
                value = json.loads(value)
            except ValueError:
                value = None
        if not isinstance(value, dict):
            raise SandboxException(
                f"@{self.name} on step *{step}*: {name} must be a dict of strings, "
                f'e.g. {name}={{"KEY": "value"}} (with --with: \'{self.name}:{name}={{"KEY":"value"}}\', '
                f"JSON in single quotes); got {given!r}."
            )
        return {str(k): str(v) for k, v in value.items()}

    def _merge_resources(self, decos: list[Any]) -> None:
        """``@resources`` merges as with ``@batch``: the maximum of both, per resource."""
        for deco in decos:
            if deco.name != "resources":
                continue
            for name, integer in (("cpu", False), ("memory", True), ("disk", True), ("gpu", True)):
                value = _number(deco.attributes.get(name), f"@resources {name}", self.step, integer=integer, minimum=0)
                if value is not None and (self.attributes[name] is None or value > self.attributes[name]):
                    self.attributes[name] = value

    # -- the runtime (launcher side) -------------------------------------------------------------

    def runtime_init(self, flow: Any, graph: Any, package: Any, run_id: str) -> None:
        self.package = package

    def runtime_finished(self, exception: Any) -> None:
        from .request import forget_requests

        forget_requests()

    def runtime_step_cli(self, cli_args: Any, retry_count: int, max_user_code_retries: int, ubf_context: Any) -> None:
        if self.inert or retry_count > max_user_code_retries:
            # The @catch fallback attempt runs locally, as with @batch.
            return
        if list(cli_args.commands) != ["step"]:
            # e.g. `spin` (2.19+) runs `spin-step` locally by design; leave other commands alone.
            return
        from .reroute import reroute

        reroute(self, cli_args, retry_count)

    # -- the task (inside the sandbox) -----------------------------------------------------------

    def task_pre_step(  # noqa: PLR0917 - Metaflow hook signature
        self,
        step_name: str,
        task_datastore: Any,
        metadata: Any,
        run_id: str,
        task_id: str,
        flow: Any,
        graph: Any,
        retry_count: int,
        max_retries: int,
        ubf_context: Any,
        inputs: Any,
    ) -> None:
        # Also runs for the local @catch fallback attempt: record only what happened in a sandbox.
        if os.environ.get(SANDBOX_ID_ENV) and not getattr(self, "inert", False):
            from .metadata import register_sandbox_metadata

            register_sandbox_metadata(metadata, run_id, step_name, task_id, retry_count)
            self.task_metadata, self.task_datastore = metadata, task_datastore

    def task_finished(  # noqa: PLR0917 - Metaflow hook signature
        self, step_name: str, flow: Any, graph: Any, is_task_ok: bool, retry_count: int, max_retries: int
    ) -> None:
        # On the direct path, local metadata written in the sandbox travels through the datastore,
        # as with @batch; the launcher copies it back (``direct.sync_local_metadata``).
        metadata = getattr(self, "task_metadata", None)
        if metadata is not None and metadata.TYPE == "local" and getattr(self, "data_path", "") == "direct":
            from metaflow.metaflow_config import DATASTORE_LOCAL_DIR

            from .compat import sync_local_metadata_to_datastore

            sync_local_metadata_to_datastore(DATASTORE_LOCAL_DIR, self.task_datastore)

    # -- for the launcher ------------------------------------------------------------------------

    def run_time_limit(self, decos: list[Any]) -> int:
        """The hard limit of the sandboxed task, in seconds (see ``timeout`` in the docstring)."""
        if self.attributes.get("timeout"):
            return int(self.attributes["timeout"])
        from metaflow.plugins.timeout_decorator import get_run_time_limit_for_task

        return int(get_run_time_limit_for_task(decos) or DEFAULT_RUN_TIME_LIMIT_S) + GRACE_S


class DaytonaDecorator(SandboxDecorator):
    """
    ``@daytona(...)`` is ``@sandbox(backend="daytona", ...)``; see ``@sandbox`` for the parameters.
    Needs ``pip install metaflow-sandbox-daytona``.
    """

    name = "daytona"
    alias_of = "daytona"


class E2BDecorator(SandboxDecorator):
    """
    ``@e2b(...)`` is ``@sandbox(backend="e2b", ...)``; see ``@sandbox`` for the parameters.
    Needs ``pip install metaflow-sandbox-e2b``.
    """

    name = "e2b"
    alias_of = "e2b"


class ModalDecorator(SandboxDecorator):
    """
    ``@modal(...)`` is ``@sandbox(backend="modal", ...)``; see ``@sandbox`` for the parameters.
    Needs ``pip install metaflow-sandbox-modal``.
    """

    name = "modal"
    alias_of = "modal"
