"""E2B's exceptions as core errors: the declared table the provider kit translates with.

Layer: e2b backend. Imports: the standard library, core (``errors``, ``provider``) and ``sdk``.

The SDK's exception classes moved between 2.7 and 2.63 (``RateLimitException`` and
``ServiceBusyException`` appeared, 503 became its own class), so the table keys on what is stable
in both: class names and the ``"<status>: "`` prefix of REST error messages. Calls in the context
``"envd"`` went to the sandbox's own daemon, where "not reachable" means the sandbox is gone rather
than that the E2B API hiccuped; ``"create"`` is creating a sandbox.
"""

from __future__ import annotations

import re

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
from metaflow_extensions.sandbox.core.provider import ErrorRule, ErrorTable, Transport, class_names

KEY_REMEDY = "Set your E2B API key: export E2B_API_KEY=e2b_... (create one at https://e2b.dev/dashboard?tab=keys)."
URL_ENV = "E2B_API_URL"
_TEMPLATE_REMEDY = "Check the name with `e2b template list`, or build it with `e2b template build`."

TABLE = ErrorTable(
    provider="E2B",
    url_env=URL_ENV,
    # Errors raised below the SDK (httpx/httpcore before 2.35, pyqwest after) when E2B cannot be reached.
    transport=Transport(modules=("httpx", "httpcore", "pyqwest", "h11", "h2", "ssl", "socket")),
    status_patterns=(re.compile(r"^\s*(\d{3})\b"),),
    rules=(
        ErrorRule(ImageError, names=("NotFoundException", "TemplateException"), contexts=("create",),
                  note="no such template usable by this API key", remedy=_TEMPLATE_REMEDY),
        ErrorRule(ImageError, statuses=(404,), contexts=("create",), note="no such template usable by this API key",
                  remedy=_TEMPLATE_REMEDY),
        ErrorRule(ConfigurationError, names=("InvalidArgumentException",), contexts=("create",),
                  note="E2B refused the sandbox settings"),
        ErrorRule(ConfigurationError, statuses=(400,), contexts=("create",), note="E2B refused the sandbox settings"),
        ErrorRule(AuthenticationError, names=("AuthenticationException",), note="the API key was rejected",
                  remedy=KEY_REMEDY),
        ErrorRule(AuthenticationError, statuses=(401,), note="the API key was rejected", remedy=KEY_REMEDY),
        ErrorRule(QuotaExceeded, statuses=(429,), texts=("concurrent",),
                  remedy="Wait for running sandboxes to finish, or raise the concurrency limit of your E2B plan."),
        ErrorRule(QuotaExceeded, names=("RateLimitException",), texts=("concurrent",),
                  remedy="Wait for running sandboxes to finish, or raise the concurrency limit of your E2B plan."),
        ErrorRule(SandboxUnavailable, statuses=(502,), contexts=("envd",), note="the sandbox is not running any more"),
        ErrorRule(SandboxUnavailable, names=("SandboxNotRunningException", "SandboxNotFoundException"),
                  contexts=("envd",), note="the sandbox is not running any more"),
        ErrorRule(TransientError, statuses=(429, 502, 503, 504)),
        ErrorRule(TransientError, names=("RateLimitException", "ServiceBusyException")),
        ErrorRule(SandboxUnavailable, transport=True, contexts=("envd",), note="the sandbox cannot be reached"),
        ErrorRule(TransientError, transport=True, note="E2B cannot be reached"),
        # The SDK reports a sandbox that timed out or vanished under its envd as a TimeoutException.
        ErrorRule(SandboxUnavailable, names=("TimeoutException",), contexts=("envd",),
                  note="the sandbox stopped answering"),
    ),
)  # fmt: skip


def translate(
    error: BaseException,
    doing: str,
    *,
    sandbox_id: str | None = None,
    envd: bool = False,
    endpoint: str | None = None,
) -> SandboxError:
    """The core error for an SDK exception raised while ``doing`` (e.g. "creating a sandbox");
    ``envd``: the call went to the sandbox's own daemon; ``endpoint``: to the API at that URL."""
    context = "envd" if envd else ""
    return TABLE.translate(error, doing, context=context, sandbox_id=sandbox_id, endpoint=endpoint)


def translate_create(error: BaseException, template: str, endpoint: str | None = None) -> SandboxError:
    """Errors of ``Sandbox.create``: a missing template is an image error, bad values configuration."""
    doing = f"creating a sandbox from template {template!r}"
    return TABLE.translate(error, doing, context="create", endpoint=endpoint)


def translate_download(error: BaseException, path: str, sandbox_id: str) -> SandboxError:
    if "NotFoundException" in class_names(error) or TABLE.status_of(error) == 404:
        return SandboxFileNotFound(f"No file {path!r} in sandbox {sandbox_id}.", sandbox_id=sandbox_id)
    return translate(error, f"downloading {path!r}", sandbox_id=sandbox_id, envd=True)
