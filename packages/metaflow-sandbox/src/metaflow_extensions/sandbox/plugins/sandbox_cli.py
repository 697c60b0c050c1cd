"""``python flow.py sandbox list|kill|doctor``: find and destroy the sandboxes of a flow by their labels;
check that the backends its steps use work here. ``list`` and ``kill`` ask every backend the flow's
steps use, with their options; a backend that fails is one line naming the fix, and exit status 1.

Layer: plugins (a CLI group next to the decorator; the task itself runs through ``reroute`` and
``launcher``). Imports: metaflow, the core registry and doctor, ``plugins.metadata``, ``plugins.doctor``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

from metaflow import util
from metaflow._vendor import click

from metaflow_extensions.sandbox.core import SandboxError, default_backend, get_backend

from .kills import mark_killed
from .metadata import selector


@click.group()
def cli() -> None:
    pass


@cli.group(help="Commands related to sandboxes (@sandbox, @daytona, @e2b).")
def sandbox() -> None:
    pass


class _Backends:
    """The backends ``list``/``kill`` ask, with their options: ``--backend``, else those the flow's
    steps use (``@daytona(options=...)`` included), else the default. A backend that cannot be
    constructed or asked is reported in one line naming the fix (never a traceback) and skipped;
    the command then exits 1."""

    def __init__(self, ctx: Any, backend: str | None, what: str):
        from .doctor import flow_backends

        self.ctx, self.what, self.failed = ctx, what, False
        default = default_backend()
        self.wanted = {backend: {}} if backend else flow_backends(ctx.obj.flow, default) or {default: {}}

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        for name, options in self.wanted.items():
            try:
                impl = get_backend(name, **options)
            except Exception as e:  # SandboxError names the fix; anything else still gets one line
                self.report(name, e)
                continue
            yield name, impl

    def listed(self, name: str, impl: Any, labels: dict[str, str]) -> list[Any]:
        try:
            return list(impl.list(labels))
        except Exception as e:  # one line per backend, never a traceback
            self.report(name, e)
            return []

    def report(self, name: str, error: Exception) -> None:
        if isinstance(error, SandboxError):
            detail = str(error)
        else:  # a provider's own exception the backend did not translate
            detail = f"{type(error).__name__}: {error}. Check its credentials and URL: `python flow.py sandbox doctor`."
        self.ctx.obj.echo_always(f"sandbox {self.what}: backend {name!r}: {detail}", err=True)
        self.failed = True

    def finish(self, any_found: bool) -> None:
        if not any_found:
            self.ctx.obj.echo("No live sandboxes.")
        if self.failed:
            sys.exit(1)


@sandbox.command("list", help="List live sandboxes of this flow (all runs, or one with --run-id).")
@click.option("--run-id", default=None, help="Only sandboxes of this run.")
@click.option("--my-runs", is_flag=True, default=False, help="Only sandboxes started by me.")
@click.option("--backend", default=None, help="The backend to ask (default: those the flow's steps use).")
@click.pass_context
def list_sandboxes(ctx: Any, run_id: str | None, my_runs: bool, backend: str | None) -> None:
    user = util.get_username() if my_runs else None
    any_found = False
    backends = _Backends(ctx, backend, "list")
    for name, impl in backends:
        for info in backends.listed(name, impl, selector(ctx.obj.flow.name, run_id, user)):
            any_found = True
            label = {k.removeprefix("metaflow-"): v for k, v in info.labels.items()}
            where = f"{label.get('run')}/{label.get('step')}/{label.get('task')}"
            ctx.obj.echo_always(
                f"{info.backend}:{info.id}  {where} attempt {label.get('attempt')} (user {label.get('user')})"
            )
    backends.finish(any_found)


@sandbox.command(
    help="Destroy live sandboxes of this flow (all runs, or one with --run-id). A task whose sandbox "
    "is destroyed ends as killed: it is not retried."
)
@click.option("--run-id", default=None, help="Only sandboxes of this run.")
@click.option("--my-runs", is_flag=True, default=False, help="Only sandboxes started by me.")
@click.option("--backend", default=None, help="The backend to ask (default: those the flow's steps use).")
@click.pass_context
def kill(ctx: Any, run_id: str | None, my_runs: bool, backend: str | None) -> None:
    user = util.get_username() if my_runs else None
    any_found = False
    backends = _Backends(ctx, backend, "kill")
    for name, impl in backends:
        for info in backends.listed(name, impl, selector(ctx.obj.flow.name, run_id, user)):
            any_found = True
            # Before destroying: the task's launcher then ends the attempt as killed, not as a failure.
            mark_killed(info.backend, info.id)
            try:
                impl.destroy(info.id)
            except Exception as e:
                backends.report(name, e)
                continue
            ctx.obj.echo_always(f"Destroyed {info.backend}:{info.id}")
    backends.finish(any_found)


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
