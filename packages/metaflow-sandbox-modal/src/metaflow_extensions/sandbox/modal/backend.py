"""The ``modal`` backend: Modal Sandboxes (https://modal.com/docs/guide/sandbox) through the ``modal`` SDK.

Layer: modal backend. Imports: the standard library and core; the ``modal`` SDK lazily (through
``sdk``), so that importing this module never requires it.

How the core spec maps to Modal: ``image`` → ``Image.from_registry`` (default ``debian_slim``),
``resources`` → ``cpu``, ``memory`` (MiB) and ``gpu`` (a type string such as ``"A100"``, or a count
of the ``gpu_type`` option), ``env`` → ``env`` (at create and per exec), ``labels`` → sandbox tags
(what ``list`` filters on), ``network=False`` → ``block_network``, ``lifetime_s`` → ``timeout``
(at most Modal's 24 h), and the lease (``$METAFLOW_SANDBOX_LEASE_S``) → ``idle_timeout``: every exec
counts as activity, so core's lease thread renews it with a cheap exec, and an orphan dies within
the lease. Sandboxes belong to the app named by the ``app`` option (created on first use).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from metaflow_extensions.sandbox.core import (
    CommandTimeout,
    ConfigurationError,
    Option,
    Sandbox,
    SandboxBackend,
    SandboxError,
    SandboxInfo,
    SandboxSpec,
    SandboxUnavailable,
    cancellable,
    lease_s,
    owned_labels,
)
from metaflow_extensions.sandbox.core.provider import in_workdir
from metaflow_extensions.sandbox.core.retry import create_with_reconcile, with_retries

from .errors import TABLE, TOKEN_REMEDY, translate, translate_create, translate_download
from .sdk import sdk

T = TypeVar("T")
WORKDIR = "/root"
MAX_TIMEOUT_S = 24 * 3600  # Modal refuses longer sandbox timeouts
TOKEN_LABEL = "metaflow-sandbox-create-token"
"""Unique per create call: finds the sandbox of a create whose answer was lost."""


def _call(action: Callable[[], T], doing: str, *, sandbox_id: str | None = None) -> T:
    """Run an SDK call, translating whatever it raises into a core error."""
    return TABLE.call(action, doing, context="sandbox" if sandbox_id else "", sandbox_id=sandbox_id)


def _killable(command: str, flag: str) -> str:
    """``command`` under core's ``cancellable`` (creating ``flag`` kills its process group), with the
    wrapper's own stderr (bash's "Killed" job notice) discarded and the command's kept (fd 3)."""
    return "exec 3>&2 2>/dev/null\n" + cancellable("exec 2>&3 3>&-\n" + command, flag)


class ModalSandbox(Sandbox):
    """A live Modal sandbox; ``sdk`` is the SDK's ``Sandbox`` object."""

    def __init__(self, sdk_sandbox: Any, spec: SandboxSpec, backend: ModalBackend, idle_timeout_s: int):
        self.sdk = sdk_sandbox
        self.backend_ref = backend
        # The idle timeout is the lease: core's lease thread renews it (``_renew_lease``) while this lives.
        super().__init__(sdk_sandbox.object_id, "modal", spec, lease_s=float(idle_timeout_s))

    def _renew_lease(self) -> None:
        # Any exec is activity for Modal's idle timeout; `true` is the cheapest one.
        _call(lambda: self.sdk.exec("true").wait(), "renewing the sandbox's idle timeout", sandbox_id=self.id)

    def _path(self, path: str) -> str:
        return in_workdir(path, self.backend_ref.workdir)

    def _run(
        self,
        command: str,
        *,
        env: Mapping[str, str],
        timeout_s: float | None,
        on_stdout: Callable[[str], None],
        on_stderr: Callable[[str], None],
    ) -> int:
        flag = f".mfsbx-timeout-{uuid.uuid4().hex[:16]}"
        script = command if timeout_s is None else _killable(command, flag)
        proc = _call(
            lambda: self.sdk.exec("bash", "-c", script, env=dict(env) or None, workdir=self.backend_ref.workdir),
            "starting a command",
            sandbox_id=self.id,
        )
        failures: list[BaseException] = []

        def pump(stream: Iterable[str], sink: Callable[[str], None]) -> None:
            try:
                for chunk in stream:
                    sink(chunk)
            except BaseException as e:
                failures.append(e)

        readers = [
            threading.Thread(target=pump, args=(proc.stdout, on_stdout), daemon=True, name=f"modal-out-{self.id}"),
            threading.Thread(target=pump, args=(proc.stderr, on_stderr), daemon=True, name=f"modal-err-{self.id}"),
        ]
        for reader in readers:
            reader.start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        timed_out = False
        while any(r.is_alive() for r in readers):
            readers[0].join(0.1)
            if deadline is not None and not timed_out and time.monotonic() >= deadline:
                # The flag file kills the command's whole process group (see core's `cancellable`).
                timed_out = True
                self._upload_bytes(b"", self._path(flag))
        code = _call(proc.wait, "waiting for a command", sandbox_id=self.id)
        if self._ended():
            raise SandboxUnavailable(f"Sandbox {self.id} ended while a command ran in it.", sandbox_id=self.id)
        if timed_out:
            raise CommandTimeout(
                f"Command timed out after {timeout_s} s in sandbox {self.id}; its processes were killed.",
                timeout_s=timeout_s or 0.0,
                sandbox_id=self.id,
            )
        if failures:
            error = failures[0]
            raise translate(error, "reading a command's output", sandbox_id=self.id) from error
        return int(code)

    def _ended(self) -> bool:
        """Whether the sandbox itself has finished (terminated, timed out), as opposed to a command."""
        try:
            return self.sdk.poll() is not None
        except Exception:
            return True  # not even answerable: gone for this command's purposes

    def _upload_bytes(self, data: bytes, path: str) -> None:
        _call(lambda: self.sdk.filesystem.write_bytes(data, path), f"uploading to {path!r}", sandbox_id=self.id)

    def _upload(self, src: Path, dst: str) -> None:
        path = self._path(dst)
        with_retries(
            lambda: _call(
                lambda: self.sdk.filesystem.copy_from_local(src, path), f"uploading to {path!r}", sandbox_id=self.id
            )
        )

    def _download(self, src: str, dst: Path) -> None:
        path = self._path(src)

        def read() -> None:
            try:
                self.sdk.filesystem.copy_to_local(path, dst)
            except SandboxError:
                raise
            except Exception as e:
                raise translate_download(e, path, self.id) from e

        with_retries(read)

    def _destroy(self) -> None:
        self.backend_ref.destroy(self.id)


class ModalBackend(SandboxBackend):
    """Sandboxes on Modal.

    Parameters
    ----------
    token_id, token_secret : str, optional
        Default ``$MODAL_TOKEN_ID`` / ``$MODAL_TOKEN_SECRET``. Required.
    app : str, default "metaflow-sandbox"
        The Modal app the sandboxes belong to (created when missing).
    workdir : str, default "/root"
        Where commands run and relative paths point.
    gpu_type : str, default "A10G"
        The GPU type of a spec asking for a number of GPUs (``gpu=2`` → ``"A10G:2"``).
    """

    name = "modal"
    options = (
        Option("token_id", secret=True, env=("MODAL_TOKEN_ID",), help="token id (`modal token new`)"),
        Option("token_secret", secret=True, env=("MODAL_TOKEN_SECRET",), help="token secret"),
        Option("app", default="metaflow-sandbox", help="the Modal app sandboxes belong to (created if missing)"),
        Option("workdir", default=WORKDIR, help="where commands run and relative paths point"),
        Option("gpu_type", default="A10G", help="GPU type for a spec asking for a GPU count"),
    )  # fmt: skip

    def __init__(
        self,
        *,
        token_id: str | None = None,
        token_secret: str | None = None,
        app: str = "metaflow-sandbox",
        workdir: str = WORKDIR,
        gpu_type: str = "A10G",
    ):
        self._modal = sdk()
        if not token_id or not token_secret:
            raise ConfigurationError("The modal sandbox backend needs a Modal token; none is set.", remedy=TOKEN_REMEDY)
        self.app_name = app
        self.workdir = workdir.rstrip("/") or "/"
        self.gpu_type = gpu_type
        self.lease_s = lease_s()
        self._credentials = (token_id, token_secret)
        self._lock = threading.Lock()
        self._client_obj: Any = None
        self._app_obj: Any = None

    # -- the SDK's client and app, made on first use (both reach the network) ---------------------

    def _client(self) -> Any:
        with self._lock:
            if self._client_obj is None:
                token_id, token_secret = self._credentials
                self._client_obj = _call(
                    lambda: self._modal.Client.from_credentials(token_id, token_secret), "connecting to Modal"
                )
            return self._client_obj

    def _app(self) -> Any:
        client = self._client()
        with self._lock:
            if self._app_obj is None:
                self._app_obj = with_retries(
                    lambda: _call(
                        lambda: self._modal.App.lookup(self.app_name, create_if_missing=True, client=client),
                        f"looking up the app {self.app_name!r}",
                    )
                )
            return self._app_obj

    # -- spec mapping ----------------------------------------------------------------------------

    def idle_timeout(self, spec: SandboxSpec) -> int:
        """Modal's idle timeout for ``spec``: the lease, at most its lifetime and Modal's cap."""
        return max(1, int(min(self.lease_s, spec.lifetime_s, MAX_TIMEOUT_S)))

    def create_kwargs(self, spec: SandboxSpec) -> dict[str, Any]:
        """What ``Sandbox.create`` receives for ``spec`` (no app, image or client: those need the network)."""
        res = spec.resources
        kwargs: dict[str, Any] = {
            "timeout": max(1, int(min(spec.lifetime_s, MAX_TIMEOUT_S))),
            "idle_timeout": self.idle_timeout(spec),
            "block_network": not spec.network,
            "workdir": self.workdir,
        }
        if spec.env:
            kwargs["env"] = dict(spec.env)
        if res.cpu:
            kwargs["cpu"] = float(res.cpu)
        if res.memory_mb:
            kwargs["memory"] = int(res.memory_mb)
        if res.gpu:
            kwargs["gpu"] = self.gpu_type if res.gpu == 1 else f"{self.gpu_type}:{int(res.gpu)}"
        return kwargs

    def create(self, spec: SandboxSpec) -> ModalSandbox:
        kwargs = self.create_kwargs(spec)
        image_name = spec.image or "debian_slim"
        image = self._modal.Image.from_registry(spec.image) if spec.image else self._modal.Image.debian_slim()
        app, client = self._app(), self._client()
        token = uuid.uuid4().hex
        tags = {**owned_labels(spec.labels), TOKEN_LABEL: token}
        idle = int(kwargs["idle_timeout"])

        def attempt() -> ModalSandbox:
            try:
                made = self._modal.Sandbox.create(app=app, image=image, tags=tags, client=client, **kwargs)
            except Exception as e:
                raise translate_create(e, image_name) from e
            return ModalSandbox(made, spec, self, idle)

        def adopt() -> ModalSandbox | None:
            # A lost answer may hide a created sandbox: adopt it rather than make a second one.
            found = self._list_sdk({TOKEN_LABEL: token})
            return ModalSandbox(found[0], spec, self, idle) if found else None

        return create_with_reconcile(attempt, adopt)

    def _list_sdk(self, tags: Mapping[str, str]) -> list[Any]:
        app, client = self._app(), self._client()
        return with_retries(
            lambda: _call(
                lambda: list(self._modal.Sandbox.list(app_id=app.app_id, tags=dict(tags), client=client)),
                "listing sandboxes",
            )
        )

    def list(self, labels: Mapping[str, str] | None = None) -> list[SandboxInfo]:
        wanted = owned_labels(labels)
        found = []
        for sb in self._list_sdk(wanted):
            tags = dict(_call(sb.get_tags, "reading a sandbox's tags", sandbox_id=sb.object_id))
            # Checked here too: the filter is the server's, and this is the contract.
            if wanted.items() <= tags.items():
                found.append(SandboxInfo(id=sb.object_id, backend=self.name, labels=tags))
        return sorted(found, key=lambda info: info.id)

    def destroy(self, sandbox_id: str) -> None:
        client = self._client()

        def terminate() -> None:
            try:
                self._modal.Sandbox.from_id(sandbox_id, client=client).terminate()
            except Exception as e:
                if "NotFoundError" in type(e).__name__:
                    return  # already gone is not an error
                raise translate(e, "destroying a sandbox", sandbox_id=sandbox_id) from e

        with_retries(terminate)
