"""The ``daytona`` backend: core's ``SandboxBackend``/``Sandbox`` on the official Daytona SDK.

Layer: backend. Imports: the standard library, core, and this package (``sdk``, ``errors``,
``commands``, ``transfer``). The SDK itself is imported lazily through ``sdk.load_sdk``.

How the core spec maps onto Daytona (details in the package README):

- ``image`` → a sandbox built from that registry image (``CreateSandboxFromImageParams``); no
  image → a snapshot (the backend's ``snapshot=`` option, else Daytona's default): the fast path.
- resources → whole vCPUs and GiB, rounded up (``memory_mb=1500`` → 2 GiB); Daytona sizes
  snapshot sandboxes by the snapshot, so resources only apply with an image.
- ``network=False`` → ``network_block_all``; ``env`` → the sandbox's env and every command's.
- the lease (``$METAFLOW_SANDBOX_LEASE_S``, at most ``lifetime_s``) → auto-stop after that much
  inactivity (whole minutes), then immediate auto-delete: an orphan dies within minutes. While a
  handle is alive, core's lease thread refreshes the sandbox's activity (``_renew_lease``), so a
  long step is never auto-stopped (processes inside do not count as activity on Daytona).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from metaflow_extensions.sandbox.core import (
    CommandTimeout,
    ConfigurationError,
    ImageError,
    Option,
    Sandbox,
    SandboxBackend,
    SandboxError,
    SandboxInfo,
    SandboxSpec,
    SandboxUnavailable,
    TransientError,
    lease_s,
    owned_labels,
)
from metaflow_extensions.sandbox.core.retry import create_with_reconcile

from . import transfer
from .commands import SessionCommand, wrap
from .errors import KEYS_URL, call, is_not_found
from .sdk import load_sdk

TOKEN_LABEL = "metaflow-sandbox-create-token"
"""Unique per create call: finds the sandbox of a create whose answer was lost."""
_GONE_STATES = {"destroyed", "destroying"}
DEFAULT_API_URL = "https://app.daytona.io/api"


def _gib(megabytes: int | None) -> int | None:
    return None if megabytes is None else max(1, math.ceil(megabytes / 1024))


def _state(sdk_sandbox: Any) -> str:
    state = getattr(sdk_sandbox, "state", None)
    return str(getattr(state, "value", state) or "").lower()


class DaytonaSandbox(Sandbox):
    """A running Daytona sandbox (wraps the SDK's ``Sandbox``)."""

    def __init__(self, backend: DaytonaBackend, sdk_sandbox: Any, spec: SandboxSpec):
        self._backend = backend
        self._sdk_sandbox = sdk_sandbox
        self._workdir: str | None = None
        super().__init__(str(sdk_sandbox.id), "daytona", spec, lease_s=backend.lease_for(spec))

    def _renew_lease(self) -> None:
        # Activity resets the auto-stop countdown (processes inside do not count on Daytona).
        self._call("refreshing activity", self._sdk_sandbox.refresh_activity, retry=False)

    def _call(self, what: str, fn: Callable[[], Any], retry: bool = True) -> Any:
        return call(what, fn, retry=retry, sandbox_id=self.id)

    def _ensure_alive(self) -> None:
        """Raise ``SandboxUnavailable`` unless the sandbox is still running at Daytona."""
        if self.destroyed:
            raise SandboxUnavailable(f"Sandbox {self.id} was destroyed while a command ran.", sandbox_id=self.id)
        state, reason = self._backend._state_of(self.id)
        if state != "started":
            detail = f": {reason}" if reason else ""
            raise SandboxUnavailable(
                f"Daytona sandbox {self.id} is {state or 'gone'} while a command ran{detail}.", sandbox_id=self.id
            )

    def _work_dir(self) -> str:
        if self._workdir is None:
            self._workdir = str(self._call("reading the working directory", self._sdk_sandbox.get_work_dir))
        return self._workdir

    def _run(
        self,
        command: str,
        *,
        env: Mapping[str, str],
        timeout_s: float | None,
        on_stdout: Callable[[str], None],
        on_stderr: Callable[[str], None],
    ) -> int:
        cmd = SessionCommand(self._sdk_sandbox, self._backend._sdk, self.id, self._ensure_alive)
        try:
            cmd.start(wrap(command, env, self._work_dir(), cmd.key))
        except SandboxError as e:
            if not e.transient:
                self._ensure_alive()  # a vanished sandbox is SandboxUnavailable, not a bare error
            raise
        follower = threading.Thread(target=cmd.follow, args=(on_stdout, on_stderr), daemon=True, name=f"logs-{cmd.key}")
        follower.start()
        try:
            finished = self._wait(cmd, timeout_s)
        except BaseException:
            cmd.stop.set()  # Ctrl-C: the caller's ``with`` block destroys the sandbox
            raise
        if not finished:
            cmd.kill()
            raise CommandTimeout(
                f"Command timed out after {timeout_s} s in Daytona sandbox {self.id}; its processes were killed.",
                timeout_s=timeout_s or 0.0,
                sandbox_id=self.id,
            )
        try:
            return cmd.result()
        finally:
            if cmd.failure is None:
                # Off the critical path: the command is over, its session is only bookkeeping.
                threading.Thread(target=cmd.delete_session, daemon=True).start()

    def _wait(self, cmd: SessionCommand, timeout_s: float | None) -> bool:
        """Wait for the command; False when ``timeout_s`` passed. Every ``check_interval_s`` the
        command record is consulted too, so a stalled log stream or a vanished sandbox cannot
        leave the caller waiting forever."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        interval = self._backend.check_interval_s
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return cmd.done.is_set()
            if cmd.done.wait(interval if left is None else min(interval, left)):
                return True
            if (deadline is None or time.monotonic() < deadline) and cmd.check():
                return True

    def _upload(self, src: Path, dst: str) -> None:
        transfer.upload(self._sdk_sandbox, src, dst, self.id)

    def _download(self, src: str, dst: Path) -> None:
        transfer.download(self._sdk_sandbox, src, dst, self.id)

    def _destroy(self) -> None:

        def delete() -> None:
            try:
                self._sdk_sandbox.delete()
            except Exception as e:
                if not is_not_found(e):
                    raise

        self._call("deleting the sandbox", delete)


class DaytonaBackend(SandboxBackend):
    """Sandboxes on Daytona (https://daytona.io), through the ``daytona`` SDK.

    Parameters
    ----------
    api_key : str, optional
        Default ``$DAYTONA_API_KEY`` (or ``$DAYTONA_JWT_TOKEN`` with ``$DAYTONA_ORGANIZATION_ID``).
    api_url : str, optional
        Default ``$DAYTONA_API_URL``, else ``https://app.daytona.io/api``.
    target : str, optional
        The region; default ``$DAYTONA_TARGET``, else the organization's default.
    snapshot : str, optional
        The snapshot for sandboxes without an image (the fast path); default Daytona's default snapshot.
    create_timeout_s : float, default 300
        How long creating (and, for an image, building) a sandbox may take.
    check_interval_s : float, default 15
        While a command runs, how often its state is checked besides following its log stream
        (a stream that stalls silently, or a sandbox that vanished, is noticed within this).
    """

    name = "daytona"
    options = (
        Option("api_key", secret=True, env=("DAYTONA_API_KEY",),
               help="API key (or `DAYTONA_JWT_TOKEN` + `DAYTONA_ORGANIZATION_ID`)"),
        Option("api_url", env=("DAYTONA_API_URL",), help="default `https://app.daytona.io/api`"),
        Option("target", env=("DAYTONA_TARGET",), help="the region; default the organization's"),
        Option("snapshot", help="snapshot for sandboxes without an image; default Daytona's"),
        Option("create_timeout_s", float, 300.0, positive=True, help="bound on creating (and building) a sandbox"),
        Option("check_interval_s", float, 15.0, positive=True, help="how often a running command is checked"),
    )  # fmt: skip
    # The deprecated alias ships the same SDK under another name (sdk.py imports either).
    sdk_aliases = {"daytona": "daytona-sdk"}

    def __init__(
        self,
        *,
        api_key: str | None = None,
        api_url: str | None = None,
        target: str | None = None,
        snapshot: str | None = None,
        create_timeout_s: float = 300,
        check_interval_s: float = 15,
    ):
        self._sdk, self.sdk_version = load_sdk()
        self.lease_s = lease_s()
        # Options arrive resolved by ``get_backend`` (coerced, environment defaults filled in).
        self.api_key = api_key
        self._jwt = os.environ.get("DAYTONA_JWT_TOKEN")
        self._org = os.environ.get("DAYTONA_ORGANIZATION_ID")
        if not self.api_key and not (self._jwt and self._org):
            raise ConfigurationError(
                "The daytona backend needs a Daytona API key and DAYTONA_API_KEY is not set.",
                remedy=f"Create a key at {KEYS_URL}, then: export DAYTONA_API_KEY=...",
            )
        self.api_url = api_url or None
        self.target = target or None
        self.snapshot = snapshot
        self.create_timeout_s = float(create_timeout_s)
        self.check_interval_s = float(check_interval_s)
        self._client: Any = None
        self._client_lock = threading.Lock()
        # The SDK's client module takes seconds to import (over a thousand modules, pydantic
        # models): start now, in the background, so it overlaps the caller's own preparations.
        # Everything else touching the SDK joins it first (two threads importing the same modules
        # can trip the import system's deadlock detection).
        self._prefetch = threading.Thread(target=getattr, args=(self._sdk, "Daytona", None), daemon=True)
        self._prefetch.start()

    def _api(self, what: str, fn: Callable[[], Any], *, retry: bool = True) -> Any:
        """A control-plane call: an unreachable API is reported naming its URL and DAYTONA_API_URL."""
        return call(what, fn, retry=retry, endpoint=self.api_url or DEFAULT_API_URL)

    @property
    def client(self) -> Any:
        """The SDK's ``Daytona`` client, made on first use (it opens connections)."""
        self._prefetch.join()
        with self._client_lock:
            if self._client is None:
                config = self._sdk.DaytonaConfig(
                    api_key=self.api_key,
                    api_url=self.api_url,
                    target=self.target,
                    **({"jwt_token": self._jwt, "organization_id": self._org} if not self.api_key else {}),
                )
                self._client = self._api("connecting", lambda: self._sdk.Daytona(config), retry=False)
            return self._client

    # -- create ----------------------------------------------------------------------------------

    def lease_for(self, spec: SandboxSpec) -> float:
        """The provider-side lifetime a live handle keeps renewing (``core.backend.lease_s``)."""
        return min(self.lease_s, spec.lifetime_s)

    def params(self, spec: SandboxSpec, token: str) -> Any:
        """The SDK's create parameters for ``spec`` (see the module docstring for the mapping)."""
        self._prefetch.join()
        sdk = self._sdk
        common: dict[str, Any] = {
            "env_vars": dict(spec.env),
            "labels": {**owned_labels(spec.labels), TOKEN_LABEL: token},
            # The lease, in Daytona's whole minutes: an orphan stops (then is deleted) that soon.
            "auto_stop_interval": max(1, math.ceil(self.lease_for(spec) / 60)),
            "auto_delete_interval": 0,
        }
        if not spec.network:
            common["network_block_all"] = True
        res = spec.resources
        wants_resources = any(v is not None for v in (res.cpu, res.memory_mb, res.disk_mb, res.gpu))
        if spec.image:
            resources = None
            if wants_resources:
                cpu = None if res.cpu is None else max(1, math.ceil(res.cpu))
                resources = sdk.Resources(cpu=cpu, memory=_gib(res.memory_mb), disk=_gib(res.disk_mb), gpu=res.gpu)
            return sdk.CreateSandboxFromImageParams(image=spec.image, resources=resources, **common)
        if wants_resources:
            warnings.warn(
                "Daytona sizes a sandbox made from a snapshot by the snapshot: the requested resources are "
                "ignored. Give an image to size the sandbox, or create a snapshot of the size you need.",
                stacklevel=3,
            )
        return sdk.CreateSandboxFromSnapshotParams(snapshot=self.snapshot, **common)

    def create(self, spec: SandboxSpec) -> DaytonaSandbox:
        token = uuid.uuid4().hex
        params = self.params(spec, token)

        def adopt() -> DaytonaSandbox | None:
            # Creating is not idempotent: a lost answer may hide a sandbox. Adopt it, if it started.
            found = self._by_token(token)
            if found is not None and _state(found) != "started":
                self._delete_quietly(found)
                found = None
            return None if found is None else DaytonaSandbox(self, found, spec)

        try:
            return create_with_reconcile(lambda: DaytonaSandbox(self, self._create_once(params), spec), adopt)
        except SandboxError as e:
            # A failed build or start leaves a sandbox behind at Daytona: remove it.
            leftover = self._by_token(token, quiet=True)
            if leftover is not None:
                self._delete_quietly(leftover)
            if "build" in str(e).lower() and not isinstance(e, (ImageError, TransientError)):
                raise ImageError(e.message, remedy="Check that the image builds and starts.") from e
            raise

    def _create_once(self, params: Any) -> Any:
        return self._api("create", lambda: self.client.create(params, timeout=self.create_timeout_s), retry=False)

    def _by_token(self, token: str, quiet: bool = False) -> Any:
        try:
            found = self._list_sdk({TOKEN_LABEL: token})
        except SandboxError:
            if quiet:
                return None
            raise
        return found[0] if found else None

    def _delete_quietly(self, sdk_sandbox: Any) -> None:
        with contextlib.suppress(SandboxError):
            self._api("deleting a sandbox", sdk_sandbox.delete)

    # -- list / destroy --------------------------------------------------------------------------

    def _list_sdk(self, labels: Mapping[str, str]) -> list[Any]:
        """SDK sandboxes carrying ``labels``, over both list APIs (cursor-paged since 0.226)."""
        client, sdk = self.client, self._sdk
        wanted = dict(labels)
        if hasattr(sdk, "ListSandboxesQuery"):
            return list(self._api("list", lambda: list(client.list(sdk.ListSandboxesQuery(labels=wanted)))))
        found: list[Any] = []
        page = 1
        while True:
            result = self._api("list", lambda: client.list(labels=wanted, page=page, limit=100))  # noqa: B023
            if isinstance(result, list):  # releases without pagination
                return result
            found += list(result.items)
            if page >= int(getattr(result, "total_pages", 1) or 1):
                return found
            page += 1

    def list(self, labels: Mapping[str, str] | None = None) -> list[SandboxInfo]:
        wanted = owned_labels(labels)
        return sorted(
            (
                SandboxInfo(id=str(s.id), backend=self.name, labels=dict(s.labels or {}))
                for s in self._list_sdk(wanted)
                if _state(s) not in _GONE_STATES and wanted.items() <= dict(s.labels or {}).items()
            ),
            key=lambda info: info.id,
        )

    def _state_of(self, sandbox_id: str) -> tuple[str, str]:
        """``(state, error reason)`` of a sandbox; ``("", "")`` when Daytona no longer knows it."""
        try:
            found = self._api("reading the sandbox state", lambda: self.client.get(sandbox_id))
        except SandboxError as e:
            if is_not_found(e.__cause__ or e):
                return "", ""
            raise
        return _state(found), str(getattr(found, "error_reason", "") or "")

    def destroy(self, sandbox_id: str) -> None:
        try:
            found = self._api("finding the sandbox", lambda: self.client.get(sandbox_id))
        except SandboxError as e:
            if is_not_found(e.__cause__ or e):
                return
            raise
        if _state(found) in _GONE_STATES:
            return

        def delete() -> None:
            try:
                found.delete()
            except Exception as e:
                if not is_not_found(e):
                    raise

        self._api("deleting the sandbox", delete)
