"""The launcher process: it loads no Metaflow, reads (and removes) its request, runs the task and
saves its logs in the local datastore as Metaflow reads them; it ends with its runtime; kill marks.

Layer: tests of metaflow-sandbox. Imports: pytest, the standard library, metaflow (to check the
log format with its own parser), plugins.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from metaflow.mflog import mflog

from metaflow_extensions.sandbox.plugins import kills, launcher, logs, request, staging


def test_the_launcher_does_not_import_metaflow():
    code = (
        "import sys, metaflow_extensions.sandbox.plugins.launcher\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'metaflow'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_log_lines_are_what_metaflow_parses():
    line = mflog.parse(logs.mflog_line("héllo | [x] ]"))
    assert line is not None
    assert (line.msg, line.logsource, line.version) == ("héllo | [x] ]".encode(), b"task", b"0")
    assert not line.should_persist
    assert line.utc_tstamp is not None


LAUNCHER = [sys.executable, "-m", "metaflow_extensions.sandbox.plugins.launcher"]


def saved_request(
    tmp_path: Path, step_command: str, name: str = "request.json", **fields
) -> tuple[request.TaskRequest, Path]:
    """A request for a task running ``step_command`` (``$T``: its task directory), saved in a file."""
    loc = staging.TaskLocation(root=str(tmp_path / ".metaflow"), flow="F", run_id="1", step="s", task_id="2")
    package = tmp_path / "package.tar"
    code = io.BytesIO()
    with tarfile.open(fileobj=code, mode="w") as tar:
        tar.addfile(tarfile.TarInfo("flow.py"), io.BytesIO(b""))
    staging.code_archive(code.getvalue(), str(package))
    req = request.TaskRequest(
        backend="local",
        backend_options={},
        step_command=step_command,
        location=loc,
        input_paths=[],
        extract_commands=[],
        extract_env={},
        env={"WHO": "the task", "T": loc.task_dir},
        labels={},
        hard_limit_s=60,
        code_tar=str(package),
        **fields,
    )
    request_file = tmp_path / name
    req.save(str(request_file))
    return req, request_file


def test_the_launcher_runs_its_request_and_removes_it(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("METAFLOW_SANDBOX_LOCAL_ROOT", str(tmp_path / "sandboxes"))
    req, request_file = saved_request(
        tmp_path, 'mkdir -p "$T" && touch "$T/1.attempt.json" && echo "$WHO ran" && exit 4', attempt=1
    )
    loc = req.location
    launcher = [*LAUNCHER, str(request_file)]
    done = subprocess.run([*launcher, "--local-config-file", "/ignored"], capture_output=True, check=False)
    assert done.returncode == 4, done.stderr
    assert not request_file.exists(), "the request (which may hold env values) is removed"
    assert mflog.parse(done.stdout.splitlines()[0]).msg == b"the task ran", "lines are echoed as mflog lines"
    saved = Path(loc.task_dir, "1.task_stdout.log").read_bytes()
    assert [mflog.parse(line).msg for line in saved.splitlines()] == [b"the task ran"]


def test_the_scratch_files_of_a_killed_launcher_are_swept_by_the_next(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("METAFLOW_SANDBOX_LOCAL_ROOT", str(tmp_path / "sandboxes"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    scratch = tmp_path / "tmp" / f"metaflow-sandbox-scratch-{os.getuid()}"
    _, slow = saved_request(tmp_path, "echo started && sleep 600", name="slow.json")
    killed = subprocess.Popen([*LAUNCHER, str(slow)], stdout=subprocess.PIPE)
    assert killed.stdout is not None
    assert b"started" in killed.stdout.readline(), "the task started (its inputs were staged)"
    [left] = list(scratch.iterdir())
    assert left.name.startswith(f"{killed.pid}-") and (left / "in.tar").is_file()
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    killed.stdout.close()
    _, quick = saved_request(tmp_path, "true", name="quick.json")
    done = subprocess.run([*LAUNCHER, str(quick)], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    assert list(scratch.iterdir()) == [], "the dead launcher's scratch directory is swept, the live one's removed"


def test_the_launcher_ends_with_its_runtime_even_when_it_is_not_its_parent(tmp_path: Path, monkeypatch):
    """The runtime's pid in the request is watched (the parent-death signal sees only the parent):
    when it is gone, the sandbox is destroyed and the launcher exits."""
    sandboxes = tmp_path / "sandboxes"
    monkeypatch.setenv("METAFLOW_SANDBOX_LOCAL_ROOT", str(sandboxes))
    runtime = subprocess.Popen(["sleep", "600"])
    _, request_file = saved_request(
        tmp_path, "echo task-started && sleep 600", runtime=kills.process_identity(runtime.pid)
    )
    launcher = subprocess.Popen([*LAUNCHER, str(request_file)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert launcher.stdout is not None
        assert b"task-started" in launcher.stdout.readline()
        assert list(sandboxes.glob("sbx-*")), "the task runs in a sandbox"
        runtime.kill()
        runtime.wait()
        assert launcher.wait(timeout=60) != 0  # it ends (how does not matter: nobody waits for it)
        assert not list(sandboxes.glob("sbx-*")), "the sandbox is destroyed"
    finally:
        launcher.kill()
        runtime.kill()


def test_a_kill_mark_is_seen_once(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert not kills.was_killed("local", "sbx-1")
    kills.mark_killed("local", "sbx-1")
    assert (tmp_path / f"metaflow-sandbox-kills-{os.getuid()}").stat().st_mode & 0o777 == 0o700
    assert not kills.was_killed("local", "sbx-2") and not kills.was_killed("daytona", "sbx-1")
    assert kills.was_killed("local", "sbx-1")
    assert not kills.was_killed("local", "sbx-1"), "consumed"


def test_a_signal_ends_the_launcher_like_a_killed_process(tmp_path: Path, monkeypatch):
    """SIGTERM while the task runs: the sandbox is destroyed and the launcher exits 128 + 15 (the
    sandbox vanishing under its own command must not turn this into an infrastructure failure)."""
    sandboxes = tmp_path / "sandboxes"
    monkeypatch.setenv("METAFLOW_SANDBOX_LOCAL_ROOT", str(sandboxes))
    _, request_file = saved_request(tmp_path, "echo task-started && sleep 600")
    launcher = subprocess.Popen([*LAUNCHER, str(request_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert launcher.stdout is not None
        assert b"task-started" in launcher.stdout.readline()
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=60)
        assert launcher.returncode == 128 + signal.SIGTERM, err
        assert not list(sandboxes.glob("sbx-*")), "the sandbox is destroyed"
    finally:
        launcher.kill()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A ``$TMPDIR`` short enough for a Unix socket path (pytest's ``tmp_path`` can be too long)."""
    folder = tempfile.mkdtemp(prefix="mfsbx-", dir="/tmp")
    yield Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


def _service_request(tmp_path: Path, short_tmp: Path, monkeypatch) -> Path:
    """A request for a provider backend with a live runtime (this process), so the launcher goes to
    the run's service; ``$TMPDIR`` (where its socket lives) is ``short_tmp``."""
    monkeypatch.setenv("TMPDIR", str(short_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # this process's socket_path sees it too
    _, request_file = saved_request(tmp_path, "true", runtime=kills.process_identity(os.getpid()))
    fields = json.loads(request_file.read_text())
    fields["backend"] = "daytona"
    request_file.write_text(json.dumps(fields))
    return request_file


def test_a_service_that_closes_without_starting_the_task_fails_it_retryably(tmp_path: Path, short_tmp, monkeypatch):
    request_file = _service_request(tmp_path, short_tmp, monkeypatch)
    path = launcher.socket_path(kills.process_identity(os.getpid()), "daytona", {})
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700, "the socket's folder is private"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dying:
        dying.bind(path)
        dying.listen()

        def close_the_first() -> None:
            conn, _ = dying.accept()
            conn.close()

        closer = threading.Thread(target=close_the_first)
        closer.start()
        done = subprocess.run([*LAUNCHER, str(request_file)], capture_output=True, text=True, check=False)
        closer.join()
    assert done.returncode == 1, done.stderr
    assert "closed the connection before starting the task" in done.stderr and "use @retry" in done.stderr
    assert not request_file.exists(), "the request (which may hold env values) is removed"


def test_a_service_folder_others_can_enter_is_refused(tmp_path: Path, short_tmp, monkeypatch):
    request_file = _service_request(tmp_path, short_tmp, monkeypatch)
    folder = short_tmp / f"metaflow-sandbox-service-{os.getuid()}"
    folder.mkdir()
    folder.chmod(0o777)  # another user's, made first in a shared /tmp
    done = subprocess.run([*LAUNCHER, str(request_file)], capture_output=True, text=True, check=False)
    assert done.returncode == 1, done.stderr
    assert "is not a folder private to this user" in done.stderr, done.stderr
