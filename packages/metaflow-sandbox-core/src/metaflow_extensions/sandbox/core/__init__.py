"""metaflow-sandbox-core: run commands in sandboxes through one API, whatever the provider.

Layer: core (bottom). Imports: the standard library only; never Metaflow, never a provider SDK.

    from metaflow_extensions.sandbox.core import get_backend, SandboxSpec, Resources
    with get_backend("local").create(SandboxSpec(env={"A": "1"})) as sbx:
        print(sbx.run("echo $A").stdout)
"""

from .backend import (
    LEASE_ENV,
    OWNER_LABEL,
    Sandbox,
    SandboxBackend,
    cancellable,
    destroy_all_live,
    lease_s,
    owned_labels,
)
from .errors import (
    AuthenticationError,
    BackendNotFound,
    CommandTimeout,
    ConfigurationError,
    ImageError,
    QuotaExceeded,
    SandboxError,
    SandboxFileNotFound,
    SandboxUnavailable,
    TransientError,
)
from .options import Option
from .registry import BACKEND_ENV, ENTRY_POINT_GROUP, available_backends, backend_class, default_backend, get_backend
from .spec import CommandResult, Resources, SandboxInfo, SandboxSpec

__all__ = [
    "BACKEND_ENV",
    "ENTRY_POINT_GROUP",
    "LEASE_ENV",
    "OWNER_LABEL",
    "AuthenticationError",
    "BackendNotFound",
    "CommandResult",
    "CommandTimeout",
    "ConfigurationError",
    "ImageError",
    "Option",
    "QuotaExceeded",
    "Resources",
    "Sandbox",
    "SandboxBackend",
    "SandboxError",
    "SandboxFileNotFound",
    "SandboxInfo",
    "SandboxSpec",
    "SandboxUnavailable",
    "TransientError",
    "available_backends",
    "backend_class",
    "cancellable",
    "default_backend",
    "destroy_all_live",
    "get_backend",
    "lease_s",
    "owned_labels",
]
