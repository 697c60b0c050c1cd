"""File transfers to and from a Daytona sandbox, streamed from and to local files.

Layer: backend. Imports: the standard library, core and this package's ``errors``. The SDK
objects arrive as arguments.

With a path (not bytes) the SDK streams the upload from disk; with a local path it streams the
multipart answer of a download straight into the file. Both are idempotent, so transient failures
are retried (``errors.call``); a missing file is ``SandboxFileNotFound``, a missing sandbox is not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metaflow_extensions.sandbox.core import SandboxError

from .errors import call, download_error


def upload(sdk_sandbox: Any, src: Path, dst: str, sandbox_id: str) -> None:
    """Stream the local file ``src`` to ``dst`` in the sandbox."""
    call(f"upload to {dst!r}", lambda: sdk_sandbox.fs.upload_file(str(src), dst), sandbox_id=sandbox_id)


def download(sdk_sandbox: Any, src: str, dst: Path, sandbox_id: str) -> None:
    """Stream ``src`` from the sandbox into the local file ``dst``."""

    def fetch() -> None:
        try:
            sdk_sandbox.fs.download_file(src, str(dst))
        except SandboxError:
            raise
        except Exception as e:
            raise download_error(e, src, sandbox_id) from e

    call(f"download of {src!r}", fetch, sandbox_id=sandbox_id)
