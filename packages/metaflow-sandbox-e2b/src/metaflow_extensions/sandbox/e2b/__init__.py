"""metaflow-sandbox-e2b: the ``e2b`` backend of metaflow-sandbox (sandboxes on https://e2b.dev).

Layer: e2b backend. Imports: core and this package; the ``e2b`` SDK only lazily, inside functions.

    from metaflow_extensions.sandbox.core import get_backend, SandboxSpec
    with get_backend("e2b").create(SandboxSpec(labels={"owner": "me"})) as sbx:
        print(sbx.run("uname -a").stdout)
"""

from .backend import WORKDIR, E2BBackend, E2BResourceWarning, E2BSandbox

__all__ = ["WORKDIR", "E2BBackend", "E2BResourceWarning", "E2BSandbox"]
