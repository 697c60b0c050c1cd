"""The backend registry: names to ``SandboxBackend`` classes, through entry points.

Layer: core (bottom). Imports: the standard library, ``core.errors``, ``core.options`` and
``core.backend``.

Backends register in the entry point group ``metaflow_sandbox.backends`` as
``name = "module:Class"``; the built-in ``local`` backend registers the same way, so a third-party
backend is one ``pip install`` away. Classes load lazily, on first use.
"""

from __future__ import annotations

import importlib
import os
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .backend import SandboxBackend
from .errors import BackendNotFound, ConfigurationError
from .options import resolve

ENTRY_POINT_GROUP = "metaflow_sandbox.backends"
BACKEND_ENV = "METAFLOW_SANDBOX_BACKEND"
"""The user's choice of backend where a step names none (``@sandbox`` without ``backend=``)."""
DEFAULT_BACKEND = "local"

# Backends we know of, with the distribution that provides each: an uninstalled one gets an
# install command instead of a bare "unknown backend".
KNOWN_BACKENDS: dict[str, str] = {
    "daytona": "metaflow-sandbox-daytona",
    "e2b": "metaflow-sandbox-e2b",
    "local": "metaflow-sandbox-core",
}


def default_backend() -> str:
    """The backend a step gets when it names none: ``$METAFLOW_SANDBOX_BACKEND``, else ``local``."""
    return os.environ.get(BACKEND_ENV, "").strip() or DEFAULT_BACKEND


@cache
def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_backends() -> list[str]:
    """Names of the installed backends, sorted."""
    return sorted(_entry_points())


def backend_class(name: str) -> type[SandboxBackend]:
    """The class registered as ``name``, imported now; errors name the fix."""
    entry = _entry_points().get(name)
    if entry is None:
        installed = ", ".join(available_backends()) or "none"
        if name in KNOWN_BACKENDS:
            raise BackendNotFound(
                f"The sandbox backend {name!r} is not installed (installed: {installed}).",
                remedy=f"Install it with: pip install {KNOWN_BACKENDS[name]}",
            )
        raise BackendNotFound(
            f"Unknown sandbox backend {name!r}; installed backends: {installed}.",
            remedy=f"Third-party backends register in the entry point group {ENTRY_POINT_GROUP!r}.",
        )
    module_name, _, attr = entry.value.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        dist = KNOWN_BACKENDS.get(name, f"the distribution providing {name!r}")
        raise ConfigurationError(
            f"The sandbox backend {name!r} failed to import ({e}).",
            remedy=f"Reinstall it with: pip install --force-reinstall {dist}",
        ) from e
    if not (isinstance(cls, type) and issubclass(cls, SandboxBackend)):
        raise ConfigurationError(f"Entry point {name} = {entry.value!r} is not a SandboxBackend subclass.")
    return cls


def get_backend(name: str, **options: Any) -> SandboxBackend:
    """Construct the backend ``name`` with its backend-specific ``options``.

    Options are resolved against the backend's declaration (``core.options.resolve``): strings are
    coerced, unset ones come from ``METAFLOW_SANDBOX_<NAME>_<OPTION>`` or the provider's variables,
    unknown ones are refused. Raises ``ConfigurationError`` (never a provider exception) for an
    unknown name, a missing SDK, missing credentials or a bad option, before any sandbox is created.
    """
    cls = backend_class(name)
    if cls.options is not None:
        options = resolve(name, cls.options, options)
    try:
        return cls(**options)
    except TypeError as e:
        raise ConfigurationError(f"Bad option for the {name!r} sandbox backend: {e}.") from e
