"""metaflow-sandbox-modal: the ``modal`` backend of metaflow-sandbox (Modal Sandboxes, https://modal.com).

Layer: modal backend. Imports: core and this package; the ``modal`` SDK only lazily, inside functions.

    from metaflow_extensions.sandbox.core import get_backend, SandboxSpec
    with get_backend("modal").create(SandboxSpec(labels={"owner": "me"})) as sbx:
        print(sbx.run("uname -a").stdout)
"""

from .backend import WORKDIR, ModalBackend, ModalSandbox

__all__ = ["WORKDIR", "ModalBackend", "ModalSandbox"]
