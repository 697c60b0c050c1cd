"""Backend options, declared once per backend: typed, coerced from strings, defaulted from the
environment, and checked before any sandbox exists.

Layer: core (bottom). Imports: the standard library and ``core.errors``.

A backend lists its options as ``Option`` records in ``SandboxBackend.options``; ``get_backend``
resolves what the caller gave against them (``resolve``) and passes the result to the backend's
constructor, which then only checks what no declaration can say (a key with a token, say). For
every option, in this order: the value given (a string from ``--with`` or a decorator is coerced to
the option's type), ``METAFLOW_SANDBOX_<BACKEND>_<OPTION>``, the provider's own variables
(``Option.env``), the default. The docs' option tables are made from the same records
(``markdown_table``), so they cannot drift.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


@dataclass(frozen=True)
class Option:
    """One option of a backend.

    ``kind`` is ``str``, ``int``, ``float`` or ``bool``; ``default`` ``None`` means "unset" (the
    backend decides); ``env`` names the provider's own variables, read after ours; ``secret``
    marks a credential (never taken from a decorator, which Metaflow persists); ``choices`` and
    ``positive`` restrict the value.
    """

    name: str
    kind: type = str
    default: Any = None
    help: str = ""
    env: tuple[str, ...] = ()
    secret: bool = False
    choices: tuple[str, ...] = ()
    positive: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise TypeError(f"Option {self.name!r}: kind must be one of str, int, float, bool.")

    def variables(self, backend: str) -> tuple[str, ...]:
        """The environment variables this option is read from, in order."""
        return (f"METAFLOW_SANDBOX_{backend.upper()}_{self.name.upper()}", *self.env)

    def coerce(self, value: Any, source: str) -> Any:
        """``value`` as this option's kind; ``source`` says where it came from, for the error."""
        if value is None:
            return None
        try:
            result = _coerce(self.kind, value)
        except (TypeError, ValueError):
            raise ConfigurationError(f"{source}: {self.name}={value!r} must be {_KINDS[self.kind]}.") from None
        if self.choices and result not in self.choices:
            raise ConfigurationError(f"{source}: {self.name}={value!r} must be one of {', '.join(self.choices)}.")
        if self.positive and result <= 0:
            raise ConfigurationError(f"{source}: {self.name}={value!r} must be positive.")
        return result


def _coerce(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ValueError(value)
    if isinstance(value, bool):  # True is an int to Python, never a number to a user
        raise TypeError(value)
    if kind is int:
        number = float(value) if isinstance(value, str) else value
        if not isinstance(number, (int, float)) or number != int(number):
            raise ValueError(value)
        return int(number)
    if kind is float:
        if not isinstance(value, (int, float, str)):
            raise TypeError(value)
        return float(value)
    if isinstance(value, os.PathLike):  # a path is a string option's value too
        return os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def resolve(
    backend: str, declared: Sequence[Option], given: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Every declared option's value (see the module docstring); unknown ones are refused, naming
    the valid ones."""
    environ = os.environ if environ is None else environ
    known = {option.name: option for option in declared}
    unknown = sorted(set(given) - set(known))
    if unknown:
        valid = ", ".join(sorted(known)) or "none"
        raise ConfigurationError(
            f"Unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for the "
            f"{backend!r} sandbox backend.",
            remedy=f"Its options are: {valid}.",
        )
    resolved = {}
    for option in declared:
        if given.get(option.name) is not None:
            resolved[option.name] = option.coerce(given[option.name], f"The {backend} backend's option")
            continue
        variable = next((name for name in option.variables(backend) if environ.get(name)), None)
        if variable is not None:
            resolved[option.name] = option.coerce(environ[variable], f"${variable}")
        else:
            resolved[option.name] = option.default
    return resolved


def secret_variables(backend: str, declared: Sequence[Option]) -> dict[str, str]:
    """Credential options, each with the environment variable to set instead (the provider's own
    where it has one)."""
    return {o.name: (o.env or o.variables(backend))[0] for o in declared if o.secret}


def markdown_table(backend: str, declared: Sequence[Option]) -> str:
    """The options as the docs show them (``docs/configuration.md`` embeds this table)."""
    rows = ["| option | type | default | environment | meaning |", "|---|---|---|---|---|"]
    for o in declared:
        kind = " / ".join(f"`{c}`" for c in o.choices) if o.choices else o.kind.__name__
        default = "—" if o.default is None else f"`{o.default}`"
        variables = ", ".join(f"`{v}`" for v in o.variables(backend))
        meaning = o.help + (" **Credential: environment only in flows.**" if o.secret else "")
        rows.append(f"| `{o.name}` | {kind} | {default} | {variables} | {meaning} |")
    return "\n".join(rows)
