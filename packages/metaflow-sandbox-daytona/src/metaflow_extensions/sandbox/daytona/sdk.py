"""Finding the Daytona SDK: ``daytona``, or its deprecated alias ``daytona-sdk`` (``daytona_sdk``).

Layer: backend. Imports: the standard library and core (``errors``).

Both distributions ship the same code under two import names; whichever is installed works. The
SDK is imported here, lazily, never at module import time, so that ``metaflow_extensions.sandbox``
loads without it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from types import ModuleType

from metaflow_extensions.sandbox.core import ConfigurationError

OLDEST = (0, 150)
"""The oldest SDK release supported: the first to route toolbox calls through ``toolboxProxyUrl``."""

INSTALL = "pip install metaflow-sandbox-daytona"
_DISTRIBUTIONS = {"daytona": "daytona", "daytona_sdk": "daytona-sdk"}


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def load_sdk() -> tuple[ModuleType, str]:
    """The SDK module and its version; ``ConfigurationError`` naming the fix when it is missing or too old."""
    for module_name, dist in _DISTRIBUTIONS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                continue  # not installed under this name: try the alias
            raise ConfigurationError(
                f"The Daytona SDK ({module_name}) is installed but cannot be imported: {e}.",
                remedy=f"Reinstall it: pip install --force-reinstall {dist}",
            ) from e
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "0"
        if _version_tuple(version) < OLDEST:
            oldest = ".".join(map(str, OLDEST))
            raise ConfigurationError(
                f"The daytona backend needs {dist} >= {oldest}; {version} is installed.",
                remedy=f"Upgrade it: pip install -U 'daytona>={oldest}'",
            )
        return module, version
    raise ConfigurationError(
        "The daytona sandbox backend needs the Daytona SDK, which is not installed.", remedy=f"Install it: {INSTALL}"
    )
