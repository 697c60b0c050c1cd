"""``python flow.py sandbox list|kill``: find and destroy the sandboxes of a flow by their labels.

Layer: plugins (a CLI group next to the decorator; the task itself runs through ``launch`` and
``launcher``). Imports: metaflow, the core registry, ``plugins.metadata``.
"""

from __future__ import annotations

import os
from typing import Any

from metaflow import util
from metaflow._vendor import click

from metaflow_extensions.sandbox.core import SandboxError, get_backend

from .exceptions import SandboxException
from .metadata import selector


@click.group()
def cli() -> None:
    pass


@cli.group(help="Commands related to sandboxes (@sandbox, @daytona, @e2b).")
def sandbox() -> None:
    pass


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
