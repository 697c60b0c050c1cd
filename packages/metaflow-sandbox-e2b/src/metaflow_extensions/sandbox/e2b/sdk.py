"""Finding the E2B SDK (``e2b``), in the range this distribution declares for it.

Layer: e2b backend. Imports: the standard library and core (``provider``). The SDK is imported
here, lazily, never at module import time, so that ``metaflow_extensions.sandbox`` loads without it.

The range is the one in this package's ``pyproject.toml`` (``e2b>=2.7,<3``: 2.7 added
``E2B_SANDBOX_URL``, 3.x does not exist yet), read from its installed metadata.
"""

from __future__ import annotations

import functools
from types import ModuleType

from metaflow_extensions.sandbox.core.provider import SdkSpec, load_sdk

SDK = SdkSpec(backend="e2b", dist="metaflow-sandbox-e2b", modules={"e2b": "e2b"}, title="E2B SDK")


@functools.cache
def sdk_and_version() -> tuple[ModuleType, str]:
    """The ``e2b`` module and its version; ``ConfigurationError`` naming the install command."""
    return load_sdk(SDK)


def sdk() -> ModuleType:
    """The ``e2b`` module (see ``sdk_and_version``)."""
    return sdk_and_version()[0]
