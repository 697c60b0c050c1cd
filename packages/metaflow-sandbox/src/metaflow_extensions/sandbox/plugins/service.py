"""The metadata service for sandboxed tasks, runtime side: the service's settings, and which way a
task's metadata reaches it.

Layer: plugins (bottom of the integration: used by ``reroute`` in the runtime process, never inside
a sandbox). Imports: ``plugins.exceptions`` and metaflow's configuration lazily.

Two metadata paths, chosen per task (``metadata_path``), overridable with
``METAFLOW_SANDBOX_METADATA_PATH=direct|relay``:

- *direct*: the task in the sandbox talks to ``METAFLOW_SERVICE_URL`` itself (and its heartbeat
  sidecar too), as with ``@batch``. The service's headers (``METAFLOW_SERVICE_HEADERS``, with
  ``METAFLOW_SERVICE_AUTH_KEY`` as ``x-api-key``) reach the sandbox as a file its shell sources and
  deletes, like the S3 credentials.
- *relay*: the task runs with ``--metadata local`` in the sandbox; the launcher heartbeats for it and
  replays its metadata afterwards (``service_relay``). Nothing of the service enters the sandbox.
- default (``auto``): relay when the sandbox has no network, or when the URL is loopback and the
  backend is not ``local`` (a provider's sandbox cannot reach this machine's loopback; a ``local``
  sandbox with the network on shares the host's); direct otherwise.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field
from urllib.parse import urlparse

from .exceptions import SandboxException

PATHS = ("auto", "direct", "relay")
PATH_ENV = "METAFLOW_SANDBOX_METADATA_PATH"


@dataclass(frozen=True)
class ServiceTask:
    """How one task's metadata reaches the service."""

    path: str  # "direct" or "relay"
    url: str
    headers: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """Direct path: the configuration (no secrets) the task needs in the sandbox."""
        return {"METAFLOW_DEFAULT_METADATA": "service", "METAFLOW_SERVICE_URL": self.url}

    def secret_env(self) -> dict[str, str]:
        """Direct path: the headers, for the sourced secrets file (Metaflow reads the variable as JSON)."""
        return {"METAFLOW_SERVICE_HEADERS": json.dumps(self.headers)} if self.headers else {}


def settings() -> tuple[str, dict[str, str]]:
    """(URL, headers) of the service as the runtime's Metaflow configuration gives them."""
    from metaflow import metaflow_config as config

    url = str(getattr(config, "SERVICE_URL", None) or "")
    if not url:
        raise SandboxException(
            "--metadata=service needs the service's URL: set METAFLOW_SERVICE_URL (or SERVICE_URL in your "
            "Metaflow profile)."
        )
    headers = {str(k): str(v) for k, v in dict(getattr(config, "SERVICE_HEADERS", None) or {}).items()}
    return url, headers


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def requested_path(network: bool, requested: str | None = None) -> str:
    """The requested metadata path (``requested``, else ``METAFLOW_SANDBOX_METADATA_PATH``), checked
    against the step's network; a SandboxException naming the fix. Called before the run too."""
    choice = (requested if requested is not None else os.environ.get(PATH_ENV, "auto")).strip().lower() or "auto"
    if choice not in PATHS:
        raise SandboxException(f"{PATH_ENV}={choice!r} must be one of {', '.join(PATHS)}.")
    if choice == "direct" and not network:
        raise SandboxException(
            f"{PATH_ENV}=direct needs the sandbox's network, but the step has @sandbox(network=False). "
            f"Unset {PATH_ENV} (the task's metadata is then relayed by the launcher)."
        )
    return choice


def metadata_path(url: str, backend: str, network: bool, requested: str | None = None) -> str:
    """``direct`` or ``relay`` for a task (see the module docstring), or a SandboxException naming the fix."""
    choice = requested_path(network, requested)
    if choice != "auto":
        return choice
    if not network or (is_loopback(url) and backend != "local"):
        return "relay"
    return "direct"


def for_task(backend: str, network: bool, *, data_relayed: bool = False) -> ServiceTask:
    """``data_relayed``: the task's data is relayed from a remote datastore; its metadata is then
    relayed too (the launcher rewrites the mirror's datastore names in it, see ``relay``)."""
    url, headers = settings()
    path = "relay" if data_relayed else metadata_path(url, backend, network)
    return ServiceTask(path, url, headers)
