"""``python flow.py sandbox list|kill|doctor``: find and destroy the sandboxes of a flow by their labels;
check that the backends its steps use work here.

Layer: plugins (a CLI group next to the decorator; the task itself runs through ``reroute`` and
``launcher``). Imports: metaflow, the core registry and doctor, ``plugins.metadata``, ``plugins.doctor``.
"""

from __future__ import annotations

import sys
from typing import Any

from metaflow import util
from metaflow._vendor import click

from metaflow_extensions.sandbox.core import SandboxError, default_backend, get_backend

from .exceptions import SandboxException
from .metadata import selector


@click.group()
def cli() -> None:
    pass


@cli.group(help="Commands related to sandboxes (@sandbox, @daytona, @e2b).")
def sandbox() -> None:
    pass


def _backend_for(name: str | None) -> Any:

    try:
        return get_backend(name or default_backend())
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


@sandbox.command(
    "doctor",
    help="Check the backends this flow's steps use (or --backend): installed, configured, reachable, "
    "a sandbox created, run and destroyed; and Metaflow's version and datastore. Each problem comes "
    "with its fix; the exit status is 1 if there is one.",
)
@click.option("--backend", multiple=True, help="A backend to check instead of the flow's (repeatable).")
@click.pass_context
def doctor(ctx: Any, backend: tuple[str, ...]) -> None:
    from metaflow_extensions.sandbox.core.doctor import Finding, report, run_doctor

    from .doctor import flow_backends, metaflow_findings

    backends: dict[str, dict[str, Any]] = {name: {} for name in backend} or flow_backends(
        ctx.obj.flow, default_backend()
    )
    notes = []
    if not backends:
        backends = {default_backend(): {}}
        notes.append(Finding("flow", "info", f"no step of {ctx.obj.flow.name} uses @sandbox; checked the default"))
    findings = [*notes, *metaflow_findings(ctx.obj.flow_datastore.TYPE), *run_doctor(backends, extensions=False)]
    status = report(findings, lambda line: ctx.obj.echo_always(line, err=False))
    if status:
        sys.exit(status)
