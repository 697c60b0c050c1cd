"""Real flows with @sandbox, run by real Metaflow, checked through the Client API and ``flow.py logs``.

Layer: tests-shared/e2e. Imports: pytest, the standard library, ``sandbox_testing``.

Few flows, many checks each: every flow run costs seconds of sandboxes, so each test runs one
flow and asserts everything it demonstrates.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox_testing.flows import interrupt, run_id_of, task, wait_for_line
from sandbox_testing.wheels import pure_wheel, repack_with_requirements

METAFLOW = tuple(int(p) for p in importlib.metadata.version("metaflow").split(".")[:3])

pytestmark = pytest.mark.e2e


def test_linear_flow_parameters_env_logs_and_metadata(flowdir, backend_name):
    (flowdir.path / "input.txt").write_text("included-text")
    proc = flowdir.run(
        "linear_flow.py", "run", "--alpha", "5", "--data", "input.txt", "--tag", "e2e-tag",
        env={"SBX_LAUNCHER_ONLY": "must-not-leak"},
    )  # fmt: skip
    run = flowdir.inspect("LinearFlow")
    assert run["successful"] and "e2e-tag" in run["tags"]
    start = task(run, "start")
    assert start["artifacts"]["x"] == 10
    assert start["artifacts"]["greeting"] == "hello-from-env"
    assert start["artifacts"]["data_text"] == "included-text"
    assert start["artifacts"]["leaked"] is None, "the launcher's environment leaked into the sandbox"
    assert start["sandbox"]["sandbox-backend"] == backend_name and start["sandbox"]["sandbox-id"]
    assert start["stdout"] == "start says hi\n"
    assert "start warns" in start["stderr"]
    middle = task(run, "middle")
    assert middle["artifacts"]["y"] == 11 and middle["artifacts"]["envdeco"] == "from-environment"
    end = task(run, "end")
    assert end["artifacts"]["in_sandbox_at_end"] is False and not end["sandbox"]
    # Streamed live, with Metaflow's task prefix.
    assert re.search(r"\[\S+/start/1 \(pid \d+\)\] start says hi", proc.stdout + proc.stderr)
    # One lifecycle line per sandboxed task (start, middle), at its end.
    phases = r"create [\d.]+s, stage [\d.]+s, run [\d.]+s, merge [\d.]+s\."
    lifecycle = re.findall(rf"Sandbox \S+ \({backend_name}, \S+, data path \w+\): {phases}", proc.stdout + proc.stderr)
    assert len(lifecycle) == 2, proc.stdout + proc.stderr
    logs = flowdir.run("linear_flow.py", "logs", f"{run['id']}/start")
    assert "start says hi" in logs.stdout + logs.stderr
    err_logs = flowdir.run("linear_flow.py", "logs", "--stderr", f"{run['id']}/start")
    assert "start warns" in err_logs.stdout + err_logs.stderr
    assert flowdir.live_sandboxes("linear_flow.py") == []


def test_with_sandbox_on_every_step(flowdir, backend_name):
    flowdir.run("linear_flow.py", "--with", "sandbox:cpu=1,memory=512", "run")
    run = flowdir.inspect("LinearFlow")
    assert run["successful"]
    end = task(run, "end")
    assert end["artifacts"]["in_sandbox_at_end"] is True
    assert end["sandbox"]["sandbox-backend"] == backend_name
    # The static @sandbox(env=...) of start is kept, not replaced by the --with one.
    assert task(run, "start")["artifacts"]["greeting"] == "hello-from-env"


def test_graph_shapes_large_artifact_card_retry_catch_timeout(flowdir, backend_name):
    flowdir.run("branching_flow.py", "run", "--width", "3", "--big_mb", "24")
    run = flowdir.inspect("BranchingFlow")
    assert run["successful"]
    assert len(run["steps"]["fan"]) == 3 and len(run["steps"]["inner"]) == 6
    assert sorted(t["artifacts"]["values"] for t in run["steps"]["inner_join"]) == [[0, 1], [10, 11], [20, 21]]
    assert task(run, "outer_join")["artifacts"]["all_values"] == [0, 1, 10, 11, 20, 21]
    assert task(run, "split")["artifacts"]["big_ok_in_sandbox"] is True
    end = task(run, "end")
    assert end["artifacts"]["big_ok_locally"] is True
    sandboxed = [t for s in ("start", "fan", "inner") for t in run["steps"][s]]
    assert all(t["sandbox"]["sandbox-backend"] == backend_name for t in sandboxed)
    assert any("card-from-sandbox" in card for card in task(run, "start")["cards"])
    # @retry: the first attempt raised, the second (a new sandbox) succeeded.
    flaky = task(run, "flaky")
    assert flaky["attempt"] == 1 and flaky["artifacts"]["flaky_attempt"] == 1
    # @timeout fired in the sandbox and @catch handled it there.
    assert "timed out" in task(run, "and_join")["artifacts"]["caught"]
    # A crash: the @catch fallback attempt ran locally (no sandbox metadata on attempt 1).
    crashy = task(run, "crashy")
    assert crashy["attempt"] == 1 and task(run, "and_join")["artifacts"]["crash_caught"] is True
    assert "crashy dies" in crashy["stdout"] or "crashy dies" in flowdir.outputs[0]
    assert flowdir.live_sandboxes("branching_flow.py") == []


@pytest.mark.skipif(METAFLOW < (2, 12, 37), reason="Config arrived in Metaflow 2.12.37")
def test_config_values_reach_the_sandboxed_step(flowdir, backend_name):
    # Values given on the command line travel in the code package, not in the runtime's local file.
    flowdir.run("config_flow.py", "--config-value", "settings", '{"rate": 7, "name": "from-cli"}', "run")
    run = flowdir.inspect("ConfigFlow")
    start = task(run, "start")
    assert (start["artifacts"]["rate"], start["artifacts"]["name"]) == (7, "from-cli")
    assert start["sandbox"]["sandbox-backend"] == backend_name


def test_user_exception_fails_the_run_after_retries(flowdir):
    proc = flowdir.run("failing_flow.py", "run", "--mode", "exception", ok=False)
    assert "boom-user-error" in proc.stdout + proc.stderr
    # The traceback names the user's file, not the sandbox's copy of it.
    assert f'File "{flowdir.path / "failing_flow.py"}", line' in proc.stdout + proc.stderr
    assert "/code/failing_flow.py" not in proc.stdout + proc.stderr
    assert "Task is starting (retry)" in proc.stdout + proc.stderr
    run = flowdir.inspect("FailingFlow")
    assert not run["successful"]
    work = task(run, "work")
    assert "boom-user-error" in work["stderr"]
    logs = flowdir.run("failing_flow.py", "logs", "--stderr", f"{run['id']}/work")
    assert "boom-user-error" in logs.stdout + logs.stderr


def test_nonzero_exit_is_a_task_failure(flowdir):
    proc = flowdir.run("failing_flow.py", "run", "--mode", "exit", ok=False)
    out = proc.stdout + proc.stderr
    assert "exiting with 7" in out and "Task failed" in out
    assert "Task is starting (retry)" in out  # a user-code failure: @retry applies


def test_resume_reruns_the_failed_step_in_a_sandbox(flowdir, backend_name):
    first = flowdir.run("failing_flow.py", "run", env={"SBX_FAIL": "1"}, ok=False)
    origin = run_id_of(first.stdout + first.stderr)
    flowdir.run("failing_flow.py", "resume", "--origin-run-id", origin)
    resumed = flowdir.inspect("FailingFlow")
    assert resumed["successful"] and resumed["id"] != origin
    original = flowdir.inspect("FailingFlow", origin)
    assert task(resumed, "start")["artifacts"]["token"] == task(original, "start")["artifacts"]["token"]
    work = task(resumed, "work")
    assert work["artifacts"]["attempt"] == 0 and work["sandbox"]["sandbox-backend"] == backend_name


@pytest.mark.edges
def test_sandbox_destroyed_mid_step_is_an_infrastructure_failure_and_retried(flowdir):
    proc = flowdir.start("failing_flow.py", "run", "--mode", "sleep")
    lines: list[str] = []
    wait_for_line(proc, "sleeping-now", lines)
    listed = flowdir.run("failing_flow.py", "sandbox", "list")
    assert "/work/2 attempt 0" in listed.stdout + listed.stderr
    # Destroyed from outside (not `sandbox kill`, which ends the attempt as killed: test_lifecycle).
    destroy = (
        "from metaflow_extensions.sandbox.core import default_backend, get_backend\n"
        "backend = get_backend(default_backend())\n"
        "for info in backend.list({'metaflow-flow': 'FailingFlow'}):\n"
        "    backend.destroy(info.id)\n"
    )
    subprocess.run([sys.executable, "-c", destroy], env=flowdir.env, check=True, timeout=120)
    rest, _ = proc.communicate(timeout=600)
    out = "".join(lines) + rest
    assert proc.returncode == 0, out
    assert "Infrastructure failure" in out
    run = flowdir.inspect("FailingFlow")
    assert task(run, "work")["artifacts"]["attempt"] == 1


@pytest.mark.edges
def test_ctrl_c_destroys_live_sandboxes(flowdir):
    proc = flowdir.start("failing_flow.py", "run", "--mode", "sleep")
    lines: list[str] = []
    wait_for_line(proc, "sleeping-now", lines)
    assert flowdir.live_sandboxes("failing_flow.py"), "the sandbox should be running"
    interrupt(proc)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert flowdir.live_sandboxes("failing_flow.py") == [], "".join(lines) + rest


@pytest.mark.edges
def test_a_step_cannot_plant_a_value_under_another_values_address(flowdir):
    proc = flowdir.run("attack_flow.py", "run", ok=False)
    out = proc.stdout + proc.stderr
    assert "planted" in out, "the attack must have run"
    assert "does not hash to it" in out and "Task is starting (retry)" not in out
    planted = [p for p in (flowdir.path / ".metaflow" / "AttackFlow" / "data").rglob("*") if p.is_file()]
    assert not any(b"the attacker's value" in gzip.decompress(p.read_bytes()) for p in planted
                   if not p.name.endswith("_meta")), "the attacker's bytes entered the datastore"  # fmt: skip
    run = flowdir.inspect("AttackFlow")
    assert not run["successful"] and "end" not in run["steps"]
    assert flowdir.live_sandboxes("attack_flow.py") == []


INJECTED_NAME = '{"X; echo INJECTED >&2; Y": "v"}'


def _bad(flow_args: list[str], env: dict[str, str], message: str, case: str, marks: object = ()) -> object:
    """A table row: ``flow.py`` arguments (``misconfigured_flow.py`` if they start with a case name
    of it, else ``linear_flow.py ... run``), the environment, what the message must say."""
    if flow_args and flow_args[0].startswith("misconfigured:"):
        env = {**env, "SBX_MISCONFIG": flow_args[0].split(":", 1)[1]}
        return pytest.param(["misconfigured_flow.py", "run"], env, message, id=case, marks=marks)
    command = [] if flow_args[-1:] == ["create"] else ["run"]
    return pytest.param(["linear_flow.py", *flow_args, *command], env, message, id=case, marks=marks)


# Before 2.13.8 Metaflow's pypi/conda environment downloads micromamba as it starts, before any
# decorator is asked: offline (as here) its own download error comes first, online ours follows it.
EAGER_MICROMAMBA = pytest.mark.skipif(
    METAFLOW < (2, 13, 8), reason="Metaflow < 2.13.8 downloads micromamba before any decorator is asked"
)


# An S3 datastore no test reaches: refusals made before the datastore is asked need no bucket.
NOWHERE_S3 = {"METAFLOW_DEFAULT_DATASTORE": "s3", "METAFLOW_DATASTORE_SYSROOT_S3": "s3://mfsbx-nowhere/root"}


def _bad_input() -> list[object]:
    """Malformed and hostile configurations, each refused before "Workflow starting" with a message
    naming what to change. Rows that do not depend on the backend run in the local cell only (they
    fail in the runtime before any backend is asked); the rest run on every backend."""
    backend = os.environ.get("MFSBX_E2E_BACKEND", "local")
    w = "--with"
    any_backend = [
        # Decorator options, as `--with` strings.
        _bad([w, f"sandbox:env={INJECTED_NAME}"], {}, "is not a valid environment variable", "env-name"),
        _bad([w, f"environment:vars={INJECTED_NAME}"], {}, "is not a valid environment variable", "environment"),
        _bad([w, 'sandbox:env={"A": "x\\u0000y"}'], {}, "holds a NUL character", "env-nul"),
        _bad([w, "sandbox:env=notadict"], {}, "got 'notadict'", "env-not-json"),
        _bad([w, "sandbox:env=[1]"], {}, "env must be a dict", "env-json-list"),
        _bad([w, 'sandbox:env={"PATH": "/nowhere"}'], {}, "leaves out /usr/bin and /bin", "env-path"),
        _bad([w, 'sandbox:options={"api_key": "sekrit"}'], {}, "is a credential", "secret-option"),
        _bad([w, 'sandbox:options={"auth_token": "sekrit"}'], {}, "is a credential", "secret-option-word"),
        _bad([w, "sandbox:options=isolation"], {}, "options must be a dict", "options-not-json"),
        _bad([w, "sandbox:cpu=lots"], {}, "cpu=lots must be a number", "cpu-text"),
        _bad([w, "sandbox:cpu=0"], {}, "cpu=0 must be at least 0.001", "cpu-zero"),
        _bad([w, "sandbox:memory=-5"], {}, "memory=-5 must be at least 1", "memory-negative"),
        _bad([w, "sandbox:memory=1.5"], {}, "memory=1.5 must be an integer", "memory-fraction"),
        _bad([w, "sandbox:disk=big"], {}, "disk=big must be an integer", "disk-text"),
        _bad([w, "sandbox:gpu=-1"], {}, "gpu=-1 must be at least 0", "gpu-negative"),
        _bad([w, "sandbox:timeout=0"], {}, "timeout=0 must be at least 1", "timeout-zero"),
        _bad([w, "sandbox:timeout=soon"], {}, "timeout=soon must be an integer", "timeout-text"),
        _bad([w, "sandbox:network=maybe"], {}, "network='maybe' must be True/False", "network"),
        _bad([w, "sandbox:data_path=teleport"], {}, "data_path='teleport' must be one of", "data-path"),
        _bad([w, "sandbox:data_path=direct"], {}, "data_path='direct' needs a remote datastore", "direct-local"),
        _bad([w, "sandbox:credentials=steal"], {}, "credentials='steal' must be one of", "credentials"),
        _bad([w, "resources:cpu=-2"], {}, "@resources cpu=-2 must be at least 0", "resources-cpu"),
        _bad([w, "sandbox:backend=nosuch"], {}, "Unknown sandbox backend 'nosuch'", "backend"),
        _bad([], {"METAFLOW_SANDBOX_BACKEND": "nosuch"}, "Unknown sandbox backend 'nosuch'", "backend-variable"),
        _bad([w, "daytona:backend=e2b"], {}, "Use @sandbox(backend='e2b') instead", "alias-backend-with"),
        # Conflicts and what `--with` cannot say.
        _bad(["misconfigured:batch"], {}, "has both @sandbox and @batch", "with-batch"),
        _bad(["misconfigured:kubernetes"], {}, "has both @sandbox and @kubernetes", "with-kubernetes"),
        _bad(["misconfigured:two-decorators"], {}, "use one sandbox decorator per step", "two-decorators"),
        _bad(["misconfigured:alias-backend"], {}, "Use @sandbox(backend='e2b') instead", "alias-backend"),
        _bad(["misconfigured:large-env-value"], {}, "BIG is 195 KiB; one environment variable", "env-value-size"),
        _bad(["misconfigured:large-env"], {}, "add up to 1171 KiB", "env-size"),
        _bad(["misconfigured:environment-path"], {}, "@environment(vars=...) on step start: PATH=", "environment-path"),
        _bad(["misconfigured:timeout-fraction"], {}, "timeout=1.5 must be an integer", "timeout-fraction"),
        _bad(["misconfigured:image-not-text"], {}, "image=3 must be a string", "image-not-text"),
        _bad(["misconfigured:env-not-text"], {}, "env must be a dict", "env-list"),
        # @pypi/@conda: Metaflow's bootstrap reads the packages from a remote datastore, over the network.
        _bad(["misconfigured:pypi"], {"METAFLOW_DEFAULT_ENVIRONMENT": "pypi"}, "@pypi needs a remote datastore",
             "pypi-local-datastore", EAGER_MICROMAMBA),
        _bad(["misconfigured:pypi-no-network"], {"METAFLOW_DEFAULT_ENVIRONMENT": "pypi", **NOWHERE_S3},
             "@pypi with network=False", "pypi-no-network", EAGER_MICROMAMBA),
        _bad(["argo-workflows", "create"], {}, "which `argo-workflows` cannot deploy", "deployer"),
    ]  # fmt: skip
    per_backend = {
        "local": [
            _bad([], {"METAFLOW_SANDBOX_LOCAL_ISOLATION": "chroot"}, "isolation='chroot' must be one of",
                 "isolation-variable"),
            _bad([w, 'sandbox:options={"isolation": "jail"}'], {}, "isolation='jail' must be one of",
                 "isolation-option"),
            _bad([], {"METAFLOW_SANDBOX_LOCAL_ROOT": "/proc/no-such-root"},
                 "cannot keep its sandboxes in /proc/no-such-root", "local-root"),
            _bad([], {"METAFLOW_SANDBOX_LOCAL_ROOT": "/etc/passwd/root"}, "Set METAFLOW_SANDBOX_LOCAL_ROOT",
                 "local-root-file"),
            _bad([w, "sandbox:image=ubuntu"], {}, "the local backend runs no images (image='ubuntu')", "local-image"),
        ],
        "daytona": [
            _bad([], {"DAYTONA_API_KEY": ""}, "DAYTONA_API_KEY is not set", "missing-key"),
            _bad([w, 'sandbox:options={"create_timeout_s": "soon"}'], {},
                 "create_timeout_s='soon' must be a number", "option-type"),
            _bad([], {"DAYTONA_API_URL": "http://127.0.0.1:9/api"}, "its API did not answer", "unreachable-api"),
        ],
        "e2b": [_bad([], {"E2B_API_KEY": ""}, "export E2B_API_KEY=", "missing-key")],
    }  # fmt: skip
    cases = any_backend if backend == "local" else []
    cases.append(_bad([w, 'sandbox:options={"colour": "blue"}'], {}, f"Unknown option 'colour' for the '{backend}'",
                      "unknown-option"))  # fmt: skip
    cases += per_backend.get(backend, [])
    for alias, dist in (("daytona", "metaflow-sandbox-daytona"), ("e2b", "metaflow-sandbox-e2b")):
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            cases.append(_bad([w, alias], {}, f"pip install {dist}", f"{alias}-not-installed"))
    return cases


@pytest.mark.edges
@pytest.mark.parametrize(("flow_args", "env", "message"), _bad_input())
def test_bad_input_is_refused_before_any_sandbox_exists(flowdir, flow_args, env, message, request):
    # A user of its own: on a provider, the sandboxes of this run alone are listed (other tests
    # run the same flows on the same emulator meanwhile).
    user = {"USERNAME": f"bad-input-{request.node.callspec.id}"}
    flow, *args = flow_args
    proc = flowdir.run(flow, *args, ok=False, env={**user, **env})
    out = proc.stdout + proc.stderr
    assert "Sandbox error" in out and message in out, out
    assert "Workflow starting" not in out and "INJECTED" not in out.replace("echo INJECTED", "")
    assert "sekrit" not in out and "Traceback" not in out
    if flowdir.backend == "local":
        assert flowdir.live_sandboxes(flow) == []
    else:
        listed = flowdir.run(flow, "sandbox", "list", "--my-runs", env=user)
        assert [line for line in (listed.stdout + listed.stderr).splitlines() if line.startswith(flowdir.backend)] == []


@pytest.mark.edges
def test_a_local_backend_warning_is_said_once_per_run(flowdir, backend_name, tmp_path):
    if backend_name != "local":
        pytest.skip("the warning of the local backend without bubblewrap")
    # A bubblewrap that cannot create namespaces (as in many containers): plain processes, warned.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "bwrap").write_text("#!/bin/sh\nexit 1\n")
    (fake / "bwrap").chmod(0o755)
    proc = flowdir.run("linear_flow.py", "run", env={"PATH": f"{fake}:{os.environ['PATH']}"})
    out = proc.stdout + proc.stderr
    assert out.count("NOT an isolation boundary") == 1, out
    assert "IsolationWarning" not in out and "(local, process, data path relay)" in out


@pytest.mark.edges
def test_sandbox_doctor_checks_the_flows_backend(flowdir, backend_name):
    proc = flowdir.run("linear_flow.py", "sandbox", "doctor")
    out = proc.stdout
    assert "ok    metaflow-sandbox: metaflow: " in out and "ok    metaflow: datastore: local" in out
    assert "ok    metaflow: extension: @sandbox, @daytona, @e2b" in out
    assert f"ok    {backend_name}: sandbox: " in out and f"ok    {backend_name}: destroyed" in out
    assert out.rstrip().endswith("All is well.")
    assert flowdir.live_sandboxes("linear_flow.py") == []


def test_uv_environment_is_bootstrapped_in_every_sandbox_and_built_once(flowdir, backend_name):
    # `--environment=uv`: each sandbox syncs the project from its uv.lock (shipped in the code
    # package) before the step runs with `uv run --no-sync python`; offline, from wheels next to
    # the flow: the project's own package (which the launcher's environment lacks) and what
    # Metaflow's bootstrap installs for the local datastore (requests and its dependencies).
    # The first task builds the environment; every later task gets it and finds it in sync.
    if backend_name != "local":
        # The bootstrap is the same shell on every backend (it passed against both emulators when
        # written); a provider cell spends ~20 s more on it, so the matrix runs it on local only.
        pytest.skip("the uv environment is tested on the local backend only, to keep the e2e matrix lean")
    if importlib.util.find_spec("metaflow.plugins.uv") is None:
        pytest.skip(f"Metaflow {importlib.metadata.version('metaflow')} has no uv environment")
    bootstrap = Path(importlib.util.find_spec("metaflow.plugins.uv.bootstrap").origin).read_text()
    if "metaflow.info_file" in bootstrap and importlib.util.find_spec("metaflow.info_file") is None:
        # Metaflow's own bug (2.16.0): its uv bootstrap imports a module the release lacks, so
        # `--environment=uv` fails the same way under @batch.
        pytest.skip(f"Metaflow {importlib.metadata.version('metaflow')}'s uv bootstrap imports metaflow.info_file")
    uv = shutil.which("uv", path=os.path.dirname(sys.executable))
    assert uv, "the e2e session installs uv next to the launcher's Python (nox: e2e)"
    wheels = flowdir.path / "wheels"
    dep = pure_wheel(wheels, "mfsbx-uvdep", "0.1.0", {"mfsbx_uvdep/__init__.py": 'VALUE = "from-the-uv-project"\n'})
    repack_with_requirements(wheels, "requests")
    (flowdir.path / "pyproject.toml").write_text(
        '[project]\nname = "uvflow"\nversion = "0.1.0"\nrequires-python = ">=3.10"\n'
        'dependencies = ["mfsbx-uvdep"]\n\n'
        f'[tool.uv.sources]\nmfsbx-uvdep = {{ path = "wheels/{dep.name}" }}\n'
    )
    subprocess.run([uv, "lock", "--offline"], cwd=flowdir.path, check=True, capture_output=True)
    assert importlib.util.find_spec("mfsbx_uvdep") is None, "the launcher's environment must lack the package"
    proc = flowdir.run("uv_flow.py", "--environment=uv", "--package-suffixes=.py,.whl", "run")
    print("\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "Sandbox sbx-" in line))  # figures
    run = flowdir.inspect("UvFlow")
    assert run["successful"]
    start, end = task(run, "start"), task(run, "end")
    assert start["artifacts"]["value"] == end["artifacts"]["end_value"] == "from-the-uv-project"
    assert task(run, "join")["artifacts"]["item_values"] == [f"from-the-uv-project-{i}" for i in (1, 2, 3)]
    reused = "Reusing the environment an earlier task of this run built (.venv, uv_install)."
    assert reused not in start["stdout"], "the first task builds the environment"
    later = [t for name in ("work", "join", "end") for t in run["steps"][name]]
    assert len(later) == 5 and all(reused in t["stdout"] for t in later), [t["stdout"] for t in later]
    assert start["artifacts"]["sandboxed"] and end["artifacts"]["end_sandboxed"]
    assert start["sandbox"]["sandbox-backend"] == end["sandbox"]["sandbox-backend"] == backend_name
    assert end["artifacts"]["end_python"].endswith("/.venv/bin/python"), end["artifacts"]["end_python"]
    assert "uv project bootstrapped." in start["stdout"]
    assert flowdir.live_sandboxes("uv_flow.py") == []
