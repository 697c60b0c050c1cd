"""The launcher process: it loads no Metaflow, reads (and removes) its request, runs the task and
saves its logs in the local datastore as Metaflow reads them.

Layer: tests of metaflow-sandbox. Imports: pytest, the standard library, metaflow (to check the
log format with its own parser), plugins.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

from metaflow.mflog import mflog

from metaflow_extensions.sandbox.plugins import logs, request, staging


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


def saved_request(tmp_path: Path, step_command: str, name: str = "request.json") -> tuple[request.TaskRequest, Path]:
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
        attempt=1,
        code_tar=str(package),
    )
    request_file = tmp_path / name
    req.save(str(request_file))
    return req, request_file


def test_the_launcher_runs_its_request_and_removes_it(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("METAFLOW_SANDBOX_LOCAL_ROOT", str(tmp_path / "sandboxes"))
    req, request_file = saved_request(
        tmp_path, 'mkdir -p "$T" && touch "$T/1.attempt.json" && echo "$WHO ran" && exit 4'
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
