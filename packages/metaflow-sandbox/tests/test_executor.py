"""The executor end to end on the real ``local`` backend, with a stand-in for ``flow.py step``:
inputs go in, outputs come back merged, output is captured as mflog lines, exit codes map.

Layer: tests of metaflow-sandbox. Imports: pytest, the standard library, metaflow, core, plugins.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import sys
import tarfile
import warnings
from pathlib import Path

import pytest

from metaflow_extensions.sandbox.core import ConfigurationError, ImageError, SandboxUnavailable
from metaflow_extensions.sandbox.plugins import executor, request, staging, task_script


def code_package(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def logs_of(loc: staging.TaskLocation, attempt: int = 0) -> dict[str, str]:
    """The attempt's task logs as the launcher saved them in the local datastore."""
    return {s: Path(loc.task_dir, f"{attempt}.task_{s}.log").read_text() for s in ("stdout", "stderr")}


@pytest.fixture
def request_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("METAFLOW_SANDBOX_LOCAL_ROOT", str(tmp_path / "sandboxes"))
    root = tmp_path / "ds" / ".metaflow"
    parent = root / "F" / "1" / "a" / "3"
    parent.mkdir(parents=True)
    (parent / "0.attempt.json").write_text("{}")
    (parent / "0.DONE.lock").write_text("")
    (parent / "0.data.json").write_text(json.dumps({"objects": {"x": "ab12"}}))
    (root / "F" / "data" / "ab").mkdir(parents=True)
    (root / "F" / "data" / "ab" / "ab12").write_text("parent-blob")
    loc = staging.TaskLocation(root=str(root), flow="F", run_id="1", step="b", task_id="7")
    package = tmp_path / "package.tgz"
    package.write_bytes(code_package({"flow.py": "print('code')\n"}))

    def make(step_command: str, **overrides) -> request.TaskRequest:
        fields = dict(
            backend="local",
            backend_options={},
            step_command=step_command,
            location=loc,
            input_paths=["1/a/3"],
            package=str(package),
            extract_commands=["tar xf job.tar"],
            extract_env={},
            env={"GREETING": "hi"},
            labels={"metaflow-flow": "F"},
            hard_limit_s=120,
        )
        fields.update(overrides)
        return request.TaskRequest(**fields)

    return make


@pytest.mark.parametrize("inline_code", [False, True], ids=["package-archive", "package-inlined"])
def test_a_task_reads_its_inputs_writes_outputs_and_keeps_its_exit_code(request_for, capfdbinary, inline_code):
    command = (
        'cat "$P/0.data.json" >/dev/null && cat "$D/ab/ab12" && echo && '
        'echo "$GREETING from $(cat flow.py | wc -l) file" && echo oops >&2 && '
        'mkdir -p "$T" "$D/${K:0:2}" && echo done > "$T/2.DONE.lock" && printf new > "$D/${K:0:2}/$K" && '
        'echo \'{"cas_raw": true, "cas_version": 1}\' > "$D/${K:0:2}/${K}_meta" && exit 3'
    )
    loc = request_for("true").location
    key = hashlib.sha1(b"new").hexdigest()  # a raw blob, filed under its content address
    paths = {"P": f"{loc.root}/F/1/a/3", "T": loc.task_dir, "D": loc.blob_dir, "K": key}
    code_tar = None
    if inline_code:
        package = Path(request_for("true").package).read_bytes()
        code_tar = staging.code_archive(package, f"{loc.root}/../code.tar")
    req = request_for(command, env={"GREETING": "hi", **paths}, code_tar=code_tar, attempt=2)
    assert executor.execute(req) == 3
    assert Path(loc.task_dir, "2.DONE.lock").read_text() == "done\n"
    assert Path(loc.blob_dir, key[:2], key).read_text() == "new"
    saved = logs_of(loc, attempt=2)
    out = saved["stdout"]
    assert "parent-blob" in out and "hi from 1 file" in out and out.startswith("[MFLOG|0|")
    assert "oops" in saved["stderr"]
    assert b"hi from 1 file" in capfdbinary.readouterr().out, "lines are echoed live"
    assert not list(Path(os.environ["METAFLOW_SANDBOX_LOCAL_ROOT"]).glob("sbx-*")), "the sandbox was destroyed"


def test_a_broken_code_package_is_an_infrastructure_failure(request_for):
    req = request_for("echo before the failure", extract_commands=["false"])
    assert executor.execute(req) == executor.EXIT_INFRA_RETRYABLE
    assert logs_of(req.location) == {"stdout": "", "stderr": ""}, "logs are saved, the task never ran"


def test_a_backend_that_cannot_create_sandboxes_disallows_retries(request_for):
    req = request_for("true", image="python:3.11")  # the local backend has no images
    assert executor.execute(req) == executor.EXIT_DISALLOW_RETRY


def test_exit_codes_tell_configuration_from_transient_failures():
    assert executor.exit_code_for(ConfigurationError("bad")) == executor.EXIT_DISALLOW_RETRY
    assert executor.exit_code_for(ImageError("no image")) == executor.EXIT_DISALLOW_RETRY
    assert executor.exit_code_for(SandboxUnavailable("gone")) == executor.EXIT_INFRA_RETRYABLE
    assert executor.EXIT_DISALLOW_RETRY == __import__("metaflow.exception").exception.METAFLOW_EXIT_DISALLOW_RETRY


def test_a_step_that_plants_content_under_another_address_saves_nothing_and_is_not_retried(request_for, capfd):
    # The address of a value a later step will compute, filled with the attacker's bytes.
    key = hashlib.sha1(b"the honest value").hexdigest()
    command = (
        'mkdir -p "$T" "$D/${K:0:2}" && touch "$T/0.DONE.lock" && printf evil > "$D/${K:0:2}/$K" && '
        'echo \'{"cas_raw": true, "cas_version": 1}\' > "$D/${K:0:2}/${K}_meta"'
    )
    loc = request_for("true").location
    req = request_for(command, env={"T": loc.task_dir, "D": loc.blob_dir, "K": key})
    assert executor.execute(req) == executor.EXIT_DISALLOW_RETRY
    assert not Path(loc.blob_dir, key[:2], key).exists(), "the planted blob entered the datastore"
    assert not Path(loc.task_dir, "0.DONE.lock").exists()
    assert "does not hash to it" in capfd.readouterr().err


def test_each_task_says_one_lifecycle_line_with_where_the_time_went(request_for, capfd):
    req = request_for("echo working")
    assert executor.execute(req) == 0
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("Sandbox sbx-")]
    assert len(lines) == 1, err
    assert re.fullmatch(
        r"Sandbox sbx-\w+ \(local, (bubblewrap|process), data path relay\): "
        r"create \d+\.\d\ds, stage \d+\.\d\ds, run \d+\.\d\ds, merge \d+\.\d\ds\.",
        lines[0],
    ), lines[0]
    assert "Uploading" not in err and "Merging" not in err, "small tasks say nothing of staging"


def test_staging_a_large_task_says_so(request_for, capfd, monkeypatch):
    monkeypatch.setattr(executor, "PROGRESS_BYTES", 0)  # every archive counts as large
    assert executor.execute(request_for("true")) == 0
    err = capfd.readouterr().err
    assert re.search(r"Uploading \d+ MB of task inputs to sandbox sbx-\w+\.\.\.", err), err
    assert re.search(r"Merging \d+ MB of task outputs from sandbox sbx-\w+\.\.\.", err), err


def test_tracebacks_name_the_flows_own_file(request_for, tmp_path):
    flow_dir = tmp_path / "project"
    flow_dir.mkdir()
    (flow_dir / "flow.py").write_text("raise ValueError('boom')\n")
    package = tmp_path / "failing.tgz"
    package.write_bytes(code_package({"flow.py": "raise ValueError('boom')\n"}))
    command = f"{shlex.quote(sys.executable)} flow.py"
    req = request_for(command, package=str(package), flow_dir=str(flow_dir))
    assert executor.execute(req) == 1
    stderr = logs_of(req.location)["stderr"]
    assert f'File "{flow_dir}/flow.py", line 1' in stderr, stderr
    assert "/code/flow.py" not in stderr and task_script.CODE_DIR not in stderr


def test_warnings_the_runtime_showed_are_not_repeated(request_for):
    req = request_for("true", shown_warnings=["The local sandbox backend runs commands as plain processes"])
    assert executor.execute(req) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn(
            "The local sandbox backend runs commands as plain processes because of a test", UserWarning, stacklevel=1
        )
        warnings.warn("another warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another warning"]


def test_the_hard_limit_kill_names_the_fix_and_is_not_retried(request_for, capfd):
    req = request_for("sleep 60", hard_limit_s=1)
    assert executor.execute(req) == executor.EXIT_DISALLOW_RETRY
    err = capfd.readouterr().err
    assert "hard limit of 1 s" in err and "raise @sandbox(timeout=...)" in err and "not retried" in err, err
    assert "transient" not in err
    assert re.search(r"run \d+\.\d\ds\.", err), "the lifecycle line says how long the task ran"
