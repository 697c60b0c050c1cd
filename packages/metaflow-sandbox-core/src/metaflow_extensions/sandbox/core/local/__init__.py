"""The ``local`` backend: sandboxes on this machine, isolated by bubblewrap when available.

Layer: core/local. Imports: the standard library and core.
"""

from .backend import LocalBackend, LocalSandbox
from .isolation import ISOLATION_ENV, IsolationWarning

__all__ = ["ISOLATION_ENV", "IsolationWarning", "LocalBackend", "LocalSandbox"]
