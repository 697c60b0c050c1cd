"""The one bash script a sandbox runs for a task: unpack the inputs and code, set up the datastore,
run ``flow.py step``, pack the outputs, exit with the task's code.

Layer: plugins (used by ``executor``). Imports: ``plugins.staging``, ``plugins.environments``,
``plugins.request`` and the
standard library — never metaflow.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping

from . import environments, staging
from .request import TaskRequest

SETUP_FAILED = "__MFSBX_SETUP_FAILED__"
MARK = "__MFSBX_T__"  # phase timestamps, printed only when timings are on
CODE_DIR = "__MFSBX_CODE_DIR__"  # where the code was unpacked, to map tracebacks back to the flow's files
TIMINGS_ENV = "METAFLOW_SANDBOX_TIMINGS"
MARKER = "mfsbx/marker"
SECRETS_FILE = "mfsbx/secrets.env"  # credentials, sourced then deleted before the task starts


def script(req: TaskRequest, *, environment_reused: bool = False) -> str:
    """The one bash command run in the sandbox: unpack, run the task, pack outputs, exit with the
    task's code. ``environment_reused``: the environment an earlier task built was uploaded
    (``environments``); else a task that builds one packs it for the launcher."""

    def fail(what: str) -> str:
        return f'{{ echo "{SETUP_FAILED} {what}" >&2; exit 97; }}'

    # Metaflow's own variables, whose values expand $PWD: double quotes on purpose.
    exports = "".join(f'export {k}="{v}"; ' for k, v in req.extract_env.items())
    extract = " && ".join(req.extract_commands)
    inline = req.code_tar is not None or bool(req.code_dir)  # no job.tar: the code is in place or in.tar's
    unpack_code = (
        "cd code"
        if inline
        else f"mkdir -p code && cd code && {{ {extract.replace('job.tar', '../' + staging.PACKAGE_MEMBER)}; }} "
        f"|| {fail('unpacking the code package failed')}"
    )
    dirs = environments.BUILT_DIRS.get(req.environment, ())
    unpack_env, pack_env = environments.shell(req.environment_cache, environment_reused, dirs)
    return "\n".join(
        [
            f'mark() {{ [ -n "${{{TIMINGS_ENV}:-}}" ] && echo "{MARK} $1 $(date +%s%N)" >&2; true; }}',
            "mark start",
            f"{staging.unpack_command(inline_code=inline)} || {fail('unpacking the task inputs failed')}",
            "mark unpack_inputs",
            unpack_code,
            f"{_datastore_setup(req)} && {exports}touch ../{MARKER}",
            f'echo "{CODE_DIR} $PWD" >&2',
            "mark unpack_code",
            *(
                [f"{unpack_env} || {fail('unpacking the environment an earlier task built failed')}"]
                if unpack_env
                else []
            ),
            f"( {req.step_command} )",
            "c=$?",
            "mark step",
            *([pack_env] if pack_env else []),
            "cd ..",
            _pack_outputs(req),
            "mark pack_outputs",
            "exit $c",
        ]
    )


def _datastore_setup(req: TaskRequest) -> str:
    """Shell run in the code directory before the task."""
    # Credentials (S3, the metadata service's headers) come as a file, not the command's
    # environment: some backends send the environment as part of the command text, which
    # providers keep (and list) with the sandbox.
    secrets = f"set -a && . ../{SECRETS_FILE} && set +a && rm -f ../{SECRETS_FILE} && " if req.secret_env else ""
    if req.data_path == "direct":
        # Local metadata (if any) stays in the sandbox's own directory, never a parent's `.metaflow`;
        # the task sends it through the datastore (see the decorator's ``task_finished``).
        setup = f'{secrets}export METAFLOW_DATASTORE_SYSROOT_LOCAL="$PWD"'
        if req.code_tar is None and req.metadata_root:
            # Without inline code the unpack step skipped code/ members: the run's metadata is one.
            setup = f"tar -x -f ../{staging.IN_ARCHIVE} --strip-components=1 --wildcards 'code/*' && {setup}"
        return setup
    # Metaflow finds the card root (and a default datastore) in `.metaflow`, walking up from the
    # code directory (before 2.13 only there). A shared, read-only code directory has its own
    # `.metaflow` -> `../.metaflow` (``staging.code_directory``); the target is this sandbox's.
    link = f"ln -sfn {shlex.quote(req.location.root)} ../.metaflow"
    return f"{secrets}{link} && {{ [ -L .metaflow ] || ln -s ../.metaflow .metaflow; }}"


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
    return f"{staging.pack_command(req.location, MARKER, req.attempt)} || echo 'packing the task outputs failed' >&2"
