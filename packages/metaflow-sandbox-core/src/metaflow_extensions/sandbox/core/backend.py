"""The contract every backend implements: ``SandboxBackend`` creates ``Sandbox`` handles.

Layer: core (bottom). Imports: the standard library and ``core.errors`` / ``core.spec`` /
``core.options``.

The public methods (``run``, ``upload``, ``download``, ``destroy``) live here once, for every
backend: they validate arguments, split streamed output into lines, write downloads atomically and
make ``destroy`` idempotent. A backend implements only the ``_``-prefixed primitives.
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import os
import tempfile
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import ClassVar

from .errors import ConfigurationError, SandboxError, SandboxUnavailable
from .options import Option
from .spec import CommandResult, SandboxInfo, SandboxSpec, check_env

LineCallback = Callable[[str], None]
"""Receives one line of output, without its trailing newline."""

# Every sandbox handle not yet destroyed, so that none outlives the process that created it
# (normal exit or an unhandled exception, e.g. KeyboardInterrupt outside a ``with`` block).
_LIVE: weakref.WeakSet[Sandbox] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def destroy_all_live() -> None:
    """Destroy every sandbox this process created and has not destroyed yet (signal handlers call it)."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for sandbox in live:
        # Best effort at shutdown: the provider-side lifetime is the backstop.
        with contextlib.suppress(SandboxError):
            sandbox.destroy()


atexit.register(destroy_all_live)


class LineSplitter:
    """Turns text chunks into complete lines for a callback; keeps the full text too."""

    def __init__(self, callback: LineCallback | None):
        self._callback = callback
        self._pending = ""
        self._parts: list[str] = []

    def feed(self, chunk: str) -> None:
        if not chunk:
            return
        self._parts.append(chunk)
        if self._callback is None:
            return
        *lines, self._pending = (self._pending + chunk).split("\n")
        for line in lines:
            self._callback(line)

    def close(self) -> str:
        """Flush a last unterminated line and return everything fed."""
        if self._callback is not None and self._pending:
            self._callback(self._pending)
        self._pending = ""
        return "".join(self._parts)


class ByteDecoder:
    """Incremental UTF-8 decoding for byte streams (a multi-byte character may span two reads)."""

    def __init__(self, sink: Callable[[str], None]):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._sink = sink

    def feed(self, data: bytes) -> None:
        self._sink(self._decoder.decode(data))

    def close(self) -> None:
        self._sink(self._decoder.decode(b"", final=True))


class Sandbox(ABC):
    """A live sandbox. Use it as a context manager: leaving the block destroys it, errors included.

    Relative paths in ``upload``/``download`` and the working directory of ``run`` are the
    sandbox's working directory, the same one on every backend.
    """

    def __init__(self, sandbox_id: str, backend: str, spec: SandboxSpec):
        self.id = sandbox_id
        self.backend = backend
        self.spec = spec
        self._destroyed = False
        self._destroy_lock = threading.Lock()
        with _LIVE_LOCK:
            _LIVE.add(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.backend}:{self.id}>"

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.destroy()

    # -- public API, identical for every backend -------------------------------------------------

    def run(
        self,
        command: str,
        *,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        on_stdout: LineCallback | None = None,
        on_stderr: LineCallback | None = None,
    ) -> CommandResult:
        """Run ``command`` with bash in the working directory; stream its output line by line.

        ``env`` adds to the spec's environment for this command only. A non-zero exit is returned,
        not raised; ``CommandTimeout`` is raised when ``timeout_s`` passes (the process tree is
        killed first), ``SandboxUnavailable`` when the sandbox dies underneath the command.
        """
        self._check_alive()
        if timeout_s is not None and timeout_s <= 0:
            raise ConfigurationError(f"timeout_s must be positive or None; got {timeout_s!r}.")
        out, err = LineSplitter(on_stdout), LineSplitter(on_stderr)
        merged_env = {**self.spec.env, **check_env(env or {}, "Sandbox.run(env=...)")}
        exit_code = self._run(command, env=merged_env, timeout_s=timeout_s, on_stdout=out.feed, on_stderr=err.feed)
        return CommandResult(exit_code=exit_code, stdout=out.close(), stderr=err.close())

    def upload(self, src: bytes | str | os.PathLike[str], dst: str) -> None:
        """Copy bytes, or a local file by path, to ``dst`` in the sandbox (parents are created)."""
        self._check_alive()
        if isinstance(src, bytes):
            with tempfile.NamedTemporaryFile(prefix="mfsbx-upload-") as tmp:
                tmp.write(src)
                tmp.flush()
                self._upload(Path(tmp.name), dst)
            return
        path = Path(src)
        if not path.is_file():
            raise ConfigurationError(f"Cannot upload {str(path)!r}: no such local file.")
        self._upload(path, dst)

    def download(self, src: str, dst: str | os.PathLike[str]) -> None:
        """Copy ``src`` from the sandbox to the local path ``dst``, atomically (never half a file)."""
        self._check_alive()
        target = Path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        os.close(fd)
        try:
            self._download(src, Path(tmp_name))
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def destroy(self) -> None:
        """Destroy the sandbox and everything in it. Safe to call more than once."""
        with self._destroy_lock:
            if self._destroyed:
                return
            self._destroy()
            self._destroyed = True
        with _LIVE_LOCK:
            _LIVE.discard(self)

    @property
    def destroyed(self) -> bool:
        return self._destroyed

    def _check_alive(self) -> None:
        if self._destroyed:
            raise SandboxUnavailable(f"Sandbox {self.id} was already destroyed.", sandbox_id=self.id)

    # -- what a backend implements ---------------------------------------------------------------

    @abstractmethod
    def _run(
        self,
        command: str,
        *,
        env: Mapping[str, str],
        timeout_s: float | None,
        on_stdout: Callable[[str], None],
        on_stderr: Callable[[str], None],
    ) -> int:
        """Run ``bash -c command`` in the working directory with exactly ``env`` added to the
        sandbox's base environment; feed output chunks (any size) as they arrive; return the exit
        code. Raise ``CommandTimeout`` after killing the process tree when ``timeout_s`` passes."""

    @abstractmethod
    def _upload(self, src: Path, dst: str) -> None:
        """Stream the local file ``src`` to ``dst`` (relative to the working directory)."""

    @abstractmethod
    def _download(self, src: str, dst: Path) -> None:
        """Stream ``src`` into the local file ``dst`` (which exists); raise ``SandboxFileNotFound``."""

    @abstractmethod
    def _destroy(self) -> None:
        """Remove the sandbox at the provider; an already-gone sandbox is not an error."""


class SandboxBackend(ABC):
    """A provider of sandboxes. ``get_backend(name, **options)`` constructs one.

    The constructor validates options and credentials, so configuration errors surface before any
    sandbox exists.
    """

    name: ClassVar[str]
    #: The options the constructor takes, declared once (``core.options``): ``get_backend`` coerces,
    #: defaults and checks them against this before constructing. ``None``: undeclared, options
    #: are passed through unchecked (for backends written before declarations existed).
    options: ClassVar[tuple[Option, ...] | None] = None
    #: Whether commands in its sandboxes run under the launcher's own Python interpreter, so that
    #: bytecode compiled by the launcher is valid there (callers may then ship ``.pyc`` files).
    runs_launcher_python: ClassVar[bool] = False
    #: Whether ``create`` honours ``SandboxSpec.read_only_dirs`` (shares this machine's directories).
    shares_host_dirs: ClassVar[bool] = False
    #: Other distribution names a required provider SDK may be installed under (a deprecated alias
    #: shipping the same code, e.g. ``{"daytona": "daytona-sdk"}``), in the same version range.
    #: ``metaflow-sandbox doctor`` checks the SDK's version under either name.
    sdk_aliases: ClassVar[Mapping[str, str]] = {}

    @abstractmethod
    def create(self, spec: SandboxSpec) -> Sandbox:
        """Create and start a sandbox; it is ready for ``run`` when this returns."""

    @abstractmethod
    def list(self, labels: Mapping[str, str] | None = None) -> list[SandboxInfo]:
        """Live sandboxes of this backend carrying all of ``labels``."""

    @abstractmethod
    def destroy(self, sandbox_id: str) -> None:
        """Destroy a sandbox by id (e.g. one found by ``list``); an unknown id is not an error."""
