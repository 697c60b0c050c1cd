"""The runtime side of a sandboxed task: the runtime's ``flow.py step`` command line for the task is
rerouted, becoming a ``TaskRequest`` file and a command that starts the ``launcher`` with it.

Layer: plugins (called by the decorator's ``runtime_step_cli``, in the runtime process). Imports:
metaflow, the core registry, ``plugins.request``, ``plugins.staging``, ``plugins.metadata``,
``plugins.compat``.

Everything the launcher needs is known here, where Metaflow and the flow are loaded already: the
real ``flow.py step`` command line (the runtime's own, run from the unpacked code in the sandbox,
after the environment's bootstrap commands as ``@batch`` runs them), the datastore location, the
environment, labels, limits and the code package (from memory: the runtime holds it), unpacked
once per package into a cached directory the sandboxes share or a cached archive. The request
travels as a private file, never on a command line.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from metaflow import util

from metaflow_extensions.sandbox.core import Resources, backend_class

from . import code_cache, compat, environments, kills, preflight, staging
from .metadata import task_labels
from .request import TaskRequest, mirror_root, save_request

LAUNCHER = "metaflow_extensions.sandbox.plugins.launcher"
# An argument over ~128 KiB cannot go through ``bash -c``: long input paths travel in variables.
INPUT_PATHS_CHUNK = 30 * 1024
_INPUT_PATHS = "__MFSBX_INPUT_PATHS__"


def reroute(deco: Any, cli_args: Any, retry_count: int) -> None:
    """Make the runtime start the launcher for this task (``cli_args``: Metaflow's ``CLIArgs``)."""
    path = save_request(task_request(deco, cli_args, retry_count))
    # The launcher must run with this Python, which has the backends installed, whatever
    # interpreter @conda/@pypi chose for the step itself.
    cli_args.entrypoint = [sys.executable, "-m", LAUNCHER, path]
    cli_args.top_level_options = {}
    cli_args.commands = []
    cli_args.command_args = []
    cli_args.command_options = {}


def task_request(deco: Any, cli_args: Any, retry_count: int) -> TaskRequest:
    step = cli_args.command_args[0]
    options = cli_args.command_options
    run_id, task_id = str(options["run-id"]), str(options["task-id"])
    user = util.get_username() or "unknown"
    flow_file = os.path.basename(sys.argv[0])
    compressed = options.get("input-paths") or ""
    input_env = chunked("METAFLOW_INPUT_PATHS", compressed)
    env = {
        "METAFLOW_USER": user,
        "METAFLOW_RUN_ID": run_id,
        "METAFLOW_FLOW_FILENAME": flow_file,
        "PYTHONUNBUFFERED": "x",
        **input_env,
    }
    root = deco.flow_datastore.datastore_root
    direct = deco.data_path == "direct"
    remote_root, remote_card_root = "", ""
    if not direct and deco.flow_datastore.TYPE != "local":
        # The relay path of a remote datastore: the task runs against a local mirror (``relay``).
        remote_root, remote_card_root = root, _card_root(deco.flow_datastore.TYPE)
        root = mirror_root()
        cli_args.top_level_options["datastore"] = "local"
        cli_args.top_level_options["datastore-root"] = root
    task_datastore = "local" if remote_root else deco.flow_datastore.TYPE
    if not direct and os.path.basename(root.rstrip("/")) == ".metaflow":
        # IncludeFile and other config-derived local paths resolve from the system root.
        env["METAFLOW_DATASTORE_SYSROOT_LOCAL"] = os.path.dirname(root.rstrip("/"))
    for other in deco.step_decorators:
        if other.name == "environment":  # only set on the launcher otherwise
            env.update({k: str(v) for k, v in other.attributes["vars"].items()})
    env.update(deco.attributes["env"])

    # Cards: the client reads them from <ds-root>/mf.cards. In the sandbox, Metaflow finds the card
    # root by walking up from the working directory to a `.metaflow` (METAFLOW_CARD_LOCALROOT is
    # ignored up to 2.19: get_storage_root returns None when it is set), so the executor links
    # `.metaflow` in the code directory to the datastore root.
    card_root = None if direct else os.path.join(root, "mf.cards")
    location = staging.TaskLocation(
        root=root, flow=deco.flow_name, run_id=run_id, step=step, task_id=task_id, card_root=card_root
    )
    datatools = "" if direct else _include_file_dir(location.flow)
    secret_env: dict[str, str] = {}
    if direct:
        secret_env = _direct_env(deco, root, user, env)
    attrs = deco.attributes
    bootstrap = deco.environment.bootstrap_commands(step, task_datastore)
    code_tar, code_dir, package, extract, extract_env = _code(deco, writable=bool(bootstrap))
    environment = str(getattr(deco.environment, "TYPE", ""))
    env_cache = environments.cache_entry(
        environment,
        bootstrap,
        package_digest=_digest(deco.package),
        backend=attrs["backend"],
        options=attrs["options"],
        image=attrs["image"],
    )
    metadata = options_metadata(cli_args)
    relayed = _service(cli_args, attrs, env, secret_env, bool(remote_root)) if metadata == "service" else None
    return TaskRequest(
        backend=attrs["backend"],
        backend_options=attrs["options"],
        step_command=step_command(
            deco.environment.executable(step),
            flow_file,
            cli_args,
            input_env,
            bootstrap=bootstrap,
        ),
        location=location,
        input_paths=util.decompress_list(compressed) if compressed else [],
        extract_commands=extract,
        extract_env=extract_env,
        env=env,
        labels=task_labels(location.flow, run_id, step, task_id, attempt=retry_count, user=user),
        hard_limit_s=deco.run_time_limit(deco.step_decorators),
        attempt=retry_count,
        package=package,
        code_tar=code_tar,
        code_dir=code_dir,
        image=attrs["image"],
        resources=Resources(cpu=attrs["cpu"], memory_mb=attrs["memory"], disk_mb=attrs["disk"], gpu=attrs["gpu"]),
        network=attrs["network"],
        extra_inputs=[datatools] if datatools and os.path.isdir(datatools) else [],
        retry_delay_s=retry_delay(deco.step_decorators, retry_count),
        data_path=deco.data_path,
        datastore=deco.flow_datastore.TYPE,
        secret_env=secret_env,
        metadata_root=_local_metadata_root() if (direct or remote_root) and metadata == "local" else "",
        remote_root=remote_root,
        remote_card_root=remote_card_root,
        flow_dir=os.path.dirname(os.path.abspath(sys.argv[0])),
        shown_warnings=preflight.shown_warnings(),
        runtime=kills.process_identity(os.getpid()),
        service_url=relayed.url if relayed else "",
        service_headers=relayed.headers if relayed else {},
        environment=environment if env_cache else "",
        environment_cache=env_cache,
    )


def _service(cli_args: Any, attrs: Any, env: dict[str, str], secret_env: dict[str, str], data_relayed: bool) -> Any:
    """``--metadata service``: on the direct path, the service's settings for the sandbox (headers
    among the secrets); on the relay path, the task records locally (``--metadata local``) and the
    returned ``ServiceTask`` tells the launcher where to replay it. A remote datastore's relayed
    data relays the metadata too: the records name the task's mirror until the launcher rewrites them."""
    from . import service

    task = service.for_task(attrs["backend"], attrs["network"], data_relayed=data_relayed)
    if task.path == "relay":
        cli_args.top_level_options["metadata"] = "local"
        return task
    env.update(task.env())
    secret_env.update(task.secret_env())
    return None


def _direct_env(deco: Any, root: str, user: str, env: dict[str, str]) -> dict[str, str]:
    """On the direct path: add the datastore's configuration to ``env`` and return the sandbox's
    credentials (kept apart from ``env``: the executor uploads them as a file the task's shell
    sources, never in a label, a command line or a log)."""
    from . import datastores

    roots = datastores.s3_roots(root)
    env.update(datastores.task_env(roots, datastores.region()))
    return datastores.credentials_env(deco.attributes["credentials"], roots.flow_prefixes(deco.flow_name), user)


def _card_root(datastore: str) -> str:
    """Where Metaflow keeps the cards of a ``datastore`` (``CARD_S3ROOT``, by default under the sysroot)."""
    from metaflow.plugins.cards.card_datastore import CardDatastore

    return str(CardDatastore.get_storage_root(datastore) or "")


def options_metadata(cli_args: Any) -> str:
    """The metadata provider the runtime gives the task (``--metadata``)."""
    return str(cli_args.top_level_options.get("metadata") or "")


def _local_metadata_root() -> str:
    """The runtime's local metadata directory (``.metaflow``), where the launcher copies a direct-path
    task's metadata back (as ``@batch`` does with ``sync_local_metadata_from_datastore``)."""
    from metaflow.plugins.datastores.local_storage import LocalStorage

    return str(LocalStorage.get_datastore_root_from_config(lambda *args, **kwargs: None))


def chunked(prefix: str, value: str) -> dict[str, str]:
    """``value`` split over variables ``<prefix>_0``, ``<prefix>_1``... of at most ``INPUT_PATHS_CHUNK``."""
    return {
        f"{prefix}_{i // INPUT_PATHS_CHUNK}": value[i : i + INPUT_PATHS_CHUNK]
        for i in range(0, len(value), INPUT_PATHS_CHUNK)
    }


def step_command(
    executable: str, flow_file: str, cli_args: Any, input_env: dict[str, str], bootstrap: Sequence[str] = ()
) -> str:
    """The runtime's own ``flow.py step`` command line as a shell command run from the unpacked
    code, with the input paths read from ``input_env``'s variables, after the environment's
    ``bootstrap`` commands (``--environment=uv``, ``@pypi``/``@conda``: what ``@batch`` runs first).

    ``executable`` is shell text, as with ``@batch``: ``uv run --no-sync python``, or
    ``$MF_ARCH/<id>/bin/python -s`` for ``@conda``, must be split and expanded by the shell.
    """
    options = cli_args.command_options
    original = options.get("input-paths")
    if input_env:
        options["input-paths"] = _INPUT_PATHS
    try:
        args = cli_args.get_args()[len(cli_args.entrypoint) :]
    finally:
        options["input-paths"] = original
    words = " ".join([executable, *(shlex.quote(str(arg)) for arg in ["-u", flow_file, *args])])
    command = words.replace(_INPUT_PATHS, '"' + "".join(f"${{{name}}}" for name in input_env) + '"')
    if not bootstrap:
        return command
    # Bootstraps call Metaflow's `flush_mflogs` (2.15.1+); the launcher streams output live instead.
    return " && ".join(["flush_mflogs() { :; }", *bootstrap, command])


def retry_delay(decos: list[Any], retry_count: int) -> int:
    """``@retry(minutes_between_retries=...)`` is honoured before a sandboxed retry, as with @batch."""
    if not retry_count:
        return 0
    for deco in decos:
        if deco.name == "retry":
            return int(float(deco.attributes.get("minutes_between_retries", 2)) * 60)
    return 0


def _code(deco: Any, *, writable: bool) -> tuple[str | None, str, str, list[str], dict[str, str]]:
    """(code archive, shared code directory, package file, extract commands, extract env) of this
    run's code package; ``writable``: the task writes into its code directory (an environment's
    bootstrap, such as ``uv sync`` writing ``uv.lock``), which then cannot be shared."""
    cls = backend_class(deco.attributes["backend"])
    # Direct path: the task writes its local metadata next to its code, which must stay writable.
    share = cls.shares_host_dirs and deco.data_path != "direct" and not writable
    return _package_files(deco.package, cls.runs_launcher_python, share)


@functools.cache  # once per run: the runtime asks for every task
def _digest(package: Any) -> str:
    """The code package's content address (a cache key, as the datastore's own)."""
    return hashlib.sha1(compat.package_blob(package)).hexdigest()


@functools.cache  # once per run: the runtime asks for every task
def _package_files(package: Any, bytecode: bool, share: bool) -> tuple[str | None, str, str, list[str], dict[str, str]]:
    """A tarball package is unpacked once per package on this machine: into a directory every
    sandbox mounts read-only (``share``: the backend shares this machine's directories), else into
    an archive the sandbox extracts in the same pass as the inputs; other formats travel as they
    are. The cache entry stays in use (never evicted) while this runtime lives."""
    blob = compat.package_blob(package)
    digest = _digest(package)
    pkg_metadata = compat.package_metadata(package)
    extract, extract_env = compat.extract_commands(pkg_metadata, "job.tar")
    cache = code_cache.cache_dir()
    if not compat.package_is_tar(pkg_metadata):
        return None, "", staging.cached_package(digest, lambda: blob, cache), extract, extract_env
    if share:
        code_dir = staging.cached_code_directory(digest, lambda: blob, cache, bytecode=bytecode)
        return None, code_dir, "", extract, extract_env
    return staging.cached_code_archive(digest, lambda: blob, cache, bytecode=bytecode), "", "", extract, extract_env


def _include_file_dir(flow: str) -> str:
    """Where IncludeFile keeps this flow's files on the launcher (the task reads them by path)."""
    from metaflow.plugins.datatools.local import Local

    root = Local.get_root_from_config(lambda *args, **kwargs: None, create_on_absent=False)
    return os.path.join(root, flow) if root else ""
