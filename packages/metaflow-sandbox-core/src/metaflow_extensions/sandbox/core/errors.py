"""The error hierarchy every backend raises; callers never see a provider exception.

Layer: core (bottom). Imports: the standard library only.

Each error says whether retrying can help (``transient``) and, where the user can fix the cause,
how (``remedy``). Backends translate provider exceptions into these with ``raise ... from e``.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Base class. ``transient`` errors may succeed when retried with backoff; the rest are final."""

    transient: bool = False

    def __init__(self, message: str, *, remedy: str | None = None, sandbox_id: str | None = None):
        self.message = message
        self.remedy = remedy
        self.sandbox_id = sandbox_id
        super().__init__(f"{message} {remedy}" if remedy else message)


class TransientError(SandboxError):
    """Rate limits, 5xx answers, dropped connections: retry with backoff."""

    transient = True


class ConfigurationError(SandboxError):
    """Bad input, missing SDK or credentials; raised before any sandbox is created."""


class BackendNotFound(ConfigurationError):
    """No backend is registered under the requested name."""


class AuthenticationError(ConfigurationError):
    """The provider rejected the credentials."""


class QuotaExceeded(SandboxError):
    """The provider refuses to create more sandboxes (concurrency, disk or budget limits)."""


class ImageError(SandboxError):
    """The image, template or snapshot does not exist or does not build."""


class SandboxUnavailable(SandboxError):
    """The sandbox died, was destroyed or became unreachable while in use (an infrastructure failure)."""


class CommandTimeout(SandboxError):
    """A command ran past its ``timeout_s``; its whole process tree was killed."""

    def __init__(
        self, message: str, *, timeout_s: float, stdout: str = "", stderr: str = "", sandbox_id: str | None = None
    ):
        super().__init__(message, sandbox_id=sandbox_id)
        self.timeout_s = timeout_s
        self.stdout = stdout
        self.stderr = stderr


class SandboxFileNotFound(SandboxError):
    """A file to download does not exist in the sandbox."""
