"""Modal's exceptions as core errors: the declared table the provider kit translates with.

Layer: modal backend. Imports: the standard library and core (``errors``, ``provider``).

The SDK raises one class per gRPC status (``AuthError``, ``NotFoundError``,
``ResourceExhaustedError``...), so the table keys on class names; the context ``"create"`` is
creating a sandbox (where a ``RemoteError``, e.g. an image that cannot be pulled, is an image
problem), ``"sandbox"`` a call to a sandbox that exists (where "not found" means it is gone).
"""

from __future__ import annotations

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

TOKEN_REMEDY = (
    "Set your Modal token: export MODAL_TOKEN_ID=ak-... MODAL_TOKEN_SECRET=as-... "
    "(`modal token new`, or https://modal.com/settings/tokens)."
)
_IMAGE_REMEDY = "Check that the image reference exists and is public (or give Modal a registry secret)."

TABLE = ErrorTable(
    provider="Modal",
    url_env="MODAL_SERVER_URL",
    # Errors raised below the SDK (grpclib over h2) when Modal cannot be reached at all.
    transport=Transport(modules=("grpclib", "h2", "ssl", "socket"), names=("StreamTerminatedError",)),
    rules=(
        ErrorRule(AuthenticationError, names=("AuthError", "PermissionDeniedError"), note="the token was rejected",
                  remedy=TOKEN_REMEDY),
        ErrorRule(ImageError, names=("RemoteError", "ImageBuildError"), contexts=("create",),
                  note="the image could not be built or pulled", remedy=_IMAGE_REMEDY),
        ErrorRule(ConfigurationError, names=("InvalidError",), contexts=("create",),
                  note="Modal refused the sandbox settings"),
        ErrorRule(QuotaExceeded, names=("ResourceExhaustedError",), contexts=("create",),
                  remedy="Wait for running sandboxes to finish, or raise your Modal workspace's limits."),
        ErrorRule(SandboxUnavailable, names=("NotFoundError", "SandboxTerminatedError", "SandboxTimeoutError"),
                  contexts=("sandbox",), note="the sandbox is not running any more"),
        ErrorRule(TransientError, names=("ResourceExhaustedError", "ServiceError", "InternalError")),
        ErrorRule(SandboxUnavailable, transport=True, contexts=("sandbox",), note="the sandbox cannot be reached"),
        ErrorRule(TransientError, names=("ConnectionError",), note="Modal cannot be reached"),
        ErrorRule(TransientError, transport=True, note="Modal cannot be reached"),
    ),
)  # fmt: skip


def translate(error: BaseException, doing: str, *, sandbox_id: str | None = None) -> SandboxError:
    """The core error for an SDK exception raised while ``doing``; ``sandbox_id``: the call went to
    that sandbox (a missing or unreachable sandbox is then gone, not a hiccup of the API)."""
    context = "sandbox" if sandbox_id else ""
    return TABLE.translate(error, doing, context=context, sandbox_id=sandbox_id)


def translate_create(error: BaseException, image: str) -> SandboxError:
    """Errors of ``Sandbox.create``: an image that cannot be had is an image error, bad values configuration."""
    return TABLE.translate(error, f"creating a sandbox from image {image!r}", context="create")


def translate_download(error: BaseException, path: str, sandbox_id: str) -> SandboxError:
    if "SandboxFilesystemNotFoundError" in class_names(error):
        return SandboxFileNotFound(f"No file {path!r} in sandbox {sandbox_id}.", sandbox_id=sandbox_id)
    return translate(error, f"downloading {path!r}", sandbox_id=sandbox_id)
