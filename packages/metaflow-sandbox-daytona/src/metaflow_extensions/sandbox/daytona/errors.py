"""Translating Daytona SDK exceptions into core errors; retrying the idempotent calls.

Layer: backend. Imports: the standard library and core (``errors``, ``retry``).

The SDK raises ``DaytonaError`` subclasses (older releases: ``DaytonaError`` with a status code,
or only a message), and transport exceptions (httpx, urllib3, aiohttp, websockets) underneath.
Callers never see any of them: rate limits, 5xx answers and dropped connections become
``TransientError``; bad credentials, quota and image problems become final errors with a remedy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import TypeVar

from metaflow_extensions.sandbox.core import (
    AuthenticationError,
    ImageError,
    QuotaExceeded,
    SandboxError,
    SandboxFileNotFound,
    TransientError,
)
from metaflow_extensions.sandbox.core.retry import with_retries

T = TypeVar("T")

KEYS_URL = "https://app.daytona.io/dashboard/keys"
_TRANSPORT_NAMES = (
    "Connect",  # ConnectionError, ConnectError, ClientConnectionError, NewConnectionError...
    "Timeout",
    "RemoteDisconnected",
    "ProtocolError",
    "MaxRetryError",
    "ReadError",
    "WriteError",
    "ServerDisconnected",
    "WebSocketDisconnect",
    "ConnectionClosed",
    "IncompleteRead",
)
# Status codes as older SDKs only print them: "(503)" (OpenAPI) or "'503 Service Unavailable'" (httpx).
_STATUS_IN_TEXT = re.compile(r"\((\d{3})\)|'(\d{3}) [A-Z]")


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]


def status_of(error: BaseException) -> int | None:
    """The HTTP status behind ``error`` (or anything it was raised from), if there was one."""
    for current in _chain(error):
        for attr in ("status_code", "status"):
            value = getattr(current, attr, None)
            if isinstance(value, int) and 100 <= value < 600:
                return value
        response = getattr(current, "response", None)
        value = getattr(response, "status_code", None)
        if isinstance(value, int):
            return value
    for current in _chain(error):
        found = _STATUS_IN_TEXT.search(str(current))
        if found:
            return int(found.group(1) or found.group(2))
    return None


def _class_names(error: BaseException) -> list[str]:
    return [cls.__name__ for current in _chain(error) for cls in type(current).__mro__]


def is_not_found(error: BaseException) -> bool:
    if status_of(error) == 404 or any("NotFound" in name for name in _class_names(error)):
        return True
    text = str(error).lower()
    return "not found" in text or "file_not_found" in text or "no such file" in text


def is_conflict(error: BaseException) -> bool:
    return status_of(error) == 409 or "already exists" in str(error).lower()


def is_transport(error: BaseException) -> bool:
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    names = _class_names(error)
    if any(marker in name for name in names for marker in _TRANSPORT_NAMES):
        return True
    text = str(error).lower()
    return any(
        marker in text for marker in ("connection refused", "connection reset", "server disconnected", "timed out")
    )


def translate(error: BaseException, what: str, *, sandbox_id: str | None = None) -> SandboxError:  # noqa: PLR0911 - one flat table
    """The core error for a provider exception raised while doing ``what``."""
    if isinstance(error, SandboxError):
        return error
    message = f"Daytona: {what} failed: {error}"
    status = status_of(error)
    text = str(error).lower()
    if status == 401 or "DaytonaAuthenticationError" in _class_names(error):
        return AuthenticationError(
            f"{message} (the API key was rejected)",
            remedy=f"Check DAYTONA_API_KEY; create a key at {KEYS_URL} and export DAYTONA_API_KEY=<key>.",
        )
    if "DaytonaTimeoutError" in _class_names(error) and what == "create":
        return SandboxError(
            message,
            remedy="Creating (for an image: building) the sandbox took longer than create_timeout_s; raise "
            "it, or start from a snapshot.",
            sandbox_id=sandbox_id,
        )
    # Before the quota check: "rate limit exceeded" is a 429 to wait out, not a quota.
    if status in (408, 429) or (status is not None and status >= 500) or (status is None and is_transport(error)):
        return TransientError(message, sandbox_id=sandbox_id)
    if "quota" in text or "limit exceeded" in text or "limit reached" in text:
        return QuotaExceeded(
            message,
            remedy="Destroy sandboxes you no longer need (`python flow.py sandbox kill`, or the Daytona "
            "dashboard: stopped sandboxes count too) or raise your organization's limits.",
            sandbox_id=sandbox_id,
        )
    if status == 403:
        return AuthenticationError(
            f"{message} (forbidden)",
            remedy=f"The API key lacks a permission this needs; create one with sandbox access at {KEYS_URL}.",
        )
    if what == "create" and (
        status in (400, 404, 422) or any(word in text for word in ("snapshot", "image", "build", "pull"))
    ):
        return ImageError(
            message,
            remedy="Check the image name (a registry image Daytona can pull) or the snapshot name "
            "(`daytona snapshot list`, or the dashboard).",
        )
    return SandboxError(message, sandbox_id=sandbox_id)


def call(what: str, fn: Callable[[], T], *, retry: bool = True, sandbox_id: str | None = None) -> T:
    """``fn()`` with provider exceptions translated; transient failures retried when ``retry``."""

    def attempt() -> T:
        try:
            return fn()
        except SandboxError:
            raise
        except Exception as e:
            raise translate(e, what, sandbox_id=sandbox_id) from e

    return with_retries(attempt) if retry else attempt()


def download_error(error: BaseException, src: str, sandbox_id: str) -> SandboxError:
    """A missing file is ``SandboxFileNotFound`` (a missing *sandbox* is not)."""
    text = str(error).lower()
    missing_file = (
        "DaytonaFileNotFoundError" in _class_names(error)
        or "file_not_found" in text
        or "no such file" in text
        or ("not found" in text and "sandbox" not in text)
    )
    if missing_file and not isinstance(error, SandboxError):
        return SandboxFileNotFound(f"No file {src!r} in sandbox {sandbox_id}.", sandbox_id=sandbox_id)
    return translate(error, f"download of {src!r}", sandbox_id=sandbox_id)
