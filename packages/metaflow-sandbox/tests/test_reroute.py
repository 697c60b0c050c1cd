"""The runtime side of a sandboxed task, on pieces that need no flow: retry delays and the task's
command line with long input paths (run through bash, as the sandbox runs it).

Layer: tests of metaflow-sandbox. Imports: pytest, the standard library, plugins.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from metaflow_extensions.sandbox.plugins.reroute import INPUT_PATHS_CHUNK, chunked, retry_delay, step_command


def test_minutes_between_retries_is_honoured_on_retries_only():
    retry = SimpleNamespace(name="retry", attributes={"times": "3", "minutes_between_retries": "2"})
    assert retry_delay([retry], 0) == 0
    assert retry_delay([retry], 1) == 120
    assert retry_delay([], 1) == 0
    zero = SimpleNamespace(name="retry", attributes={"minutes_between_retries": 0})
    assert retry_delay([zero], 2) == 0


class Args:
    """The part of Metaflow's ``CLIArgs`` that ``step_command`` reads: entrypoint, options, get_args."""

    def __init__(self, options: dict[str, object]):
        self.entrypoint = ["/launcher/python", "/launcher/dir/flow.py"]
        self.command_options = options

    def get_args(self) -> list[str]:
        args = [*self.entrypoint, "--quiet", "step", "train"]
        for key, value in self.command_options.items():
            if value is not None:
                args += [f"--{key}", str(value)]
        return args


def test_the_task_command_carries_long_input_paths_in_variables(tmp_path: Path):
    paths = "r/s/" + ",".join(str(i) for i in range(20000))
    env = chunked("METAFLOW_INPUT_PATHS", paths)
    assert len(env) > 1 and all(len(v) <= INPUT_PATHS_CHUNK for v in env.values()) and "".join(env.values()) == paths
    options = {"run-id": "1", "input-paths": paths, "tag": "it's a tag"}
    (tmp_path / "flow.py").write_text("import json, sys; print(json.dumps(sys.argv[1:]))")
    command = step_command(sys.executable, "flow.py", Args(options), env)
    assert paths not in command and len(command) < 1000, "the paths are not on the command line"
    assert options["input-paths"] == paths, "the runtime's options are left as they were"
    out = subprocess.run(["bash", "-c", command], env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [
        "--quiet", "step", "train", "--run-id", "1", "--input-paths", paths, "--tag", "it's a tag"
    ]  # fmt: skip


def test_request_files_are_private_and_none_outlives_its_runtime(tmp_path, monkeypatch):
    import os
    import stat

    from metaflow_extensions.sandbox.core import Resources
    from metaflow_extensions.sandbox.plugins import kills, request
    from metaflow_extensions.sandbox.plugins.request import TaskRequest
    from metaflow_extensions.sandbox.plugins.staging import TaskLocation

    monkeypatch.setattr(request.tempfile, "gettempdir", lambda: str(tmp_path))
    kills.sweep_dead_owners.cache_clear()
    folder = Path(request._requests_dir())
    folder.mkdir(mode=0o700)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / f"{dead.pid}-left-by-a-crashed-runtime.json").write_text("{}")
    req = TaskRequest(
        backend="local", backend_options={}, step_command="true", location=TaskLocation("/r", "F", "1", "s", "2"),
        input_paths=[], extract_commands=[], extract_env={}, env={"SECRET_ENV": "v"}, labels={}, hard_limit_s=60,
        resources=Resources(),
    )  # fmt: skip
    path = Path(request.save_request(req))
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert TaskRequest.load(str(path)) == req
    assert [p.name for p in folder.iterdir()] == [path.name], "a dead runtime's request is swept"
    request.forget_requests()  # the run ended: what no launcher read is gone
    assert list(folder.iterdir()) == []


def test_a_multi_word_executable_runs_after_the_environments_bootstrap(tmp_path: Path):
    # As `uv run --no-sync python` or `$MF_ARCH/<id>/bin/python -s`: shell words, not one quoted word.
    (tmp_path / "flow.py").write_text("import os, sys; print(os.environ['FROM_BOOTSTRAP'], sys.flags.no_site)")
    bootstrap = ["echo bootstrapping", "flush_mflogs", "export FROM_BOOTSTRAP=yes"]
    command = step_command(f"{sys.executable} -S", "flow.py", Args({"run-id": "1"}), {}, bootstrap=bootstrap)
    out = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout == "bootstrapping\nyes 1\n"
