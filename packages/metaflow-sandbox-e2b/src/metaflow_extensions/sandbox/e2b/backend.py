"""The ``e2b`` backend: sandboxes on E2B (https://e2b.dev) through the official ``e2b`` SDK.

Layer: e2b backend. Imports: the standard library and core; the ``e2b`` SDK lazily (through
``errors.sdk``), so that importing this module never requires it.

How the core spec maps to E2B: ``image`` → template (default ``base``), ``env`` → ``envs`` (at
create and per command), ``labels`` → sandbox metadata (what ``list`` filters on), ``network=False``
→ ``allow_internet_access=False``, the lease (``$METAFLOW_SANDBOX_LEASE_S``, at most ``lifetime_s``)
→ the sandbox timeout, pushed forward by core's lease thread while the handle lives (and while a
command runs) so a long step never hits it and an orphan dies within the lease. CPU, memory and
disk are fixed by the template: asking for them warns (a GPU is refused). Commands run with ``bash
-l -c`` in ``/home/user`` (the default user's home, also the base of relative file paths).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from metaflow_extensions.sandbox.core import (
    ConfigurationError,
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
from metaflow_extensions.sandbox.core.provider import in_workdir
from metaflow_extensions.sandbox.core.retry import create_with_reconcile, with_retries

from .commands import CommandRun, CommandSettings
from .errors import KEY_REMEDY, TABLE, translate, translate_create, translate_download
from .sdk import sdk
from .transfer import Progress, WatchedReader, watched

T = TypeVar("T")
WORKDIR = "/home/user"
_TEMPLATE_SIZES = (
    "E2B sizes sandboxes by template, not per sandbox: build a template with the CPU and memory you "
    "need (`e2b template build --cpu-count N --memory-mb M`) and pass it as image=<template>."
)


TOKEN_LABEL = "metaflow-sandbox-create-token"
"""Unique per create call: finds the sandbox of a create whose answer was lost."""


def _streams_uploads() -> bool:
    """Whether this SDK streams a file object on upload (``use_octet_stream``, 2.3x and later)."""
    from e2b.sandbox_sync.filesystem.filesystem import Filesystem

    return "use_octet_stream" in inspect.signature(Filesystem.write).parameters


class E2BResourceWarning(UserWarning):
    """Requested resources that E2B cannot give per sandbox (they are fixed by the template)."""


def _call(action: Callable[[], T], doing: str, *, sandbox_id: str | None = None, endpoint: str | None = None) -> T:
    """Run an SDK call to the API at ``endpoint``, translating whatever it raises into a core error."""
    return TABLE.call(action, doing, sandbox_id=sandbox_id, endpoint=endpoint)


class E2BSandbox(Sandbox):
    """A live E2B sandbox; ``sdk`` is the SDK's ``Sandbox`` object."""

    def __init__(self, sdk_sandbox: Any, spec: SandboxSpec, backend: E2BBackend):
        self.sdk = sdk_sandbox
        self.backend_ref = backend
        self.timeout_s = backend.sandbox_timeout(spec)
        # The timeout is the lease: core's lease thread renews it (``_renew_lease``) while this lives.
        super().__init__(sdk_sandbox.sandbox_id, "e2b", spec, lease_s=float(self.timeout_s))
        # How long E2B actually grants (a plan may cap the timeout); learned without delaying create.
        self._window = float(self.timeout_s)
        self._last_refresh = time.monotonic()
        threading.Thread(target=self._learn_window, name=f"e2b-info-{self.id}", daemon=True).start()

    def _learn_window(self) -> None:
        with contextlib.suppress(Exception):
            info = self.sdk.get_info(request_timeout=self.backend_ref.request_timeout_s)
            granted = (info.end_at - datetime.now(timezone.utc)).total_seconds()
            if granted > 0:
                self._window = min(self._window, granted)

    def refresh_every(self) -> float:
        """How often to push the deadline forward: well inside the granted window."""
        return max(0.5, self._window / 3)

    # -- used by CommandRun while a command runs -------------------------------------------------

    def keep_alive(self) -> None:
        """Reset the sandbox's deadline to now + its timeout."""
        timeout = self.timeout_s

        def refresh() -> None:
            try:
                self.sdk.set_timeout(timeout, request_timeout=self.backend_ref.request_timeout_s)
            except Exception as e:
                if isinstance(e, sdk().NotFoundException) or "404" in str(e)[:4]:
                    raise SandboxUnavailable(
                        f"Sandbox {self.id} is gone (expired or killed).", sandbox_id=self.id
                    ) from e
                raise translate(e, "extending the sandbox's timeout", sandbox_id=self.id) from e

        with_retries(refresh, attempts=3, cap_s=2.0)
        self._last_refresh = time.monotonic()

    def _renew_lease(self) -> None:
        self.keep_alive()

    def refresh_if_due(self) -> None:
        """Before each operation: extend the timeout if a third of it passed since the last time
        (long transfers or idle gaps between commands must not let the sandbox expire)."""
        if time.monotonic() - self._last_refresh < self.refresh_every():
            return
        try:
            self.keep_alive()
        except SandboxUnavailable:
            raise
        except SandboxError:
            pass  # the operation itself will report a real problem

    def _envd(self, action: Callable[[], T], doing: str) -> T:
        """Run an SDK call to the sandbox's daemon; a broken connection to a sandbox that is
        still alive is transient, to a dead one final."""
        try:
            return action()
        except SandboxError:
            raise
        except Exception as e:
            error = translate(e, doing, sandbox_id=self.id, envd=True)
            if isinstance(error, SandboxUnavailable) and TABLE.is_transport(e) and self.is_alive():
                error = TransientError(f"E2B failed while {doing}: {e!r}", sandbox_id=self.id)
            raise error from e

    def running_pids(self) -> set[int]:
        processes = self._envd(
            lambda: self.sdk.commands.list(request_timeout=self.backend_ref.request_timeout_s), "listing processes"
        )
        return {int(p.pid) for p in processes}

    def is_alive(self) -> bool:
        try:
            return bool(self.sdk.is_running(request_timeout=min(10.0, self.backend_ref.request_timeout_s)))
        except Exception:
            return False

    # -- the Sandbox primitives ------------------------------------------------------------------

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
        self.refresh_if_due()
        return CommandRun(
            self,
            self.backend_ref.command_settings,
            command,
            env=env,
            timeout_s=timeout_s,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
        ).run()

    def _upload(self, src: Path, dst: str) -> None:
        self.refresh_if_due()
        path = self._path(dst)
        streams = self.backend_ref.streams_uploads

        def send(progress: Progress) -> None:
            with src.open("rb") as raw:
                data = WatchedReader(raw, progress) if streams else raw
                self._envd(lambda: self.sdk.files.write(path, data), f"uploading to {path!r}")

        def write() -> None:
            if not streams:
                # Older SDKs read the file whole and send it with per-operation timeouts.
                return send(Progress())
            # Newer SDKs stream a file object with no client-side timeout: watch its progress.
            try:
                watched(send, idle_s=self.backend_ref.request_timeout_s, what=f"Upload to {path!r}", sandbox_id=self.id)
            except TransientError as e:
                if not self.is_alive():
                    raise SandboxUnavailable(f"Sandbox {self.id} died during an upload.", sandbox_id=self.id) from e
                raise

        with_retries(write)

    def _download(self, src: str, dst: Path) -> None:
        self.refresh_if_due()
        path = self._path(src)

        def read() -> None:
            try:
                with dst.open("wb") as out:
                    for chunk in self.sdk.files.read(path, format="stream"):
                        out.write(chunk)
            except SandboxError:
                raise
            except Exception as e:
                error = translate_download(e, path, self.id)
                if isinstance(error, SandboxUnavailable) and TABLE.is_transport(e) and self.is_alive():
                    error = TransientError(f"E2B failed while downloading {path!r}: {e!r}", sandbox_id=self.id)
                raise error from e

        with_retries(read)

    def _destroy(self) -> None:
        self.backend_ref.destroy(self.id)


class E2BBackend(SandboxBackend):
    """Sandboxes on E2B.

    Parameters
    ----------
    api_key : str, optional
        Default ``$E2B_API_KEY``. Required.
    template : str, optional
        The template used when a spec has no ``image``. Default ``$METAFLOW_SANDBOX_E2B_TEMPLATE``,
        else E2B's ``base``.
    workdir : str, default "/home/user"
        Where commands run and relative paths point.
    check_interval_s : float, optional
        While a command runs: how often to check that the sandbox and the command's output stream
        are alive (a stalled stream is reported within two intervals) and, at most, how often to
        extend the sandbox's timeout. Default ``$METAFLOW_SANDBOX_E2B_CHECK_INTERVAL_S``, else 30.
    request_timeout_s : float, default 60
        Bound on each API call, and on how long starting a command may take.
    max_timeout_s : int, default 3600
        Cap on the E2B sandbox timeout (E2B refuses more than 1 h on Hobby plans, 24 h on Pro).
        Commands still run longer (the timeout is extended while they run); the cap only bounds
        how long a sandbox whose owner vanished lingers.
    api_url, sandbox_url, domain : str, optional
        Where E2B is (default ``$E2B_API_URL``, ``$E2B_SANDBOX_URL``, ``$E2B_DOMAIN`` or e2b.app).
    """

    name = "e2b"
    options = (
        Option("api_key", secret=True, env=("E2B_API_KEY",), help="API key"),
        Option("template", help="template for specs without an image; default E2B's `base`"),
        Option("workdir", default=WORKDIR, help="where commands run and relative paths point"),
        Option("check_interval_s", float, 30.0, positive=True, help="how often a running command is checked"),
        Option("request_timeout_s", float, 60.0, positive=True, help="bound on each API call and command start"),
        Option("max_timeout_s", int, 3600, positive=True, help="cap on the sandbox timeout (Hobby 1 h, Pro 24 h)"),
        Option("api_url", env=("E2B_API_URL",), help="self-hosted E2B, or the test emulator"),
        Option("sandbox_url", env=("E2B_SANDBOX_URL",), help="self-hosted E2B, or the test emulator"),
        Option("domain", env=("E2B_DOMAIN",), help="default `e2b.app`"),
    )  # fmt: skip

    def __init__(
        self,
        *,
        api_key: str | None = None,
        template: str | None = None,
        workdir: str = WORKDIR,
        check_interval_s: float = 30.0,
        request_timeout_s: float = 60.0,
        max_timeout_s: int = 3600,
        api_url: str | None = None,
        sandbox_url: str | None = None,
        domain: str | None = None,
    ):
        self._e2b = sdk()
        # Options arrive resolved by ``get_backend`` (coerced, environment defaults filled in).
        if not api_key:
            raise ConfigurationError("The e2b sandbox backend needs an E2B API key; none is set.", remedy=KEY_REMEDY)
        self.max_timeout_s = int(max_timeout_s)
        self.lease_s = lease_s()
        self.template = template or None
        self.workdir = workdir.rstrip("/") or "/"
        self.check_interval_s = float(check_interval_s)
        self.request_timeout_s = float(request_timeout_s)
        given = {"api_url": api_url, "sandbox_url": sandbox_url, "domain": domain}
        self.endpoint = api_url or f"https://api.{domain or 'e2b.app'}"
        self._opts: dict[str, Any] = {
            "api_key": api_key,
            "request_timeout": self.request_timeout_s,
            **{k: v for k, v in given.items() if v},
        }
        # Newer SDKs accept an idempotency key, which makes retrying a create safe.
        self._idempotent_create = "idempotency_key" in inspect.signature(self._e2b.Sandbox.create).parameters
        # Newer SDKs stream file objects on upload (and then put no client timeout on them).
        self.streams_uploads = _streams_uploads()
        self.command_settings = CommandSettings(self.workdir, self.check_interval_s, self.request_timeout_s)

    def sandbox_timeout(self, spec: SandboxSpec) -> int:
        """The E2B timeout for ``spec``: the lease (``$METAFLOW_SANDBOX_LEASE_S``), at most its
        lifetime and what every E2B plan accepts."""
        return max(1, int(min(self.lease_s, spec.lifetime_s, self.max_timeout_s)))

    def _check_resources(self, spec: SandboxSpec) -> None:
        res = spec.resources
        if res.gpu:
            raise ConfigurationError(f"E2B sandboxes have no GPUs (asked for gpu={res.gpu}).", remedy=_TEMPLATE_SIZES)
        asked = {k: v for k, v in (("cpu", res.cpu), ("memory_mb", res.memory_mb), ("disk_mb", res.disk_mb)) if v}
        if asked:
            shown = ", ".join(f"{k}={v}" for k, v in asked.items())
            template = spec.image or self.template or "base"
            warnings.warn(
                f"E2B cannot size a sandbox per request ({shown} ignored; the template {template!r} decides). "
                + _TEMPLATE_SIZES,
                E2BResourceWarning,
                stacklevel=3,
            )

    def create(self, spec: SandboxSpec) -> E2BSandbox:
        self._check_resources(spec)
        template = spec.image or self.template
        kwargs: dict[str, Any] = {
            "template": template,
            "timeout": self.sandbox_timeout(spec),
            "envs": dict(spec.env),
            "allow_internet_access": spec.network,
            **self._opts,
        }
        token = uuid.uuid4().hex
        kwargs["metadata"] = {**owned_labels(spec.labels), TOKEN_LABEL: token}
        if self._idempotent_create:
            kwargs["idempotency_key"] = token

        def attempt() -> E2BSandbox:
            try:
                return E2BSandbox(self._e2b.Sandbox.create(**kwargs), spec, self)
            except Exception as e:
                raise translate_create(e, template or "base", self.endpoint) from e

        def adopt() -> E2BSandbox | None:
            # Creating is not idempotent on every SDK: a lost answer may hide a sandbox. Adopt it.
            found = self._list_sdk({TOKEN_LABEL: token})
            if not found:
                return None
            connected = _call(
                lambda: self._e2b.Sandbox.connect(found[0].sandbox_id, **self._opts),
                "adopting a created sandbox",
                endpoint=self.endpoint,
            )
            return E2BSandbox(connected, spec, self)

        return create_with_reconcile(attempt, adopt)

    def _list_sdk(self, labels: Mapping[str, str]) -> list[Any]:
        """The SDK's sandbox records carrying ``labels`` (all pages)."""
        query = self._e2b.SandboxQuery(metadata=dict(labels))

        def fetch() -> list[Any]:
            pages = self._e2b.Sandbox.list(query=query, limit=100, **self._opts)
            found: list[Any] = []
            while pages.has_next:
                found += pages.next_items()
            return found

        return with_retries(lambda: _call(fetch, "listing sandboxes", endpoint=self.endpoint))

    def list(self, labels: Mapping[str, str] | None = None) -> list[SandboxInfo]:
        wanted = owned_labels(labels)
        return sorted(
            (
                SandboxInfo(id=s.sandbox_id, backend=self.name, labels=dict(s.metadata or {}))
                for s in self._list_sdk(wanted)
                # Checked here too: the filter is the server's, and this is the contract.
                if wanted.items() <= dict(s.metadata or {}).items()
            ),
            key=lambda info: info.id,
        )

    def destroy(self, sandbox_id: str) -> None:
        # Sandbox.kill answers False for an unknown id: already gone is not an error.
        with_retries(
            lambda: _call(
                lambda: self._e2b.Sandbox.kill(sandbox_id, **self._opts),
                "destroying a sandbox",
                sandbox_id=sandbox_id,
                endpoint=self.endpoint,
            )
        )
