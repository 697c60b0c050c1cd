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
import functools
import os
import shlex
import tempfile
import threading
import uuid
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

from .errors import CommandTimeout, ConfigurationError, SandboxError, SandboxUnavailable
from .options import Option
from .spec import CommandResult, SandboxInfo, SandboxSpec, check_env

OWNER_LABEL: tuple[str, str] = ("created-by", "metaflow-sandbox")
"""The label (key, value) every sandbox this library creates carries, on every backend.

``SandboxBackend.list`` reports only sandboxes carrying it, so a provider account's other sandboxes
(made by hand, by another tool) are never listed, nor removed by ``sandbox kill``. ``owned_labels``
adds it to a spec's labels.
"""


def owned_labels(labels: Mapping[str, str] | None = None) -> dict[str, str]:
    """``labels`` plus ``OWNER_LABEL``: what a backend attaches at create and filters on in ``list``."""
    return {**(labels or {}), OWNER_LABEL[0]: OWNER_LABEL[1]}


LEASE_ENV = "METAFLOW_SANDBOX_LEASE_S"
DEFAULT_LEASE_S = 300.0


def lease_s() -> float:
    """How long a provider sandbox outlives its owner: the lease its live owner keeps renewing
    (``$METAFLOW_SANDBOX_LEASE_S``, default 300 s). A sandbox whose owner vanished (SIGKILL, a lost
    machine) is reclaimed by the provider within about this long."""
    raw = os.environ.get(LEASE_ENV, "").strip()
    if not raw:
        return DEFAULT_LEASE_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigurationError(
            f"${LEASE_ENV} must be a positive number of seconds; got {raw!r}.",
            remedy=f"Unset it (default {DEFAULT_LEASE_S:.0f} s) or export {LEASE_ENV}=300.",
        )
    return value


LineCallback = Callable[[str], None]
"""Receives one line of output, without its trailing newline."""
OutputCallback = Callable[[str, str], None]
"""Receives ``("stdout" | "stderr", chunk)``: raw output as it arrives, chunks of any size."""

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


def cancellable(command: str, flag: str) -> str:
    """``command`` run so that creating the file ``flag`` (relative to the working directory)
    kills it and every process it started (its own process group), from any other connection.

    Only a file is shared between two commands on every backend (a second command may live in
    another pid namespace), so the cancel is a file the caller uploads.
    """
    return "\n".join(
        [
            f'flag="$PWD"/{shlex.quote(flag)}',
            "set -m",  # job control: the command gets a process group of its own, to kill whole
            f"bash -c {shlex.quote(command)} &",
            "child=$!",
            "set +m",
            '( while [ ! -e "$flag" ]; do sleep 0.1; done; kill -KILL -- "-$child" ) >/dev/null 2>&1 </dev/null &',
            "watcher=$!",
            'wait "$child"; code=$?',
            'kill "$watcher" 2>/dev/null; wait "$watcher" 2>/dev/null; rm -f "$flag"',
            'exit "$code"',
        ]
    )


class Sandbox(ABC):
    """A live sandbox. Use it as a context manager: leaving the block destroys it, errors included.

    Relative paths in ``upload``/``download`` and the working directory of ``run`` are the
    sandbox's working directory, the same one on every backend.
    """

    def __init__(self, sandbox_id: str, backend: str, spec: SandboxSpec, *, lease_s: float | None = None):
        """``lease_s``: the sandbox's provider-side lifetime, which this handle renews (through
        ``_renew_lease``) every third of it from a daemon thread until it is destroyed; ``None``:
        nothing to renew (the sandbox lives as long as its owner, e.g. ``local``)."""
        self.id = sandbox_id
        self.backend = backend
        self.spec = spec
        self._destroyed = False
        self._destroy_lock = threading.Lock()
        self._lease_stop = threading.Event()
        with _LIVE_LOCK:
            _LIVE.add(self)
        if lease_s is not None:
            threading.Thread(
                target=self._keep_lease, args=(lease_s / 3,), daemon=True, name=f"lease-{backend}-{sandbox_id}"
            ).start()

    def _keep_lease(self, every_s: float) -> None:
        # A daemon thread: it dies with its owner, and then so does the lease.
        while not self._lease_stop.wait(every_s):
            try:
                self._renew_lease()
            except SandboxUnavailable:
                return  # gone: nothing left to renew
            except SandboxError:
                continue  # the next beat retries; the lease has two more thirds to go

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
        on_output: OutputCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> CommandResult:
        """Run ``command`` with bash in the working directory; stream its output line by line.

        ``env`` adds to the spec's environment for this command only. A non-zero exit is returned,
        not raised; ``CommandTimeout`` is raised when ``timeout_s`` passes (the process tree is
        killed first) and carries the output produced until then, ``SandboxUnavailable`` when the
        sandbox dies underneath the command. ``on_output`` receives the raw chunks as they arrive
        (for relaying output as is, e.g. a daemon forwarding bytes), before they are split in lines.
        Setting ``cancel`` (from any thread) kills the command and everything it started; ``run``
        then returns its result (exit code 137, killed by SIGKILL).
        """
        self._check_alive()
        if timeout_s is not None and timeout_s <= 0:
            raise ConfigurationError(f"timeout_s must be positive or None; got {timeout_s!r}.")
        out, err = LineSplitter(on_stdout), LineSplitter(on_stderr)
        merged_env = {**self.spec.env, **check_env(env or {}, "Sandbox.run(env=...)")}
        feed_out, feed_err = out.feed, err.feed
        if on_output is not None:

            def feed_out(chunk: str) -> None:
                on_output("stdout", chunk)
                out.feed(chunk)

            def feed_err(chunk: str) -> None:
                on_output("stderr", chunk)
                err.feed(chunk)

        finished = threading.Event()
        if cancel is not None:
            flag = f".mfsbx-cancel-{uuid.uuid4().hex[:16]}"
            command = cancellable(command, flag)
            threading.Thread(target=self._cancel_when, args=(cancel, finished, flag), daemon=True).start()
        try:
            exit_code = self._run(command, env=merged_env, timeout_s=timeout_s, on_stdout=feed_out, on_stderr=feed_err)
        except CommandTimeout as e:
            # The output so far is the base's to give, the same way on every backend.
            e.stdout, e.stderr = out.close(), err.close()
            raise
        finally:
            finished.set()
        return CommandResult(exit_code=exit_code, stdout=out.close(), stderr=err.close())

    def _cancel_when(self, cancel: threading.Event, finished: threading.Event, flag: str) -> None:
        while not finished.is_set():
            if cancel.wait(0.1):
                if not finished.is_set():
                    # A sandbox destroyed meanwhile has nothing left to cancel.
                    with contextlib.suppress(SandboxError):
                        self.upload(b"", flag)
                return

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
            self._lease_stop.set()
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

    def _renew_lease(self) -> None:  # noqa: B027 - optional hook: only leased sandboxes implement it
        """Push the provider-side lifetime forward by the lease (called from the lease thread when
        the sandbox was made with ``lease_s``); raise ``SandboxUnavailable`` when it is gone."""


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
    #: Whether ``SandboxSpec.image`` means anything to it (``local`` has no images): callers can
    #: refuse an image before any sandbox exists instead of at ``create``.
    runs_images: ClassVar[bool] = True
    #: Whether ``create`` honours ``SandboxSpec.read_only_dirs`` (shares this machine's directories).
    shares_host_dirs: ClassVar[bool] = False
    #: Other distribution names a required provider SDK may be installed under (a deprecated alias
    #: shipping the same code, e.g. ``{"daytona": "daytona-sdk"}``), in the same version range.
    #: ``metaflow-sandbox doctor`` checks the SDK's version under either name.
    sdk_aliases: ClassVar[Mapping[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        create = cls.__dict__.get("create")
        if create is not None and not getattr(create, "_refuses_unshared", False):
            cls.create = _refusing_unshared_dirs(create)  # type: ignore[method-assign,assignment]

    @abstractmethod
    def create(self, spec: SandboxSpec) -> Sandbox:
        """Create and start a sandbox; it is ready for ``run`` when this returns.

        A backend whose ``shares_host_dirs`` is false never sees a spec with ``read_only_dirs``:
        the base refuses it first (a silently missing directory would fail far from its cause)."""

    @abstractmethod
    def list(self, labels: Mapping[str, str] | None = None) -> list[SandboxInfo]:
        """Live sandboxes of this backend that this library created (carrying ``OWNER_LABEL``, which
        ``create`` attaches) and all of ``labels``; never a sandbox made otherwise at the provider."""

    @abstractmethod
    def destroy(self, sandbox_id: str) -> None:
        """Destroy a sandbox by id (e.g. one found by ``list``); an unknown id is not an error."""


def _refusing_unshared_dirs(create: Callable[[Any, SandboxSpec], Sandbox]) -> Callable[[Any, SandboxSpec], Sandbox]:
    """``create`` that first refuses ``SandboxSpec.read_only_dirs`` on a backend that cannot share
    this machine's directories, before any sandbox exists (every subclass's ``create`` is wrapped,
    third-party ones included)."""

    @functools.wraps(create)
    def checked(self: SandboxBackend, spec: SandboxSpec) -> Sandbox:
        if spec.read_only_dirs and not type(self).shares_host_dirs:
            raise ConfigurationError(
                f"The {self.name} backend cannot share this machine's directories "
                f"(SandboxSpec.read_only_dirs: {', '.join(sorted(spec.read_only_dirs))}).",
                remedy="Upload the files with Sandbox.upload instead, or use a backend whose "
                "shares_host_dirs is true (local).",
            )
        return create(self, spec)

    checked._refuses_unshared = True  # type: ignore[attr-defined]
    return checked
