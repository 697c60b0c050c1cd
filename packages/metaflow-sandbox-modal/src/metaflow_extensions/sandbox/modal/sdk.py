"""Finding the Modal SDK (``modal``), in the range this distribution declares for it.

Layer: modal backend. Imports: the standard library and core (``provider``). The SDK is imported
here, lazily, never at module import time, so that ``metaflow_extensions.sandbox`` loads without it.

The range is the one in this package's ``pyproject.toml`` (``modal>=1.5,<2``), read from its
installed metadata.
"""

from __future__ import annotations

import functools
from types import ModuleType

from metaflow_extensions.sandbox.core.provider import SdkSpec, load_sdk

SDK = SdkSpec(backend="modal", dist="metaflow-sandbox-modal", modules={"modal": "modal"}, title="Modal SDK")


@functools.cache
def sdk_and_version() -> tuple[ModuleType, str]:
    """The ``modal`` module and its version; ``ConfigurationError`` naming the install command."""
    return load_sdk(SDK)


def sdk() -> ModuleType:
    """The ``modal`` module (see ``sdk_and_version``)."""
    return sdk_and_version()[0]
