"""What a sandbox should be (``SandboxSpec``) and what a command returned (``CommandResult``).

Layer: core (bottom). Imports: the standard library and ``core.errors``.

Plain frozen dataclasses, validated on construction so that bad input fails before any sandbox
is created, with a message that names the parameter to fix.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .errors import ConfigurationError

# What POSIX shells accept as a variable name. Backends build ``export NAME=...`` lines: a name
# outside this set would be shell code (``X; rm -rf ~; Y``), so it never reaches a backend.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _frozen_str_map(value: Mapping[str, str] | None, what: str) -> Mapping[str, str]:
    items = dict(value or {})
    for key, val in items.items():
        if not isinstance(key, str) or not isinstance(val, str):
            raise ConfigurationError(f"{what} must map strings to strings; got {key!r}: {val!r}.")
    return MappingProxyType(items)


def check_env(env: Mapping[str, str], what: str) -> Mapping[str, str]:
    """``env`` frozen, once every name is a shell identifier and every value a string without NUL."""
    frozen = _frozen_str_map(env, what)
    for name, value in frozen.items():
        if not _ENV_NAME.fullmatch(name):
            raise ConfigurationError(
                f"{what}: {name!r} is not a valid environment variable name.",
                remedy="Use letters, digits and underscores only, not starting with a digit.",
            )
        if "\0" in value:
            raise ConfigurationError(f"{what}: the value of {name} holds a NUL character, which no environment can.")
    return frozen


def _read_only_dirs(value: Mapping[str, str]) -> Mapping[str, str]:
    """``value`` frozen, once every key is a plain relative path and every value an absolute one."""
    frozen = _frozen_str_map(value, "SandboxSpec.read_only_dirs")
    for inside, host in frozen.items():
        parts = inside.split("/")
        if not inside or inside.startswith("/") or posixpath.normpath(inside) != inside or ".." in parts:
            raise ConfigurationError(
                f"SandboxSpec.read_only_dirs: {inside!r} is not a plain path relative to the working directory.",
                remedy="Use a relative path without '..', such as 'code' or 'lib/shared'.",
            )
        if not posixpath.isabs(host):
            raise ConfigurationError(f"SandboxSpec.read_only_dirs[{inside!r}]: {host!r} is not an absolute path.")
    return frozen


@dataclass(frozen=True)
class Resources:
    """Requested compute. ``None`` leaves the choice to the backend (its default size)."""

    cpu: float | None = None
    memory_mb: int | None = None
    disk_mb: int | None = None
    gpu: int | None = None

    def __post_init__(self) -> None:
        for name in ("cpu", "memory_mb", "disk_mb", "gpu"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ConfigurationError(f"Resources.{name} must be a non-negative number or None; got {value!r}.")


@dataclass(frozen=True)
class SandboxSpec:
    """Everything a backend needs to create a sandbox.

    ``image`` is backend-specific (a container image, an E2B template...); ``None`` means the
    backend's default. ``env`` is set for every command; ``labels`` are attached to the sandbox so
    ``SandboxBackend.list`` can find it again. ``lifetime_s`` is a provider-side backstop: a sandbox
    whose owner vanished is removed after that long. ``network=False`` cuts outbound network access.

    ``read_only_dirs`` maps a path relative to the working directory to a directory of this
    machine whose files the sandbox sees there, read-only: many sandboxes share one copy (a code
    package unpacked once). Only backends whose ``shares_host_dirs`` is true honour it (the local
    backend, by a bind mount); another backend's ``create`` refuses it (``ConfigurationError``)
    before any sandbox exists, and its caller uploads the files itself.
    """

    image: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    lifetime_s: int = 3600
    network: bool = True
    read_only_dirs: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "env", check_env(self.env, "SandboxSpec.env"))
        object.__setattr__(self, "labels", _frozen_str_map(self.labels, "SandboxSpec.labels"))
        object.__setattr__(self, "read_only_dirs", _read_only_dirs(self.read_only_dirs))
        if not isinstance(self.lifetime_s, int) or isinstance(self.lifetime_s, bool) or self.lifetime_s <= 0:
            raise ConfigurationError(
                f"SandboxSpec.lifetime_s must be a positive integer (seconds); got {self.lifetime_s!r}."
            )
        if not isinstance(self.resources, Resources):
            raise ConfigurationError("SandboxSpec.resources must be a Resources instance.")


@dataclass(frozen=True)
class CommandResult:
    """A finished command. A non-zero ``exit_code`` is a result, not an error."""

    exit_code: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class SandboxInfo:
    """A live sandbox as ``SandboxBackend.list`` reports it."""

    id: str
    backend: str
    labels: Mapping[str, str]
