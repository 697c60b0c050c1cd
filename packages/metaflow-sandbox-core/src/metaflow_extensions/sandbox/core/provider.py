"""The provider kit: what every backend built on a provider's SDK needs, written once.

Layer: core (bottom). Imports: the standard library, ``core.errors`` and ``core.retry``. Never an SDK: the
backend passes its SDK's exceptions in and gets core errors out.

- **Error translation** (``ErrorTable``): a backend declares an ordered table of ``ErrorRule``
  rows, each mapping what a provider exception shows (HTTP status, exception class names,
  message text, a broken transport) to a core error class. Whether the result is transient or
  final is the core class's ``transient``; the first row that matches wins.
- **Transport and status checks** (``Transport``, ``status_of``): the HTTP status behind an
  exception (attributes anywhere along its cause chain, or a pattern the provider's older SDKs
  print), and whether the provider could not be reached at all.
- **Paths** (``in_workdir``): a relative path of the core API made absolute against the working
  directory, for SDKs that take absolute paths only.
- **The supported SDK range** (``load_sdk``): read from the backend distribution's own
  ``Requires-Dist`` metadata, so the range lives in ``pyproject.toml`` only; a missing SDK names the
  SDK's own distribution and the range to install.

Retrying (``ErrorTable.call(..., retry=True)``), and reconciling an ambiguous create, is ``core.retry``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TypeVar

from .errors import ConfigurationError, SandboxError
from .retry import with_retries

T = TypeVar("T")

# -- exceptions: cause chains, statuses, transports ---------------------------------------------


def chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and everything it was raised from or while handling, each once."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]


def class_names(error: BaseException) -> list[str]:
    """The class names (with their bases) of every exception in ``error``'s chain."""
    return [cls.__name__ for current in chain(error) for cls in type(current).__mro__]


def status_of(error: BaseException, patterns: Sequence[re.Pattern[str]] = ()) -> int | None:
    """The HTTP status behind ``error``: a ``status_code``/``status`` attribute (or a ``response``'s)
    anywhere along its chain, else the first of ``patterns`` (group 1 or 2 is the status) that
    matches a message, for SDKs that only print it."""
    for current in chain(error):
        for value in (
            getattr(current, "status_code", None),
            getattr(current, "status", None),
            getattr(getattr(current, "response", None), "status_code", None),
        ):
            if isinstance(value, int) and 100 <= value < 600:
                return value
    for pattern in patterns:
        for current in chain(error):
            found = pattern.search(str(current))
            if found:
                return int(next(g for g in found.groups() if g))
    return None


@dataclass(frozen=True)
class Transport:
    """How a provider's SDK shows that no HTTP answer came at all (refused, reset, timed out).

    Any of: a ``ConnectionError``/``TimeoutError``, an exception class whose name contains one of
    ``names``, one raised from a module under ``modules``, a message containing one of ``texts``.
    """

    names: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()

    def failed(self, error: BaseException) -> bool:
        for current in chain(error):
            if isinstance(current, (ConnectionError, TimeoutError)):
                return True
            if any(type(current).__module__.startswith(module) for module in self.modules):
                return True
        names = class_names(error)
        if any(marker in name for name in names for marker in self.names):
            return True
        text = str(error).lower()
        return any(marker in text for marker in self.texts)


# -- the translation table ------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorRule:
    """One row: when every criterion given matches, the exception becomes ``error``.

    ``statuses``: the HTTP status is one of these (``range(500, 600)`` works); ``names``: a class in
    the exception's chain has one of these names; ``texts``: the lowercased message contains one of
    these; ``transport``: no HTTP status and the transport failed; ``contexts``: the call was made
    in one of these contexts (``translate(..., context=...)``, e.g. ``"create"``). Criteria left
    empty are not checked; at least one must be given. ``remedy`` says how to fix a final error;
    ``note`` is added to the message.
    """

    error: type[SandboxError]
    statuses: tuple[int, ...] | range = ()
    names: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()
    transport: bool = False
    contexts: tuple[str, ...] = ()
    remedy: str | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if not (self.statuses or self.names or self.texts or self.transport or self.contexts):
            raise TypeError(f"An ErrorRule for {self.error.__name__} needs at least one criterion.")


@dataclass(frozen=True)
class ErrorTable:
    """A provider's exceptions, translated to core errors by an ordered table of ``ErrorRule``.

    ``provider`` starts each message (``"Daytona: create failed: <the SDK's message>"``);
    ``status_patterns`` and ``transport`` say how its SDK shows statuses and broken connections;
    ``url_env`` is the variable that sets the API's URL, named when the API cannot be reached.
    """

    provider: str
    rules: tuple[ErrorRule, ...]
    transport: Transport = Transport()
    status_patterns: tuple[re.Pattern[str], ...] = ()
    url_env: str = ""

    def status_of(self, error: BaseException) -> int | None:
        return status_of(error, self.status_patterns)

    def is_transport(self, error: BaseException) -> bool:
        return self.transport.failed(error)

    def is_not_found(self, error: BaseException) -> bool:
        """A 404, or a ``...NotFound...`` exception class."""
        return self.status_of(error) == 404 or any("NotFound" in name for name in class_names(error))

    def match(self, error: BaseException, context: str = "") -> ErrorRule | None:
        """The first row matching ``error`` raised in ``context``, if any."""
        status = self.status_of(error)
        names = set(class_names(error))
        text = str(error).lower()
        transport: bool | None = None
        for rule in self.rules:
            if rule.contexts and context not in rule.contexts:
                continue
            if rule.statuses and status not in rule.statuses:
                continue
            if rule.names and not names.intersection(rule.names):
                continue
            if rule.texts and not any(t in text for t in rule.texts):
                continue
            if rule.transport:
                if transport is None:
                    transport = status is None and self.is_transport(error)
                if not transport:
                    continue
            return rule
        return None

    def translate(
        self,
        error: BaseException,
        doing: str,
        *,
        context: str = "",
        sandbox_id: str | None = None,
        endpoint: str | None = None,
    ) -> SandboxError:
        """The core error for ``error``, raised while ``doing`` (e.g. "create") in ``context``.

        Core errors pass through unchanged; an exception no row matches is a final
        ``SandboxError`` keeping the provider's message. ``endpoint``: the API's URL, for a call to
        the API; when no answer came at all the message says it is unreachable, naming the URL and
        ``url_env`` (not "<doing> failed").
        """
        if isinstance(error, SandboxError):
            return error
        shown = error or type(error).__name__
        message = f"{self.provider}: {doing} failed: {shown}"
        rule = self.match(error, context)
        if rule is None:
            return SandboxError(message, sandbox_id=sandbox_id)
        if endpoint and self.status_of(error) is None and self.is_transport(error):
            where = f" (${self.url_env})" if self.url_env else ""
            return rule.error(
                f"{self.provider}: the API at {endpoint}{where} cannot be reached while {doing}: {shown}",
                remedy=f"Check that {endpoint} is the right URL{where} and that this machine can reach it.",
                sandbox_id=sandbox_id,
            )
        if rule.note:
            message = f"{message} ({rule.note})"
        return rule.error(message, remedy=rule.remedy, sandbox_id=sandbox_id)

    def call(
        self,
        fn: Callable[[], T],
        doing: str,
        *,
        context: str = "",
        sandbox_id: str | None = None,
        endpoint: str | None = None,
        retry: bool = False,
    ) -> T:
        """``fn()`` (an SDK call) with whatever it raises translated (``translate``); transient
        failures retried with backoff when ``retry`` (for idempotent calls only)."""

        def attempt() -> T:
            try:
                return fn()
            except SandboxError:
                raise
            except Exception as e:
                raise self.translate(e, doing, context=context, sandbox_id=sandbox_id, endpoint=endpoint) from e

        return with_retries(attempt) if retry else attempt()


# -- paths in a sandbox ----------------------------------------------------------------------------


def in_workdir(path: str, workdir: str) -> str:
    """``path`` as an absolute path of a sandbox whose working directory is ``workdir``: the core
    API's relative paths point there, for SDKs that take absolute paths only."""
    return path if path.startswith("/") else f"{workdir.rstrip('/')}/{path}"


# -- the SDK and its supported range -------------------------------------------------------------

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*\(?([^;()]*)\)?\s*(?:;(.*))?$")
_CLAUSE = re.compile(r"^\s*(~=|===|==|!=|<=|>=|<|>)\s*([^\s,]+)\s*$")


def release(version: str) -> tuple[int, ...]:
    """The release part of a version (``2.19.39`` -> (2, 19, 39)); pre/post/dev suffixes are ignored."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(part) for part in match.group(0).split(".")) if match else (0,)


def _cmp(left: tuple[int, ...], right: tuple[int, ...]) -> int:
    width = max(len(left), len(right))
    a, b = left + (0,) * (width - len(left)), right + (0,) * (width - len(right))
    return (a > b) - (a < b)


def satisfies(version: str, specifier: str) -> bool:
    """Whether ``version`` is in ``specifier`` (e.g. ``>=0.150,<1``), comparing release numbers
    (the standard library has no ``packaging``)."""
    have = release(version)
    for clause in filter(None, (part.strip() for part in specifier.split(","))):
        match = _CLAUSE.match(clause)
        if match is None:
            raise ValueError(f"Cannot read the version clause {clause!r}.")
        op, wanted = match.groups()
        if op in ("==", "!=") and wanted.endswith(".*"):
            prefix = release(wanted[:-2])
            equal = have[: len(prefix)] == prefix
            ok = equal if op == "==" else not equal
        elif op == "~=":
            base = release(wanted)
            ok = _cmp(have, base) >= 0 and have[: len(base) - 1] == base[:-1]
        else:
            order = _cmp(have, release(wanted))
            ok = {
                "==": order == 0,
                "===": order == 0,
                "!=": order != 0,
                "<": order < 0,
                "<=": order <= 0,
                ">": order > 0,
                ">=": order >= 0,
            }[op]
        if not ok:
            return False
    return True


def requirements(dist: str) -> list[tuple[str, str, str]]:
    """``(name, specifier, marker)`` of each ``Requires-Dist`` of the installed ``dist``."""
    found = []
    for line in importlib.metadata.requires(dist) or []:
        match = _REQUIREMENT.match(line)
        if match is not None:
            found.append((match.group(1), match.group(2).strip(), match.group(3) or ""))
    return found


def supported_range(backend_dist: str, sdk_dist: str) -> str:
    """The specifier ``backend_dist`` declares for ``sdk_dist`` (e.g. ``>=0.150,<1``); ``""``: any."""
    wanted = _normal(sdk_dist)
    for name, specifier, _ in requirements(backend_dist):
        if _normal(name) == wanted:
            # Metadata may hold the clauses in any order (``<1,>=0.150``): lower bounds first reads best.
            clauses = [c.strip() for c in specifier.split(",") if c.strip()]
            return ",".join(sorted(clauses, key=lambda c: not c.startswith((">", "~", "=="))))
    return ""


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class SdkSpec:
    """Where a backend's SDK comes from.

    ``backend``: the backend's name (``"daytona"``); ``dist``: the backend's own distribution, whose
    metadata declares the supported range; ``modules``: import name -> the SDK distribution shipping
    it, tried in order (a deprecated alias may ship the same code under another name; its versions
    follow the first distribution's range); ``title``: how messages name the SDK.
    """

    backend: str
    dist: str
    modules: Mapping[str, str]
    title: str

    @property
    def sdk_dist(self) -> str:
        return next(iter(self.modules.values()))

    def install_hint(self) -> str:
        try:
            specifier = supported_range(self.dist, self.sdk_dist)
        except importlib.metadata.PackageNotFoundError:
            specifier = ""
        return f"pip install '{self.sdk_dist}{specifier}'"


def load_sdk(spec: SdkSpec) -> tuple[ModuleType, str]:
    """The SDK module and its version, checked against the range ``spec.dist`` declares.

    ``ConfigurationError`` naming the SDK's distribution and the range to install when it is
    missing, broken or outside the range.
    """
    for module_name, sdk_dist in spec.modules.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                continue  # not installed under this name: try the next one
            raise ConfigurationError(
                f"The {spec.title} ({sdk_dist}) is installed but cannot be imported: {e}.",
                remedy=f"Reinstall it: pip install --force-reinstall {sdk_dist}",
            ) from e
        except ImportError as e:
            raise ConfigurationError(
                f"The {spec.title} ({sdk_dist}) failed to import: {e}.", remedy=f"Run: {spec.install_hint()}"
            ) from e
        try:
            version = importlib.metadata.version(sdk_dist)
        except importlib.metadata.PackageNotFoundError:
            version = "0"
        try:
            specifier = supported_range(spec.dist, spec.sdk_dist)
        except importlib.metadata.PackageNotFoundError:
            specifier = ""  # run from a source tree: no metadata to check against
        if not satisfies(version, specifier):
            raise ConfigurationError(
                f"The {spec.backend} backend supports {spec.sdk_dist}{specifier}; {sdk_dist} {version} is installed.",
                remedy=f"Run: {spec.install_hint()}",
            )
        return module, version
    raise ConfigurationError(
        f"The {spec.backend} sandbox backend needs the {spec.title} (the `{spec.sdk_dist}` distribution), "
        "which is not installed.",
        remedy=f"Run: {spec.install_hint()}",
    )
