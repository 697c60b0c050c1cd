"""Finding the Daytona SDK: ``daytona``, or its deprecated alias ``daytona-sdk`` (``daytona_sdk``).

Layer: backend. Imports: the standard library and core (``provider``).

Both distributions ship the same code under two import names; whichever is installed works. The
supported range is the one this distribution declares for ``daytona`` (``pyproject.toml``; 0.150 is
the first release routing toolbox calls through ``toolboxProxyUrl``). The SDK is imported here,
lazily, never at module import time, so that ``metaflow_extensions.sandbox`` loads without it.
"""

from __future__ import annotations

from types import ModuleType

from metaflow_extensions.sandbox.core.provider import SdkSpec
from metaflow_extensions.sandbox.core.provider import load_sdk as _load

SDK = SdkSpec(
    backend="daytona",
    dist="metaflow-sandbox-daytona",
    modules={"daytona": "daytona", "daytona_sdk": "daytona-sdk"},
    title="Daytona SDK",
)


def load_sdk() -> tuple[ModuleType, str]:
    """The SDK module and its version; ``ConfigurationError`` naming the fix when it is missing or
    outside the supported range."""
    return _load(SDK)
