"""The ``local`` backend: each sandbox a private directory on this machine, zero setup.

Layer: core/local. Imports: the standard library and core (``backend``, ``spec``, ``errors``,
``local.isolation``, ``local.processes``).

On disk, under ``root`` (default ``$TMPDIR/metaflow-sandbox-local-<uid>``)::

    <id>/sandbox.json   id, labels, owner pid + start time, deadline (what ``list`` reads)
    <id>/fs/            the sandbox's root filesystem under bubblewrap; ``fs/home/sandbox`` is the
                        working directory (the process-mode cwd too), where the directories of
                        ``SandboxSpec.read_only_dirs`` are mounted read-only (copied in process mode)
    <id>/pids/<pgid>    process groups of running commands, so another process can kill them

A sandbox whose owner process is gone or whose lifetime passed is reaped on the next ``create``
or ``list`` (the local stand-in for a provider-side lifetime).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..backend import Sandbox, SandboxBackend
from ..errors import CommandTimeout, ConfigurationError, SandboxError, SandboxFileNotFound, SandboxUnavailable
from ..options import Option
from ..spec import SandboxInfo, SandboxSpec
from .isolation import (
    ISOLATION_MODES,
    WORKDIR,
    base_env,
    bwrap_prefix,
    prepare_rootfs,
    resolve_isolation,
    supervisor_prefix,
)
from .processes import Stopped, kill_tree, stream_process

ROOT_ENV = "METAFLOW_SANDBOX_LOCAL_ROOT"
# ext4's "top directory" inode flag (FS_TOPDIR_FL) and the ioctls that read and set inode flags.
_FS_IOC_GETFLAGS, _FS_IOC_SETFLAGS, _FS_TOPDIR_FL = 0x80086601, 0x40086602, 0x00020000
_ISOLATION_HELP = (
    "`auto`: bubblewrap when usable, else plain processes with a warning; `bwrap`: require it; `process`: no isolation"
)
_NOT_FOUND_EXIT = 44  # the download helper's "no such file" exit code
_UPLOAD = 'mkdir -p -- "$(dirname -- "$1")" && exec cat > "$1"'
_DOWNLOAD = f'[ -f "$1" ] || exit {_NOT_FOUND_EXIT}; exec cat -- "$1"'


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a live owner from a reused pid), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _rmtree(path: Path) -> None:
    """Remove ``path`` even where the sandbox made directories read-only."""

    def make_writable_and_retry(func: Callable[..., Any], failed: str, _exc: object) -> None:
        os.chmod(os.path.dirname(failed), 0o700)
        func(failed)

    # A killed process may still finish the system call it was in (bwrap creating a mount point):
    # a directory that is not empty yet is tried again, briefly.
    for delay in (0.05, 0.2, 0.5, None):
        try:
            if path.exists():
                shutil.rmtree(path, onerror=make_writable_and_retry)
            return
        except OSError as e:
            if e.errno != errno.ENOTEMPTY or delay is None:
                raise
            time.sleep(delay)


class LocalSandbox(Sandbox):
    """A sandbox on this machine; see the module docstring for the layout."""

    def __init__(self, sandbox_id: str, spec: SandboxSpec, directory: Path, isolation: str):
        super().__init__(sandbox_id, "local", spec)
        self.directory = directory
        self.isolation = isolation
        self._rootfs = directory / "fs"
        self._workdir = self._rootfs / WORKDIR.lstrip("/")
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._procs_lock = threading.Lock()
        if isolation == "bwrap":
            self._prefix = bwrap_prefix(self._rootfs, network=spec.network, read_only=spec.read_only_dirs)
            self._env = base_env(home=WORKDIR, tmpdir="/tmp")
        else:
            self._prefix = supervisor_prefix()
            self._env = base_env(home=str(self._workdir), tmpdir=str(self._rootfs / "tmp"))

    @property
    def workdir(self) -> Path:
        """The working directory as seen from the host."""
        return self._workdir

    def _exec(self, argv: list[str], env: Mapping[str, str], **kwargs: Any) -> int:
        pids = self.directory / "pids"

        def track(proc: subprocess.Popen[bytes]) -> None:
            with self._procs_lock:
                self._procs.add(proc)
            (pids / str(proc.pid)).touch()

        gone = f"Sandbox {self.id} was destroyed while a command ran."
        # No raise in a `finally`: a signal handler's SystemExit (raised after it destroyed every
        # live sandbox) must reach the caller as it is, with its 128 + N, not become this error.
        try:
            code = stream_process(
                [*self._prefix, *argv], cwd=self._workdir, env={**self._env, **env}, on_start=track, **kwargs
            )
        except Exception as e:
            if self._gone():
                raise SandboxUnavailable(gone, sandbox_id=self.id) from e
            raise
        finally:
            with self._procs_lock:
                for proc in [p for p in self._procs if p.returncode is not None]:
                    self._procs.discard(proc)
                    (pids / str(proc.pid)).unlink(missing_ok=True)
        if self._gone():
            raise SandboxUnavailable(gone, sandbox_id=self.id)
        return code

    def _gone(self) -> bool:
        return self.destroyed or not self.directory.exists()

    def _run(
        self,
        command: str,
        *,
        env: Mapping[str, str],
        timeout_s: float | None,
        on_stdout: Callable[[str], None],
        on_stderr: Callable[[str], None],
    ) -> int:
        try:
            code = self._exec(
                ["bash", "-c", command], env, on_stdout=on_stdout, on_stderr=on_stderr, timeout_s=timeout_s
            )
        except Stopped:
            # The output so far is the base class's to attach (``Sandbox.run``).
            raise CommandTimeout(
                f"Command timed out after {timeout_s} s in sandbox {self.id}; its processes were killed.",
                timeout_s=timeout_s or 0.0,
                sandbox_id=self.id,
            ) from None
        # Like a shell: a command killed by signal N exits 128 + N.
        return code if code >= 0 else 128 - code

    def _transfer(self, script: str, path: str, **streams: Any) -> tuple[int, str]:
        err: list[str] = []
        code = self._exec(["bash", "-c", script, "transfer", path], {}, on_stdout=None, on_stderr=err.append, **streams)
        return code, "".join(err).strip()

    def _upload(self, src: Path, dst: str) -> None:
        with src.open("rb") as stdin:
            code, err = self._transfer(_UPLOAD, dst, stdin=stdin)
        if code != 0:
            raise SandboxError(f"Upload to {dst!r} in sandbox {self.id} failed: {err}", sandbox_id=self.id)

    def _download(self, src: str, dst: Path) -> None:
        with dst.open("wb") as stdout:
            code, err = self._transfer(_DOWNLOAD, src, stdout_file=stdout)
        if code == _NOT_FOUND_EXIT:
            raise SandboxFileNotFound(f"No file {src!r} in sandbox {self.id}.", sandbox_id=self.id)
        if code != 0:
            raise SandboxError(f"Download of {src!r} from sandbox {self.id} failed: {err}", sandbox_id=self.id)

    def _destroy(self) -> None:
        with self._procs_lock:
            for proc in self._procs:
                kill_tree(proc.pid)
        _remove_sandbox_dir(self.directory)


def _bubblewraps_of(rootfs: Path) -> list[int]:
    """Every bubblewrap process of the sandbox whose root is ``rootfs``, found by its command line.

    The pid files name only the outer bwrap of each command. If the launcher dies while bwrap is
    still setting up, the outer one dies with it before the inner one (the pid namespace's init)
    has armed its own parent-death signal; the inner one, re-parented to init, is then out of
    reach of a walk down from the pid file. Killing it ends its whole pid namespace.
    """
    needle = f"\0--bind\0{rootfs}\0/\0".encode()
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in b"\0" + Path(entry.path, "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def _running_in(directory: Path, state: Path) -> list[int]:
    """Live processes of the sandbox made at ``directory`` whose state (pid files) is now at
    ``state``: those its pid files name (only while they still mention its path: a recycled pid
    would not) and its bubblewraps."""
    found = _bubblewraps_of(directory / "fs")
    for pid_file in (state / "pids").glob("*"):
        pid = int(pid_file.name)
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            cwd = os.readlink(f"/proc/{pid}/cwd")
            if str(directory).encode() in cmdline or cwd.startswith((f"{directory}/", f"{state}/")):
                found.append(pid)
    return found


def _remove_sandbox_dir(directory: Path) -> None:
    """Kill what runs in the sandbox at ``directory`` (from any process), then delete it.

    The directory is renamed first: ``list()`` never sees a half-deleted sandbox, and a command
    ending under the kill finds its sandbox gone. Killing is repeated until nothing of the sandbox
    is left: a bwrap that was still starting when its launcher died may create its inner process
    after the first look.
    """
    trash = directory.with_name(f".trash-{directory.name}-{uuid.uuid4().hex[:6]}")
    try:
        directory.rename(trash)
    except FileNotFoundError:
        return
    for _ in range(40):
        victims = _running_in(directory, trash)
        if not victims:
            break
        for pid in victims:
            kill_tree(pid)
        time.sleep(0.025)
    _rmtree(trash)


def spread_subdirectories(directory: Path) -> None:
    """Ask ext4 to place each sandbox in its own block group, as it does for top-level directories.

    ext4 allocates a subdirectory's inodes near its parent's and, for a minute, skips inodes freed
    recently. A sandbox unpacks ~1,000 files (the code package) and its destroy frees them, so
    sandboxes created one after another under one parent scan ever longer runs of just-freed
    inodes: unpacking took 0.3 s to 0.9 s instead of 35 ms in the linear benchmark flow. Best
    effort: other filesystems do not know the flag, and nothing depends on it.
    """
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            flags = int.from_bytes(fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(8))[:4], "little")
            if not flags & _FS_TOPDIR_FL:
                fcntl.ioctl(fd, _FS_IOC_SETFLAGS, (flags | _FS_TOPDIR_FL).to_bytes(4, "little") + bytes(4))
        finally:
            os.close(fd)


def _share_dirs(read_only: Mapping[str, str], workdir: Path, *, copy: bool) -> None:
    """Give a new sandbox the directories of ``SandboxSpec.read_only_dirs`` under ``workdir``.

    Under bubblewrap only the mount points are made: each command mounts the shared directory
    read-only there, so a thousand-file code package costs nothing per sandbox and no task can
    change it. Process mode has no mounts and no isolation: each sandbox gets its own copy (its
    commands could write to the shared one through any path anyway, so a copy keeps one task's
    accidents away from the next).
    """
    for inside, host in read_only.items():
        target = workdir / inside
        if copy:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(host, target, symlinks=True)
        else:
            target.mkdir(parents=True, exist_ok=True)


class LocalBackend(SandboxBackend):
    """Sandboxes on this machine. ``isolation``: ``auto`` (bubblewrap if usable, else processes
    with a warning), ``bwrap`` (required) or ``process`` (no isolation); default from
    ``$METAFLOW_SANDBOX_LOCAL_ISOLATION``. ``root``: where sandboxes live (``$METAFLOW_SANDBOX_LOCAL_ROOT``).

    There are no images: sandboxes see this machine's system and the launcher's Python
    environment, read-only. Resources are not enforced.
    """

    name = "local"
    runs_launcher_python = True
    shares_host_dirs = True
    runs_images = False
    options = (
        Option("isolation", default="auto", choices=ISOLATION_MODES, help=_ISOLATION_HELP),
        Option("root", help="where sandboxes live; default `$TMPDIR/metaflow-sandbox-local-<uid>`"),
    )

    def __init__(self, isolation: str | None = None, root: str | os.PathLike[str] | None = None):
        self.isolation = resolve_isolation(isolation)
        default_root = Path(tempfile.gettempdir()) / f"metaflow-sandbox-local-{os.getuid()}"
        self.root = Path(root or os.environ.get(ROOT_ENV) or default_root).absolute()

    def create(self, spec: SandboxSpec) -> LocalSandbox:
        missing = [host for host in spec.read_only_dirs.values() if not os.path.isdir(host)]
        if missing:
            raise ConfigurationError(
                f"SandboxSpec.read_only_dirs names {missing[0]!r}, which is not a directory on this machine.",
                remedy="Create the directory first, or remove it from read_only_dirs.",
            )
        if spec.image is not None:
            raise ConfigurationError(
                f"The local backend has no images (got image={spec.image!r}): it uses this machine's system.",
                remedy="Remove the image, or choose a backend that runs images (daytona, e2b).",
            )
        if not spec.network and self.isolation != "bwrap":
            raise ConfigurationError(
                "network=False needs bubblewrap; plain processes cannot be cut off the network.",
                remedy="Install bubblewrap (sudo apt-get install -y bubblewrap) or allow network access.",
            )
        self._reap()
        spread_subdirectories(self.root)
        sandbox_id = f"sbx-{uuid.uuid4().hex[:12]}"
        directory = self.root / sandbox_id
        (directory / "pids").mkdir(parents=True, mode=0o700)
        for sub in (WORKDIR, "/tmp"):
            (directory / "fs" / sub.lstrip("/")).mkdir(parents=True, exist_ok=True)
        if self.isolation == "bwrap":
            prepare_rootfs(directory / "fs")
        _share_dirs(spec.read_only_dirs, directory / "fs" / WORKDIR.lstrip("/"), copy=self.isolation != "bwrap")
        meta = {
            "id": sandbox_id,
            "labels": dict(spec.labels),
            "owner_pid": os.getpid(),
            "owner_start": _start_time(os.getpid()),
            "deadline": time.time() + spec.lifetime_s,
            "isolation": self.isolation,
        }
        (directory / "sandbox.json").write_text(json.dumps(meta))
        return LocalSandbox(sandbox_id, spec, directory, self.isolation)

    def _sandboxes(self) -> list[tuple[Path, dict[str, Any]]]:
        found = []
        for meta_file in self.root.glob("sbx-*/sandbox.json"):
            with contextlib.suppress(OSError, ValueError):
                found.append((meta_file.parent, json.loads(meta_file.read_text())))
        return found

    def _ensure_root(self) -> None:
        """Private to its owner: files a sandbox makes are its user's on the host (setuid bits
        included), so no other user of this machine may reach them. A root this user cannot make
        or write is a configuration error naming the fix (``list`` finds it before a run starts)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            if self.root.stat().st_uid == os.getuid():
                self.root.chmod(0o700)
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise PermissionError(13, "not writable")
        except OSError as e:
            raise ConfigurationError(
                f"The local backend cannot keep its sandboxes in {self.root} ({e.strerror or e}).",
                remedy=f"Set {ROOT_ENV} (or the option root=) to a directory you can write, or unset it.",
            ) from e

    def _reap(self) -> None:
        """Remove sandboxes whose owner died or whose lifetime passed."""
        self._ensure_root()
        for directory, meta in self._sandboxes():
            owner_alive = _start_time(meta["owner_pid"]) == meta["owner_start"]
            if not owner_alive or time.time() > meta["deadline"]:
                _remove_sandbox_dir(directory)

    def list(self, labels: Mapping[str, str] | None = None) -> list[SandboxInfo]:
        self._reap()
        wanted = dict(labels or {}).items()
        return sorted(
            (
                SandboxInfo(id=meta["id"], backend=self.name, labels=meta["labels"])
                for _, meta in self._sandboxes()
                if wanted <= meta["labels"].items()
            ),
            key=lambda info: info.id,
        )

    def destroy(self, sandbox_id: str) -> None:
        if not sandbox_id.startswith("sbx-") or "/" in sandbox_id:
            return
        _remove_sandbox_dir(self.root / sandbox_id)
