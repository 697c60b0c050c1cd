"""metaflow-sandbox-daytona: the ``daytona`` sandbox backend, on the official Daytona SDK.

Layer: backend. Imports: core only (the SDK is imported lazily, when a backend is constructed).

    from metaflow_extensions.sandbox.core import get_backend, SandboxSpec
    with get_backend("daytona").create(SandboxSpec(image="python:3.11")) as sbx:
        print(sbx.run("python --version").stdout)
"""

from .backend import DaytonaBackend, DaytonaSandbox

__all__ = ["DaytonaBackend", "DaytonaSandbox"]
