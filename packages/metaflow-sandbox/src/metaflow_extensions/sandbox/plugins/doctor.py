"""The Metaflow integration's part of the doctor: Metaflow's version and datastore, the extension
loaded, and which backends a flow's steps use.

Layer: plugins (called by ``metaflow-sandbox doctor`` through the entry point group
``metaflow_sandbox.doctor``, and by ``flow.py sandbox doctor``). Imports: metaflow (inside
functions: the console script needs none of it until it runs these checks), ``core.doctor``.
"""

from __future__ import annotations

import importlib.metadata
import json
from typing import Any

from metaflow_extensions.sandbox.core.doctor import Finding, requirement_findings

DISTRIBUTION = "metaflow-sandbox"
FAMILY = ("sandbox", "daytona", "e2b")


def metaflow_findings(datastore_type: str | None = None) -> list[Finding]:
    """Metaflow installed in the supported range, our decorators loaded, and a datastore @sandbox supports.

    ``datastore_type``: the flow's (``flow.py sandbox doctor``); else Metaflow's default.
    """
    findings = requirement_findings(DISTRIBUTION, "metaflow-sandbox")
    try:
        from metaflow.plugins import STEP_DECORATORS
    except ImportError as e:
        fix = "pip install 'metaflow>=2.12,<2.20'"
        return [*findings, Finding("metaflow: extension", "fail", f"metaflow cannot be imported: {e}", fix)]
    loaded = sorted({deco.name for deco in STEP_DECORATORS} & set(FAMILY))
    if loaded == sorted(FAMILY):
        version = importlib.metadata.version(DISTRIBUTION)
        findings.append(Finding("metaflow: extension", "ok", f"@sandbox, @daytona, @e2b from {DISTRIBUTION} {version}"))
    else:
        fix = (
            "pip uninstall -y metaflow-sandbox, then install ours again (docs/migrating.md); "
            "METAFLOW_DEBUG_EXT=1 python -c 'import metaflow' lists the extensions Metaflow loads"
        )
        findings.append(Finding("metaflow: extension", "fail", f"Metaflow loaded {loaded or 'none'} of {FAMILY}", fix))
    if datastore_type is None:
        from metaflow.metaflow_config import DEFAULT_DATASTORE

        datastore_type = str(DEFAULT_DATASTORE)
    from .datastores import REMOTE_SUPPORTED

    if datastore_type == "local":
        findings.append(Finding("metaflow: datastore", "ok", "local (the launcher relays each task's data)"))
    elif datastore_type in REMOTE_SUPPORTED:
        detail = f"{datastore_type} (sandboxed tasks read and write it themselves: the direct data path)"
        findings.append(Finding("metaflow: datastore", "ok", detail))
    else:
        supported = ", ".join(("local", *REMOTE_SUPPORTED))
        fix = "run with --datastore=local or --datastore=s3, or set METAFLOW_DEFAULT_DATASTORE to one of them"
        detail = f"{datastore_type}: @sandbox supports {supported}"
        findings.append(Finding("metaflow: datastore", "fail", detail, fix))
    return findings


def flow_backends(flow: Any, default: str) -> dict[str, dict[str, Any]]:
    """The backends (with their options) of the sandbox decorators on ``flow``'s steps, ``--with`` included."""
    found: dict[str, dict[str, Any]] = {}
    for step in flow:
        for deco in getattr(step, "decorators", []):
            if deco.name not in FAMILY:
                continue
            name = getattr(deco, "alias_of", None) or deco.attributes.get("backend") or default
            options = deco.attributes.get("options") or {}
            if isinstance(options, str):  # --with sandbox:options={...} may arrive unparsed
                options = json.loads(options)
            found.setdefault(str(name), {}).update({str(k): str(v) for k, v in options.items()})
    return found
