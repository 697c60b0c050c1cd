"""Daytona's exceptions as core errors: the declared table the provider kit translates with.

Layer: backend. Imports: the standard library and core (``errors``, ``provider``).

The SDK raises ``DaytonaError`` subclasses (older releases: ``DaytonaError`` with a status code,
or only a message), and transport exceptions (httpx, urllib3, aiohttp, websockets) underneath.
Callers never see any of them: rate limits, 5xx answers and dropped connections become
``TransientError``; bad credentials, quota and image problems become final errors with a remedy.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

from metaflow_extensions.sandbox.core import (
    AuthenticationError,
    ImageError,
    QuotaExceeded,
    SandboxError,
    SandboxFileNotFound,
    TransientError,
)
from metaflow_extensions.sandbox.core.provider import ErrorRule, ErrorTable, Transport, class_names

T = TypeVar("T")

KEYS_URL = "https://app.daytona.io/dashboard/keys"
URL_ENV = "DAYTONA_API_URL"
KEY_REMEDY = f"Check DAYTONA_API_KEY; create a key at {KEYS_URL} and export DAYTONA_API_KEY=<key>."
IMAGE_REMEDY = (
    "Check the image name (a registry image Daytona can pull) or the snapshot name (`daytona snapshot list`, "
    "or the dashboard)."
)

TABLE = ErrorTable(
    provider="Daytona",
    url_env=URL_ENV,
    transport=Transport(
        names=(
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
        ),
        texts=("connection refused", "connection reset", "server disconnected", "timed out"),
    ),
    # Status codes as older SDKs only print them: "(503)" (OpenAPI) or "'503 Service Unavailable'" (httpx).
    status_patterns=(re.compile(r"\((\d{3})\)|'(\d{3}) [A-Z]"),),
    rules=(
        ErrorRule(AuthenticationError, statuses=(401,), note="the API key was rejected", remedy=KEY_REMEDY),
        ErrorRule(AuthenticationError, names=("DaytonaAuthenticationError",), note="the API key was rejected",
                  remedy=KEY_REMEDY),
        ErrorRule(SandboxError, names=("DaytonaTimeoutError",), contexts=("create",),
                  remedy="Creating (for an image: building) the sandbox took longer than create_timeout_s; raise "
                  "it, or start from a snapshot."),
        # Before the quota rule: "rate limit exceeded" is a 429 to wait out, not a quota.
        ErrorRule(TransientError, statuses=(408, 429, *range(500, 600))),
        ErrorRule(TransientError, transport=True),
        ErrorRule(QuotaExceeded, texts=("quota", "limit exceeded", "limit reached"),
                  remedy="Destroy sandboxes you no longer need (`python flow.py sandbox kill`, or the Daytona "
                  "dashboard: stopped sandboxes count too) or raise your organization's limits."),
        ErrorRule(AuthenticationError, statuses=(403,), note="forbidden",
                  remedy=f"The API key lacks a permission this needs; create one with sandbox access at {KEYS_URL}."),
        ErrorRule(ImageError, statuses=(400, 404, 422), contexts=("create",), remedy=IMAGE_REMEDY),
        ErrorRule(ImageError, texts=("snapshot", "image", "build", "pull"), contexts=("create",), remedy=IMAGE_REMEDY),
    ),
)  # fmt: skip


def is_not_found(error: BaseException) -> bool:
    if TABLE.is_not_found(error):
        return True
    text = str(error).lower()
    return "not found" in text or "file_not_found" in text or "no such file" in text


def is_conflict(error: BaseException) -> bool:
    return TABLE.status_of(error) == 409 or "already exists" in str(error).lower()


def translate(
    error: BaseException, what: str, *, sandbox_id: str | None = None, endpoint: str | None = None
) -> SandboxError:
    """The core error for a provider exception raised while doing ``what`` (``"create"``: creating);
    ``endpoint``: the API's URL, when the call went to the API."""
    return TABLE.translate(error, what, context=what, sandbox_id=sandbox_id, endpoint=endpoint)


def call(
    what: str, fn: Callable[[], T], *, retry: bool = True, sandbox_id: str | None = None, endpoint: str | None = None
) -> T:
    """``fn()`` with provider exceptions translated; transient failures retried when ``retry``."""
    return TABLE.call(fn, what, context=what, sandbox_id=sandbox_id, endpoint=endpoint, retry=retry)


def download_error(error: BaseException, src: str, sandbox_id: str) -> SandboxError:
    """A missing file is ``SandboxFileNotFound`` (a missing *sandbox* is not)."""
    text = str(error).lower()
    missing_file = (
        "DaytonaFileNotFoundError" in class_names(error)
        or "file_not_found" in text
        or "no such file" in text
        or ("not found" in text and "sandbox" not in text)
    )
    if missing_file and not isinstance(error, SandboxError):
        return SandboxFileNotFound(f"No file {src!r} in sandbox {sandbox_id}.", sandbox_id=sandbox_id)
    return translate(error, f"download of {src!r}", sandbox_id=sandbox_id)
