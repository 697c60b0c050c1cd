"""How the local backend isolates commands: bubblewrap when it works, else plain processes.

Layer: core/local. Imports: the standard library and ``core.errors``.

Under bubblewrap a sandbox's private directory becomes its root filesystem (so any absolute path
can be created inside it, privately), the system directories, the parts of ``/etc`` a program
needs and the launcher's Python environment are mounted read-only on top, and the process gets its
own mount, pid, ipc and uts namespaces (and network namespace when ``network=False``). The user's
home and the launcher's working directory are simply never mounted. Directories a spec shares
(``SandboxSpec.read_only_dirs``) are mounted read-only under the working directory.

Commands hold no capabilities and run as the unprivileged ``sandbox`` user (uid 1000) of a user
namespace of their own where the kernel allows one, so that "root on the host" reaches nothing more
than "a user on the host" does: no remounting the read-only mounts writable, no reading files that
only root's capabilities would open. ``docs/security.md`` has the whole threat model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Mapping
from functools import cache
from pathlib import Path

from ..errors import ConfigurationError

ISOLATION_ENV = "METAFLOW_SANDBOX_LOCAL_ISOLATION"
ISOLATION_MODES = ("auto", "bwrap", "process")
WORKDIR = "/home/sandbox"
"""The working directory inside a bubblewrap sandbox (and ``HOME``)."""

SANDBOX_UID = 1000
"""The uid and gid commands run as inside a bubblewrap sandbox (in their own user namespace)."""

# Read-only system paths; merged-/usr systems have symlinks here, which are recreated as such.
_SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/sys")
# What programs read from /etc: name resolution, TLS roots, time zone, the dynamic linker, Debian's
# alternatives, MIME types, locale aliases, fonts, the system Python's site configuration. Never
# the whole /etc: it holds password hashes (shadow), host keys and credentials (pip.conf, ...).
# passwd and group are written per sandbox instead (only the sandbox user, root and nobody).
_ETC_ALLOWED = (
    "alternatives", "ca-certificates", "crypto-policies", "debian_version", "fonts", "gai.conf",
    "host.conf", "hosts", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "locale.alias", "localtime",
    "mime.types", "nsswitch.conf", "os-release", "pki", "protocols", "resolv.conf", "services", "ssl",
    "timezone", f"python{sys.version_info.major}.{sys.version_info.minor}",
)  # fmt: skip
_ETC_PASSWD = (
    "root:x:0:0:root:/root:/usr/sbin/nologin\n"
    f"sandbox:x:{SANDBOX_UID}:{SANDBOX_UID}:sandbox:/home/sandbox:/bin/bash\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
_ETC_GROUP = f"root:x:0:\nsandbox:x:{SANDBOX_UID}:\nnogroup:x:65534:\n"
_INSTALL_BWRAP = "Install bubblewrap (Debian/Ubuntu: sudo apt-get install -y bubblewrap)"


class IsolationWarning(UserWarning):
    """Commands run without an isolation boundary."""


@cache
def bwrap_problem() -> str | None:
    """Why bubblewrap cannot be used here, or ``None`` when it works (checked once per process)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap ('bwrap') is not on PATH"
    probe = subprocess.run(
        [bwrap, "--ro-bind", "/", "/", "--unshare-pid", "--die-with-parent", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return f"bubblewrap is installed but cannot create namespaces here ({probe.stderr.strip()})"
    return None


@cache
def user_namespaces() -> bool:
    """Whether bubblewrap can give commands a user namespace of their own here (checked once per
    process). Where the kernel refuses (hardened or old kernels), commands still hold no
    capabilities, but run as the launcher's own uid."""
    bwrap = shutil.which("bwrap") or "bwrap"
    ids = ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    argv = [bwrap, "--ro-bind", "/", "/", "--unshare-user", *ids, "--cap-drop", "ALL", "true"]
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


_warned = False


def resolve_isolation(requested: str | None) -> str:
    """The mode to use: ``requested``, else $METAFLOW_SANDBOX_LOCAL_ISOLATION, else ``auto``."""
    global _warned  # noqa: PLW0603 - one warning per process, not per sandbox
    mode = (requested or os.environ.get(ISOLATION_ENV) or "auto").strip().lower()
    if mode not in ISOLATION_MODES:
        raise ConfigurationError(
            f"Unknown local isolation {mode!r}.",
            remedy=f"Use one of {', '.join(ISOLATION_MODES)} (option isolation= or ${ISOLATION_ENV}).",
        )
    problem = bwrap_problem() if mode != "process" else None
    if mode == "bwrap" and problem:
        raise ConfigurationError(f"isolation='bwrap' was requested but {problem}.", remedy=f"{_INSTALL_BWRAP}.")
    if mode == "auto":
        mode = "process" if problem else "bwrap"
        if problem and not _warned:
            _warned = True
            warnings.warn(
                f"The local sandbox backend runs commands as plain processes because {problem}: "
                f"this is NOT an isolation boundary. {_INSTALL_BWRAP} to isolate them, or set "
                f"{ISOLATION_ENV}=process to acknowledge.",
                IsolationWarning,
                stacklevel=3,
            )
    return mode


def python_paths() -> list[str]:
    """The launcher's Python environment (venv and base interpreter), to mount read-only.

    Only the parts Python reads (``bin``, ``lib``..., ``pyvenv.cfg``) are mounted, not whole
    prefixes: a project or datastore directory inside a virtualenv stays private and writable.
    """
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(sys.executable).resolve().parent.parent)}
    covered = ("/usr/", "/bin/", "/lib/", "/lib64/", "/sbin/")
    paths = set()
    for prefix in prefixes:
        if prefix == "/" or (prefix + "/").startswith(covered):
            continue
        for part in ("bin", "lib", "lib64", "include", "pyvenv.cfg"):
            path = os.path.join(prefix, part)
            # A symlinked part (venvs' lib64 -> lib) is covered by its target.
            if os.path.exists(path) and not os.path.islink(path):
                paths.add(path)
    return sorted(paths)


def prepare_rootfs(rootfs: Path) -> None:
    """Recreate the system's top-level symlinks (merged /usr) in a new sandbox's root once (bwrap's
    own ``--symlink`` would fail on every later command because the link then exists), and write
    the sandbox's own ``/etc/passwd`` and ``/etc/group``."""
    for path in _SYSTEM_PATHS:
        if os.path.islink(path):
            (rootfs / path.lstrip("/")).symlink_to(os.readlink(path))
    etc = rootfs / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "passwd").write_text(_ETC_PASSWD)
    (etc / "group").write_text(_ETC_GROUP)


def bwrap_prefix(rootfs: Path, *, network: bool, read_only: Mapping[str, str] | None = None) -> list[str]:
    """The bubblewrap command line that runs what follows it inside the sandbox at ``rootfs``;
    ``read_only`` maps paths under the working directory to host directories mounted there
    read-only (shared by every sandbox that asks: see ``SandboxSpec.read_only_dirs``)."""
    argv = [shutil.which("bwrap") or "bwrap", "--bind", str(rootfs), "/"]
    for path in _SYSTEM_PATHS:
        if os.path.isdir(path) and not os.path.islink(path):
            argv += ["--ro-bind", path, path]
    for name in _ETC_ALLOWED:
        path = f"/etc/{name}"
        if os.path.exists(path):  # a dangling symlink (resolv.conf of a stopped resolver) is skipped
            argv += ["--ro-bind", path, path]
    for path in python_paths():
        argv += ["--ro-bind", path, path]
    argv += ["--proc", "/proc", "--dev", "/dev", "--dir", "/tmp", "--dir", WORKDIR, "--chdir", WORKDIR]
    for inside, host in (read_only or {}).items():
        # The mount point exists already (``LocalBackend.create``): bwrap needs not write the root.
        argv += ["--ro-bind", host, f"{WORKDIR}/{inside}"]
    argv += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox"]
    if user_namespaces():
        argv += ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    # bwrap keeps root's capabilities when started by root: drop them all, whoever starts it.
    argv += ["--cap-drop", "ALL"]
    if not network:
        argv.append("--unshare-net")
    # The sandbox dies with its launcher even on SIGKILL, and cannot push input to our terminal.
    argv += ["--die-with-parent", "--new-session"]
    return argv


def supervisor_prefix() -> list[str]:
    """The command line that runs what follows it as a process-mode sandbox's command (see
    ``supervisor``): no isolation, but nothing the command starts outlives it."""
    script = str(Path(__file__).with_name("supervisor.py"))
    return [sys.executable, "-I", "-S", script, str(os.getpid())]


def base_env(home: str, tmpdir: str) -> dict[str, str]:
    """The minimal environment of every command; the launcher's own variables never leak in."""
    python_bin = str(Path(sys.executable).parent)
    return {
        "PATH": f"{python_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": home,
        "TMPDIR": tmpdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }
