"""An example third-party backend, ``tmpdir``: each sandbox a private temporary directory whose
commands run as plain processes of the calling user.

Layer: a backend outside this repository's packages (what a third party writes). Imports: the
standard library and the public API of ``metaflow_extensions.sandbox.core`` only.

It isolates nothing (use the ``local`` backend for that); it exists to show, in one file, every
duty of a backend: translate the spec, stream output, honour timeouts by killing the process
group, keep ``destroy`` and ``list`` working from any process (state lives on disk), and raise core
errors only. ``tests/test_conformance.py`` runs core's shipped conformance suite against it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from metaflow_extensions.sandbox.core import (
    CommandTimeout,
    ConfigurationError,
    Option,
    Sandbox,
    SandboxBackend,
    SandboxError,
    SandboxFileNotFound,
    SandboxInfo,
    SandboxSpec,
    SandboxUnavailable,
)

BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _remove(directory: Path) -> None:
    """Kill every command still running in the sandbox at ``directory``, then delete it. The
    directory is renamed first, so a command ending under the kill sees its sandbox is gone."""
    trash = directory.with_name(f".trash-{directory.name}")
    try:
        directory.rename(trash)
    except FileNotFoundError:
        return
    for pid_file in trash.glob("pgids/*"):
        _kill_group(int(pid_file.name))
    shutil.rmtree(trash, ignore_errors=True)


class TmpdirSandbox(Sandbox):
    def __init__(self, sandbox_id: str, spec: SandboxSpec, directory: Path):
        super().__init__(sandbox_id, "tmpdir", spec)
        self.directory = directory
        self.workdir = directory / "work"

    def _path(self, path: str) -> Path:
        # Relative paths are the working directory's; absolute ones live inside the sandbox too.
        return self.workdir / path if not path.startswith("/") else self.directory / "root" / path.lstrip("/")

    def _run(
        self,
        command: str,
        *,
        env: Mapping[str, str],
        timeout_s: float | None,
        on_stdout: Callable[[str], None],
        on_stderr: Callable[[str], None],
    ) -> int:
        home = {"HOME": str(self.workdir), "TMPDIR": str(self.directory / "tmp")}
        proc = subprocess.Popen(
            ["bash", "-c", command],
            cwd=self.workdir,
            env={**BASE_ENV, **home, **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: one kill ends the whole tree
        )
        marker = self.directory / "pgids" / str(proc.pid)
        marker.touch()

        def pump(pipe: object, sink: Callable[[str], None]) -> None:
            for chunk in iter(lambda: pipe.read1(1 << 16), b""):  # type: ignore[attr-defined]
                sink(chunk.decode("utf-8", errors="replace"))

        pumps = [
            threading.Thread(target=pump, args=(proc.stdout, on_stdout), daemon=True),
            threading.Thread(target=pump, args=(proc.stderr, on_stderr), daemon=True),
        ]
        for thread in pumps:
            thread.start()
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
            raise CommandTimeout(
                f"Timed out after {timeout_s} s.", timeout_s=timeout_s or 0, sandbox_id=self.id
            ) from None
        finally:
            _kill_group(proc.pid)  # background children never outlive their command
            for thread in pumps:
                thread.join(5)
            marker.unlink(missing_ok=True)
        if self.destroyed or not self.directory.exists():
            raise SandboxUnavailable(f"Sandbox {self.id} was destroyed while a command ran.", sandbox_id=self.id)
        return code if code >= 0 else 128 - code

    def _upload(self, src: Path, dst: str) -> None:
        target = self._path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)

    def _download(self, src: str, dst: Path) -> None:
        source = self._path(src)
        if not source.is_file():
            raise SandboxFileNotFound(f"No file {src!r} in sandbox {self.id}.", sandbox_id=self.id)
        shutil.copyfile(source, dst)

    def _destroy(self) -> None:
        _remove(self.directory)


class TmpdirBackend(SandboxBackend):
    """Sandboxes in private temporary directories. Option ``root``: where they live."""

    name = "tmpdir"
    # Declared once: get_backend coerces strings, reads METAFLOW_SANDBOX_TMPDIR_ROOT, refuses others.
    options = (Option("root", help="where sandboxes live; default `$TMPDIR/sandbox-tmpdir-<uid>`"),)

    def __init__(self, root: str | None = None):
        self.root = Path(root or Path(tempfile.gettempdir()) / f"sandbox-tmpdir-{os.getuid()}")
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise ConfigurationError(f"Cannot use {self.root} for tmpdir sandboxes: {e}.") from e

    def create(self, spec: SandboxSpec) -> TmpdirSandbox:
        if spec.image is not None:
            raise ConfigurationError("The tmpdir backend has no images.", remedy="Remove the image.")
        if not spec.network:
            raise ConfigurationError("The tmpdir backend cannot cut the network.", remedy="Use the local backend.")
        sandbox_id = f"tmp-{uuid.uuid4().hex[:12]}"
        directory = self.root / sandbox_id
        for sub in ("work", "tmp", "pgids", "root"):
            (directory / sub).mkdir(parents=True)
        (directory / "labels.json").write_text(json.dumps(dict(spec.labels)))
        return TmpdirSandbox(sandbox_id, spec, directory)

    def list(self, labels: Mapping[str, str] | None = None) -> list[SandboxInfo]:
        found = []
        for meta in sorted(self.root.glob("tmp-*/labels.json")):
            try:
                have = json.loads(meta.read_text())
            except (OSError, ValueError) as e:  # being destroyed right now
                if meta.parent.exists():
                    raise SandboxError(f"Unreadable sandbox state {meta}: {e}") from e
                continue
            if dict(labels or {}).items() <= have.items():
                found.append(SandboxInfo(id=meta.parent.name, backend=self.name, labels=have))
        return found

    def destroy(self, sandbox_id: str) -> None:
        if sandbox_id.startswith("tmp-") and "/" not in sandbox_id:
            _remove(self.root / sandbox_id)
