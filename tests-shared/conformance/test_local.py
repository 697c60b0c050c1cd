"""Conformance of the ``local`` backend in both isolation modes, plus what only bubblewrap gives.

Layer: tests-shared. Imports: pytest, the standard library and core.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from metaflow_extensions.sandbox.core import ConfigurationError, SandboxSpec, get_backend
from metaflow_extensions.sandbox.core.conformance import BackendConformance


@pytest.fixture(scope="module")
def sandbox_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("local-sandboxes")


class TestLocalBwrap(BackendConformance):
    @pytest.fixture
    def backend(self, sandbox_root):
        return get_backend("local", isolation="bwrap", root=sandbox_root)

    def test_launcher_home_and_cwd_are_invisible(self, backend, tmp_path, monkeypatch):
        secret = Path.home() / f".mfsbx-secret-{os.getpid()}"
        secret.write_text("s3cr3t")
        project = tmp_path / "project"
        project.mkdir()
        (project / "flow.py").write_text("x")
        monkeypatch.chdir(project)
        try:
            with backend.create(SandboxSpec()) as sbx:
                res = sbx.run(f"cat {secret} {project}/flow.py; ls {project}")
        finally:
            secret.unlink()
        assert res.exit_code != 0 and "s3cr3t" not in res.stdout and "flow.py" not in res.stdout

    def test_absolute_paths_are_private_and_system_is_read_only(self, backend, tmp_path):
        target = tmp_path / "datastore" / "f"
        with backend.create(SandboxSpec()) as sbx:
            assert sbx.run(f"mkdir -p {target.parent} && echo in > {target} && cat {target}").stdout == "in\n"
            assert sbx.run("touch /usr/evil").exit_code != 0
            assert sbx.run("echo private > /tmp/t").exit_code == 0
        assert not target.exists() and not Path("/tmp/t").exists()

    def test_own_pid_namespace(self, sandbox):
        # Only the sandbox's own few processes exist; the launcher's are invisible.
        assert int(sandbox.run(COUNT_ALL_PIDS).stdout) < 8
        assert sandbox.run(f"test -e /proc/{os.getpid()}/cwd").exit_code != 0 or os.getpid() < 8

    def test_network_false_unshares_the_network(self, backend):
        with backend.create(SandboxSpec(network=False)) as sbx:
            interfaces = sbx.run("tail -n +3 /proc/net/dev | cut -d: -f1").stdout.split()
        assert interfaces == ["lo"]

    def test_python_environment_is_available(self, sandbox):
        res = sandbox.run("python -c 'import metaflow_extensions.sandbox.core as c; print(c.__name__)'")
        assert res.stdout == "metaflow_extensions.sandbox.core\n"

    def test_a_directory_inside_the_virtualenv_stays_private_and_writable(self, sandbox):
        # e.g. a flow run from a directory inside the venv: its datastore path must be creatable.
        inside = Path(sys.prefix) / f"project-{os.getpid()}" / ".metaflow"
        assert sandbox.run(f"mkdir -p {inside} && touch {inside}/f").exit_code == 0
        assert not inside.parent.exists()
        assert sandbox.run(f"touch {sys.prefix}/lib/evil").exit_code != 0

    # -- what a hostile step tries (docs/security.md) ----------------------------------------

    def test_no_capabilities_and_read_only_mounts_stay_read_only(self, sandbox):
        # As root on the host, bubblewrap would keep root's capabilities: remount the launcher's
        # Python environment writable and plant a file in it.
        target = f"{sys.prefix}/bin"
        planted = Path(target) / f"mfsbx-planted-{os.getpid()}"
        res = sandbox.run(
            f"grep CapEff /proc/self/status; mount -o remount,rw,bind {target} 2>&1; "
            f"mount -o remount,rw /usr 2>&1; touch {planted} /usr/planted 2>&1 || echo refused"
        )
        assert res.stdout.splitlines()[0].split() == ["CapEff:", "0000000000000000"]
        assert res.stdout.rstrip().endswith("refused")
        assert not planted.exists() and not Path("/usr/planted").exists()

    def test_a_step_runs_as_an_unprivileged_user_and_sees_only_the_etc_it_needs(self, sandbox):
        from metaflow_extensions.sandbox.core.local.isolation import SANDBOX_UID, user_namespaces

        if user_namespaces():
            assert sandbox.run("id -u").stdout == f"{SANDBOX_UID}\n"
        # Password hashes, sudo rules and credentials of the host are not there at all.
        for secret in ("/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/pip.conf", "/etc/ssh"):
            assert sandbox.run(f"test -e {secret}").exit_code != 0, f"{secret} is visible in the sandbox"
        assert sorted(sandbox.run("cut -d: -f1 /etc/passwd").stdout.split()) == ["nobody", "root", "sandbox"]
        # What programs need is there, as the host has it: TLS roots, name resolution, the linker.
        for needed in ("/etc/ssl/certs/ca-certificates.crt", "/etc/hosts", "/etc/nsswitch.conf", "/etc/ld.so.cache"):
            if os.path.isfile(needed):
                digest = hashlib.sha256(Path(needed).read_bytes()).hexdigest()
                assert sandbox.run(f"sha256sum {needed}").stdout.split()[0] == digest, needed

    def test_sandboxes_live_in_a_directory_only_their_owner_can_enter(self, backend, sandbox):
        # Files a step makes are its host user's (setuid bits included): no other user may reach them.
        assert stat.S_IMODE(backend.root.stat().st_mode) == 0o700

    def test_sandbox_of_a_dead_owner_is_reaped(self, backend, sandbox_root):
        owner = textwrap.dedent(f"""
            from metaflow_extensions.sandbox.core import get_backend, SandboxSpec
            sbx = get_backend("local", isolation="bwrap", root={str(sandbox_root)!r}).create(
                SandboxSpec(labels={{"reap": "me"}}))
            print(sbx.id, flush=True)
            import os; os._exit(0)   # dies without cleaning up
        """)
        sid = subprocess.run([sys.executable, "-c", owner], capture_output=True, text=True, check=True).stdout.strip()
        assert (sandbox_root / sid).exists()
        assert backend.list(labels={"reap": "me"}) == []
        assert not (sandbox_root / sid).exists()


COUNT_ALL_PIDS = "ls -d /proc/[0-9]* | wc -l"


class TestLocalProcess(BackendConformance):
    @pytest.fixture
    def backend(self, sandbox_root):
        return get_backend("local", isolation="process", root=sandbox_root)

    def test_a_daemon_a_command_starts_never_outlives_it(self, sandbox):
        # setsid leaves the process group and, once its parent exits, init adopts it: only the
        # supervisor (a subreaper) still sees it.
        res = sandbox.run("setsid nohup sleep 681 >/dev/null 2>&1 & (setsid sleep 682 &) ; echo started")
        assert res.stdout == "started\n"
        assert _sleepers("68") == []

    def test_network_false_is_refused_without_bwrap(self, backend):
        with pytest.raises(ConfigurationError, match="bubblewrap"):
            backend.create(SandboxSpec(network=False))


def test_isolation_from_environment_variable(monkeypatch):
    monkeypatch.setenv("METAFLOW_SANDBOX_LOCAL_ISOLATION", "process")
    assert get_backend("local").isolation == "process"
    monkeypatch.setenv("METAFLOW_SANDBOX_LOCAL_ISOLATION", "chroot")
    with pytest.raises(ConfigurationError, match="auto, bwrap, process"):
        get_backend("local")


def test_sandboxes_are_spread_over_the_filesystem(tmp_path):
    # On ext4 the root carries the top-directory flag (see local.backend.spread_subdirectories).
    import fcntl

    from metaflow_extensions.sandbox.core.local import backend as local

    root = tmp_path / "spread"
    with get_backend("local", isolation="process", root=root).create(SandboxSpec()):
        pass
    fd = os.open(root, os.O_RDONLY)
    try:
        flags = int.from_bytes(fcntl.ioctl(fd, local._FS_IOC_GETFLAGS, bytes(8))[:4], "little")
    except OSError as e:
        pytest.skip(f"{root} is on a filesystem without inode flags ({e})")
    finally:
        os.close(fd)
    assert flags & local._FS_TOPDIR_FL


def test_image_is_refused_by_local(sandbox_root):
    with pytest.raises(ConfigurationError, match="no images"):
        get_backend("local", root=sandbox_root).create(SandboxSpec(image="python:3.11"))


OWNER = """
import signal, sys
# Python's own Ctrl-C handler, even when started with SIGINT ignored (a background CI job).
signal.signal(signal.SIGINT, signal.default_int_handler)
from metaflow_extensions.sandbox.core import get_backend, SandboxSpec
backend = get_backend("local", isolation=sys.argv[1], root=sys.argv[2])
with backend.create(SandboxSpec(labels={"owner": "interrupted"})) as sbx:
    print(sbx.id, flush=True)
    sbx.run(f"sleep {sys.argv[3]}1 & sleep {sys.argv[3]}2; echo never", on_stdout=print)
"""


def _sleepers(marker: str) -> list[str]:
    found = []
    for cmdline_file in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmdline = cmdline_file.read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cmdline.startswith(f"sleep {marker}"):
            found.append(cmdline)
    return found


@pytest.mark.parametrize("isolation", ["bwrap", "process"])
@pytest.mark.parametrize("how", ["ctrl-c", "kill -9"])
def test_nothing_lingers_after_the_caller_is_interrupted(isolation, how, sandbox_root):
    import signal
    import time

    root = sandbox_root / f"{isolation}-{how.replace(' ', '')}"
    marker = str(600 + 10 * ["bwrap", "process"].index(isolation) + ["ctrl-c", "kill -9"].index(how))
    argv = [sys.executable, "-c", OWNER, isolation, str(root), marker]
    owner = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    sid = owner.stdout.readline().strip()
    # Wait until the command really runs in the sandbox before interrupting.
    pid_dir = root / sid / "pids"
    for _ in range(500):
        if any(pid_dir.glob("*")):
            break
        time.sleep(0.01)
    owner.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
    owner.wait(30)
    if how == "ctrl-c":
        assert not (root / sid).exists(), "the sandbox directory survived Ctrl-C"
    else:
        # A killed owner cannot clean up: its processes die with it, the next list() reaps the rest.
        assert get_backend("local", isolation=isolation, root=root).list() == []
        assert not (root / sid).exists()
    for _ in range(100):
        if not _sleepers(marker):
            break
        time.sleep(0.05)
    assert _sleepers(marker) == []


NORMAL_USER_SANDBOX = """
import sys
sys.path.insert(0, sys.argv[1])
from metaflow_extensions.sandbox.core import SandboxSpec, get_backend
with get_backend("local", isolation="bwrap", root=sys.argv[2]).create(SandboxSpec()) as sbx:
    print(sbx.run(sys.argv[3]).stdout, end="")
"""


def test_a_normal_users_sandbox_holds_the_same_line(tmp_path):
    """The attacks above, from a sandbox that a normal user (not root) creates."""
    import shutil
    import tempfile

    from metaflow_extensions.sandbox import core

    system_python = "/usr/bin/python3"
    if os.getuid() != 0:
        pytest.skip("the suite runs as a normal user: every test above is this case")
    if not (shutil.which("setpriv") and os.access(system_python, os.X_OK)):
        pytest.skip("playing a normal user needs setpriv and a system Python 3 that user can run")
    site = str(Path(core.__file__).parents[3])  # where the wheel is installed, readable by all
    root = Path(tempfile.mkdtemp(prefix="mfsbx-normal-user-", dir="/tmp"))
    try:
        os.chown(root, 65534, 65534)
        attack = (
            "id -u; grep CapEff /proc/self/status; mount -o remount,rw /usr 2>/dev/null; "
            "test -e /etc/shadow && echo SHADOW; touch /usr/planted 2>/dev/null || echo refused"
        )
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        argv = [*as_nobody, system_python, "-I", "-c", NORMAL_USER_SANDBOX, site, str(root / "sbx"), attack]
        res = subprocess.run(argv, capture_output=True, text=True, check=False, cwd="/")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if "cannot create namespaces" in res.stderr or "bubblewrap is not" in res.stderr:
        pytest.skip(f"this kernel gives normal users no namespaces: {res.stderr.strip()[-200:]}")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split("\n")
    assert lines[0] == "1000" and lines[1].split() == ["CapEff:", "0000000000000000"] and "SHADOW" not in lines
    assert lines[-2] == "refused" and not Path("/usr/planted").exists()


def _shared_code(tmp_path: Path) -> Path:
    code = tmp_path / "shared-code"
    (code / "pkg").mkdir(parents=True)
    (code / "pkg" / "mod.py").write_text("VALUE = 'shared'\n")
    return code


def test_a_shared_directory_is_one_copy_read_only_to_every_sandbox(sandbox_root, tmp_path):
    """Under bubblewrap a ``read_only_dirs`` directory is mounted, not copied: two sandboxes see
    the same files (a change on the host shows in both), and neither can change, add or remove any."""
    backend = get_backend("local", isolation="bwrap", root=sandbox_root)
    code = _shared_code(tmp_path)
    spec = SandboxSpec(read_only_dirs={"code": str(code)})
    attacks = "echo hacked > code/pkg/mod.py; touch code/new; rm -f code/pkg/mod.py; mkdir code/d; chmod 777 code"
    with backend.create(spec) as first, backend.create(spec) as second:
        for sbx in (first, second):
            imports = "cd code && python -c 'import pkg.mod as m; print(m.VALUE)'"
            result = sbx.run(f"{attacks}; cat code/pkg/mod.py; {imports}")
            assert result.exit_code == 0, result.stderr
            assert result.stdout.split() == ["VALUE", "=", "'shared'", "shared"]
            assert result.stderr.count("Read-only file system") >= 4
        (code / "pkg" / "mod.py").write_text("VALUE = 'changed on the host'\n")
        both = [sbx.run("cat code/pkg/mod.py").stdout for sbx in (first, second)]
        assert both == ["VALUE = 'changed on the host'\n"] * 2
        # Nothing of the code was copied into the sandboxes' own directories.
        assert not list((sandbox_root / first.id / "fs/home/sandbox/code").iterdir())
    assert sorted(p.name for p in code.rglob("*")) == ["mod.py", "pkg"]


def test_a_shared_directory_is_a_private_copy_in_process_mode(sandbox_root, tmp_path):
    """Without bubblewrap nothing is mounted: each sandbox gets its own copy, so what one task
    does to its code never reaches the shared directory or the next task."""
    backend = get_backend("local", isolation="process", root=sandbox_root)
    code = _shared_code(tmp_path)
    spec = SandboxSpec(read_only_dirs={"code": str(code)})
    with backend.create(spec) as first:
        assert first.run("echo hacked > code/pkg/mod.py && cat code/pkg/mod.py").stdout == "hacked\n"
        with backend.create(spec) as second:
            assert second.run("cat code/pkg/mod.py").stdout == "VALUE = 'shared'\n"
    assert (code / "pkg" / "mod.py").read_text() == "VALUE = 'shared'\n"


@pytest.mark.parametrize(
    ("dirs", "message"),
    [
        ({"/abs": "/tmp"}, "not a plain path relative"),
        ({"../up": "/tmp"}, "not a plain path relative"),
        ({"a/../b": "/tmp"}, "not a plain path relative"),
        ({"code": "relative/dir"}, "not an absolute path"),
    ],
)
def test_bad_shared_directories_are_refused_in_the_spec(dirs, message):
    with pytest.raises(ConfigurationError, match=message):
        SandboxSpec(read_only_dirs=dirs)


def test_a_missing_shared_directory_is_refused_before_any_sandbox_exists(sandbox_root, tmp_path):
    backend = get_backend("local", root=sandbox_root)
    before = backend.list()
    with pytest.raises(ConfigurationError, match="not a directory on this machine"):
        backend.create(SandboxSpec(read_only_dirs={"code": str(tmp_path / "missing")}))
    assert backend.list() == before
