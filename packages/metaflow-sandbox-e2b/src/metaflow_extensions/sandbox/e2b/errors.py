"""Loading the E2B SDK and translating its exceptions into core errors.

Layer: e2b backend. Imports: the standard library and core; the ``e2b`` SDK lazily (inside functions).

The SDK's exception classes moved between 2.7 and 2.63 (``RateLimitException`` and
``ServiceBusyException`` appeared, 503 became its own class), so the translation keys on what is
stable in both: base classes, class names and the ``"<status>: "`` prefix of REST error messages.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

from metaflow_extensions.sandbox.core import (
    AuthenticationError,
    ConfigurationError,
    ImageError,
    QuotaExceeded,
    SandboxError,
    SandboxFileNotFound,
    SandboxUnavailable,
    TransientError,
)

OLDEST_SDK = (2, 7)
INSTALL = "pip install 'e2b>=2.7,<3'"
KEY_REMEDY = "Set your E2B API key: export E2B_API_KEY=e2b_... (create one at https://e2b.dev/dashboard?tab=keys)."
_TRANSIENT_STATUS = {429, 502, 503, 504}
# Errors raised below the SDK (httpx/httpcore before 2.35, pyqwest after) when E2B cannot be reached.
_TRANSPORT_MODULES = ("httpx", "httpcore", "pyqwest", "h11", "h2", "ssl", "socket")


def sdk() -> ModuleType:
    """The ``e2b`` module, or a ``ConfigurationError`` naming the install command."""
    try:
        import e2b
    except ImportError as e:
        raise ConfigurationError(
            f"The e2b sandbox backend needs the E2B SDK, which failed to import ({e}).", remedy=f"Run: {INSTALL}"
        ) from e
    return e2b


def sdk_version() -> tuple[int, ...]:
    try:
        text = version("e2b")
    except PackageNotFoundError:
        return (0,)
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def check_sdk_version() -> None:
    found = sdk_version()
    if found[:2] < OLDEST_SDK or found[0] >= 3:
        shown = ".".join(map(str, found))
        raise ConfigurationError(
            f"The e2b backend supports the E2B SDK >=2.7,<3; this environment has e2b {shown}.",
            remedy=f"Run: {INSTALL}",
        )


def status_of(error: BaseException) -> int | None:
    """The HTTP status behind an SDK error, when it says (attribute or ``"503: ..."`` prefix)."""
    status = getattr(error, "status_code", None)
    if isinstance(status, int):
        return status
    match = re.match(r"\s*(\d{3})\b", str(error))
    return int(match.group(1)) if match else None


def is_transport_error(error: BaseException) -> bool:
    """E2B could not be reached or the connection broke (no HTTP answer at all)."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    return any(type(error).__module__.startswith(m) for m in _TRANSPORT_MODULES)


def translate(  # noqa: PLR0911 - one flat decision table reads best
    error: BaseException, doing: str, *, sandbox_id: str | None = None, envd: bool = False
) -> SandboxError:
    """The core error for an SDK exception raised while ``doing`` (e.g. "creating a sandbox").

    ``envd``: the call went to the sandbox's own daemon, where "not reachable" means the sandbox
    is gone rather than that the E2B API hiccuped.
    """
    if isinstance(error, SandboxError):
        return error
    e2b = sdk()
    name = type(error).__name__
    message = f"E2B failed while {doing}: {error or name}"
    status = status_of(error)
    if isinstance(error, e2b.AuthenticationException) or status == 401:
        return AuthenticationError(f"E2B rejected the API key while {doing}: {error}", remedy=KEY_REMEDY)
    if "concurrent" in str(error).lower() and (status == 429 or name == "RateLimitException"):
        return QuotaExceeded(
            f"{message}",
            remedy="Wait for running sandboxes to finish, or raise the concurrency limit of your E2B plan.",
            sandbox_id=sandbox_id,
        )
    if envd and (status == 502 or name in ("SandboxNotRunningException", "SandboxNotFoundException")):
        return SandboxUnavailable(f"Sandbox {sandbox_id} is not running any more ({error}).", sandbox_id=sandbox_id)
    if status in _TRANSIENT_STATUS or name in ("RateLimitException", "ServiceBusyException"):
        return TransientError(message, sandbox_id=sandbox_id)
    if is_transport_error(error):
        if envd:
            return SandboxUnavailable(f"Sandbox {sandbox_id} cannot be reached ({error!r}).", sandbox_id=sandbox_id)
        return TransientError(f"E2B cannot be reached while {doing}: {error!r}", sandbox_id=sandbox_id)
    if envd and isinstance(error, e2b.TimeoutException):
        # The SDK reports a sandbox that timed out or vanished under its envd as a TimeoutException.
        return SandboxUnavailable(f"Sandbox {sandbox_id} stopped answering ({error}).", sandbox_id=sandbox_id)
    return SandboxError(message, sandbox_id=sandbox_id)


def translate_create(error: BaseException, template: str) -> SandboxError:
    """Errors of ``Sandbox.create``: a missing template is an image error, bad values configuration."""
    e2b = sdk()
    status = status_of(error)
    if isinstance(error, e2b.NotFoundException) or status == 404 or isinstance(error, e2b.TemplateException):
        return ImageError(
            f"E2B has no template {template!r} usable by this API key ({error}).",
            remedy="Check the name with `e2b template list`, or build it with `e2b template build`.",
        )
    if isinstance(error, e2b.InvalidArgumentException) or status == 400:
        return ConfigurationError(f"E2B refused the sandbox settings: {error}")
    return translate(error, "creating a sandbox")


def translate_download(error: BaseException, path: str, sandbox_id: str) -> SandboxError:
    if isinstance(error, sdk().NotFoundException) or status_of(error) == 404:
        return SandboxFileNotFound(f"No file {path!r} in sandbox {sandbox_id}.", sandbox_id=sandbox_id)
    return translate(error, f"downloading {path!r}", sandbox_id=sandbox_id, envd=True)
