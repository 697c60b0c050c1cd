"""``python flow.py sandbox step|list|kill``: the launcher of a sandboxed task, and clean-up.

Layer: plugins (below the decorator: the runtime calls ``sandbox step`` through
``runtime_step_cli``). Imports: metaflow, the core API, ``plugins.executor``, ``plugins.staging``,
``plugins.metadata``, ``plugins.compat``.

``sandbox step`` rebuilds the real ``flow.py step ...`` command line (as ``batch step`` does), puts
what the task needs into a ``TaskRequest`` and hands it to the executor. SIGINT and SIGTERM destroy
the live sandbox before the launcher exits, so Ctrl-C leaves nothing running.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from typing import Any

from metaflow import util
from metaflow._vendor import click

from metaflow_extensions.sandbox.core import Resources, SandboxError, backend_class, destroy_all_live, get_backend

from .exceptions import SandboxException
from .metadata import selector, task_labels
from .sandbox_decorator import FAMILY

# An argument over ~128 KiB cannot go through ``bash -c``: long input paths travel in variables.
INPUT_PATHS_CHUNK = 30 * 1024


@click.group()
def cli() -> None:
    pass


@cli.group(help="Commands related to sandboxes (@sandbox, @daytona, @e2b).")
def sandbox() -> None:
    pass


def _sandbox_decorator(ctx: Any, step_name: str) -> Any:
    node = ctx.obj.graph[step_name]
    decos = [d for d in node.decorators if d.name in FAMILY and not getattr(d, "inert", False)]
    if not decos:
        raise SandboxException(f"Step *{step_name}* has no @sandbox decorator.")
    return decos[0]


def _install_signal_handlers() -> None:
    def handler(signum: int, _frame: Any) -> None:
        destroy_all_live()
        # Unwind (saving the captured logs on the way) and exit like a killed process.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _input_path_env(kwargs: dict[str, Any]) -> dict[str, str]:
    input_paths = kwargs.get("input_paths")
    if not input_paths:
        return {}
    chunks = {
        f"METAFLOW_INPUT_PATHS_{i // INPUT_PATHS_CHUNK}": input_paths[i : i + INPUT_PATHS_CHUNK]
        for i in range(0, len(input_paths), INPUT_PATHS_CHUNK)
    }
    kwargs["input_paths"] = "".join(f"${{{name}}}" for name in chunks)
    return chunks


def _include_file_dir(flow: str) -> str:
    """Where IncludeFile keeps this flow's files on the launcher (the task reads them by path)."""
    from metaflow.plugins.datatools.local import Local

    root = Local.get_root_from_config(lambda *args, **kwargs: None, create_on_absent=False)
    return os.path.join(root, flow) if root else ""


def _retry_delay(node: Any, retry_count: int) -> int:
    """``@retry(minutes_between_retries=...)`` is honoured before a sandboxed retry, as with @batch."""
    if not retry_count:
        return 0
    for deco in node.decorators:
        if deco.name == "retry":
            return int(float(deco.attributes.get("minutes_between_retries", 2)) * 60)
    return 0


@sandbox.command(help="Execute a single task in a sandbox (used internally by Metaflow).")
@click.argument("step-name")
@click.argument("code-package-sha")
@click.argument("code-package-metadata")
@click.option("--run-id", help="Passed to the top-level 'step'.")
@click.option("--task-id", help="Passed to the top-level 'step'.")
@click.option("--input-paths", help="Passed to the top-level 'step'.")
@click.option("--split-index", help="Passed to the top-level 'step'.")
@click.option("--clone-path", help="Passed to the top-level 'step'.")
@click.option("--clone-run-id", help="Passed to the top-level 'step'.")
@click.option("--tag", multiple=True, default=None, help="Passed to the top-level 'step'.")
@click.option("--namespace", default=None, help="Passed to the top-level 'step'.")
@click.option("--retry-count", default=0, help="Passed to the top-level 'step'.")
@click.option("--max-user-code-retries", default=0, help="Passed to the top-level 'step'.")
@click.option("--ubf-context", default=None, help="Passed to the top-level 'step'.")
@click.pass_context
def step(ctx: Any, step_name: str, code_package_sha: str, code_package_metadata: str, **kwargs: Any) -> None:
    from metaflow.mflog import TASK_LOG_SOURCE

    from . import compat, staging
    from .executor import TaskRequest, execute, say

    _install_signal_handlers()
    deco = _sandbox_decorator(ctx, step_name)
    node = ctx.obj.graph[step_name]
    flow_datastore = ctx.obj.flow_datastore
    pkg_metadata = "" if code_package_metadata == "-" else code_package_metadata
    run_id, task_id = kwargs["run_id"], kwargs["task_id"]
    attempt = int(kwargs.get("retry_count") or 0)

    delay = _retry_delay(node, attempt)
    if delay:
        say(f"Sleeping {delay // 60} minutes before the next sandbox retry (@retry minutes_between_retries).")
        time.sleep(delay)

    input_paths = util.decompress_list(kwargs["input_paths"]) if kwargs.get("input_paths") else []
    env = {
        "METAFLOW_USER": util.get_username() or "unknown",
        "METAFLOW_RUN_ID": run_id,
        "METAFLOW_FLOW_FILENAME": os.path.basename(sys.argv[0]),
        "PYTHONUNBUFFERED": "x",
        **_input_path_env(kwargs),
    }
    root = flow_datastore.datastore_root
    if os.path.basename(root.rstrip("/")) == ".metaflow":
        # IncludeFile and other config-derived local paths resolve from the system root.
        env["METAFLOW_DATASTORE_SYSROOT_LOCAL"] = os.path.dirname(root.rstrip("/"))
    # Cards: the client reads them from <ds-root>/mf.cards. In the sandbox, Metaflow finds the card
    # root by walking up from the working directory to a `.metaflow` (METAFLOW_CARD_LOCALROOT is
    # ignored up to 2.19: get_storage_root returns None when it is set), so the executor links
    # `.metaflow` in the code directory to the datastore root.
    card_root = os.path.join(root, "mf.cards")
    for other in node.decorators:
        if other.name == "environment":  # only set on the launcher otherwise
            env.update({k: str(v) for k, v in other.attributes["vars"].items()})
    env.update(deco.attributes["env"])

    executable = ctx.obj.environment.executable(step_name)
    top_args = " ".join(util.dict_to_cli_options(ctx.parent.parent.params))
    step_args = " ".join(util.dict_to_cli_options(kwargs))
    step_command = f"{executable} -u {os.path.basename(sys.argv[0])} {top_args} step {step_name} {step_args}"

    location = staging.TaskLocation(
        root=root, flow=ctx.obj.flow.name, run_id=run_id, step=step_name, task_id=task_id, card_root=card_root
    )
    datatools = _include_file_dir(location.flow)

    def load_package() -> bytes:
        return b"".join(blob for _key, blob in flow_datastore.load_data([code_package_sha]))

    extract, extract_env = compat.extract_commands(pkg_metadata, "job.tar")
    code_tar = None
    if compat.package_is_tar(pkg_metadata):
        # Unpacked once per package on this machine, shared by the run's tasks.
        cache = os.path.join(tempfile.gettempdir(), f"metaflow-sandbox-code-{os.getuid()}")
        bytecode = backend_class(deco.attributes["backend"]).runs_launcher_python
        code_tar = staging.cached_code_archive(code_package_sha, load_package, cache, bytecode=bytecode)
    attrs = deco.attributes
    req = TaskRequest(
        backend=attrs["backend"],
        backend_options=attrs["options"],
        step_command=step_command,
        location=location,
        input_paths=input_paths,
        package=b"" if code_tar else load_package(),
        extract_commands=extract,
        extract_env=extract_env,
        env=env,
        labels=task_labels(
            location.flow, run_id, step_name, task_id, attempt=attempt, user=util.get_username() or "unknown"
        ),
        hard_limit_s=deco.run_time_limit(node.decorators),
        image=attrs["image"],
        resources=Resources(cpu=attrs["cpu"], memory_mb=attrs["memory"], disk_mb=attrs["disk"], gpu=attrs["gpu"]),
        network=attrs["network"],
        extra_inputs=[datatools] if datatools and os.path.isdir(datatools) else [],
        code_tar=code_tar,
    )

    def save_logs(logs: dict[str, bytes]) -> None:
        task_ds = flow_datastore.get_task_datastore(run_id, step_name, task_id, attempt=attempt, mode="w")
        task_ds.save_logs(TASK_LOG_SOURCE, logs)

    sys.exit(execute(req, save_logs))


def _backend_for(name: str | None) -> Any:
    from .sandbox_decorator import BACKEND_ENV, DEFAULT_BACKEND

    try:
        return get_backend(name or os.environ.get(BACKEND_ENV) or DEFAULT_BACKEND)
    except SandboxError as e:
        raise SandboxException(str(e)) from e


@sandbox.command("list", help="List live sandboxes of this flow (all runs, or one with --run-id).")
@click.option("--run-id", default=None, help="Only sandboxes of this run.")
@click.option("--my-runs", is_flag=True, default=False, help="Only sandboxes started by me.")
@click.option("--backend", default=None, help="The backend to ask (default: METAFLOW_SANDBOX_BACKEND or local).")
@click.pass_context
def list_sandboxes(ctx: Any, run_id: str | None, my_runs: bool, backend: str | None) -> None:
    user = util.get_username() if my_runs else None
    found = _backend_for(backend).list(selector(ctx.obj.flow.name, run_id, user))
    if not found:
        ctx.obj.echo("No live sandboxes.")
    for info in found:
        label = {k.removeprefix("metaflow-"): v for k, v in info.labels.items()}
        where = f"{label.get('run')}/{label.get('step')}/{label.get('task')}"
        ctx.obj.echo_always(
            f"{info.backend}:{info.id}  {where} attempt {label.get('attempt')} (user {label.get('user')})"
        )


@sandbox.command(help="Destroy live sandboxes of this flow (all runs, or one with --run-id).")
@click.option("--run-id", default=None, help="Only sandboxes of this run.")
@click.option("--my-runs", is_flag=True, default=False, help="Only sandboxes started by me.")
@click.option("--backend", default=None, help="The backend to ask (default: METAFLOW_SANDBOX_BACKEND or local).")
@click.pass_context
def kill(ctx: Any, run_id: str | None, my_runs: bool, backend: str | None) -> None:
    user = util.get_username() if my_runs else None
    impl = _backend_for(backend)
    found = impl.list(selector(ctx.obj.flow.name, run_id, user))
    for info in found:
        impl.destroy(info.id)
        ctx.obj.echo_always(f"Destroyed {info.backend}:{info.id}")
    if not found:
        ctx.obj.echo("No live sandboxes.")
