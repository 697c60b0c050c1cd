"""How a sandboxed task ends when its task does not end it: the runtime killed (SIGTERM, SIGKILL),
its launcher killed, ``sandbox kill``, Ctrl-C into a run that ignores it; and ``sandbox list``
asking the backends a flow's steps use. On every backend, checked through the backend's own
listing (``FlowDir.live_sandboxes``).

Layer: tests-shared/e2e. Imports: pytest, the standard library, ``sandbox_testing``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_testing.flows import FlowDir, run_id_of, task, wait_for_line

pytestmark = [pytest.mark.e2e, pytest.mark.edges]

# The goal is 0 live sandboxes 10 s after the runtime dies; the launcher notices within
# ~1 s. A loaded CI machine gets a generous bound (the figure measured is printed).
GONE_WITHIN_S = 60


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _launchers(runtime: int) -> list[int]:
    """The runtime's launcher processes (the runtime starts them itself, no shell between)."""
    found = []
    for pid in _children(runtime):
        with contextlib.suppress(OSError):
            if b"plugins.launcher" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return found


def _sandboxed_processes(run_id: str) -> list[int]:
    """Processes of this machine running a sandboxed task of ``run_id`` (found by their environment)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            env = environ.read_bytes().split(b"\0")
            if f"METAFLOW_RUN_ID={run_id}".encode() in env and any(v.startswith(b"METAFLOW_SANDBOX_ID=") for v in env):
                found.append(int(environ.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def _sleeping_run(flowdir: FlowDir, *, preexec=None) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """``failing_flow.py run --mode sleep`` until its sandboxed step sleeps; whatever is left of
    the run's process group is killed at the end."""
    if preexec is None:
        proc = flowdir.start("failing_flow.py", "run", "--mode", "sleep")
    else:
        proc = _start(flowdir, preexec, "failing_flow.py", "run", "--mode", "sleep")
    lines: list[str] = []
    try:
        wait_for_line(proc, "sleeping-now", lines)
        yield proc, lines
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        flowdir.outputs.append("".join(lines))


def _start(
    flowdir: FlowDir, preexec, flow: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        flowdir.command(flow, *args),
        cwd=flowdir.path,
        env={**flowdir.env, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=preexec,  # noqa: PLW1509 (no thread runs in the test process while it forks)
    )


def _until_gone(flowdir: FlowDir, pids: list[int]) -> str:
    """How long until none of ``pids`` and no sandbox of the flow is left (fails past the bound)."""
    start = time.monotonic()
    while [pid for pid in pids if _alive(pid)]:
        if time.monotonic() - start > GONE_WITHIN_S:
            pytest.fail(f"{GONE_WITHIN_S} s after, launchers {pids} still run")
        time.sleep(0.2)
    exited = time.monotonic() - start
    left = flowdir.live_sandboxes("failing_flow.py")
    print(f"first listing done {time.monotonic() - start:.1f} s after: {left}")
    while left:
        if time.monotonic() - start > GONE_WITHIN_S:
            pytest.fail(f"{GONE_WITHIN_S} s after, sandboxes {left} are still live")
        time.sleep(0.5)
        left = flowdir.live_sandboxes("failing_flow.py")
    return f"launchers gone {exited:.1f} s after, no sandbox listed {time.monotonic() - start:.1f} s after"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killing_the_runtime_leaves_no_sandbox(flowdir, signum):
    with _sleeping_run(flowdir) as (proc, _):
        launchers = _launchers(proc.pid)
        assert launchers and flowdir.live_sandboxes("failing_flow.py"), "the step should be running"
        os.kill(proc.pid, signum)  # the runtime alone, as a scheduler or a CI timeout does
        proc.wait(timeout=60)
        print(f"{signal.Signals(signum).name}: {_until_gone(flowdir, launchers)}")


@pytest.mark.parametrize("isolation", ["default", "process"])
def test_sandboxes_of_a_killed_launcher_are_listed_and_killed_by_run_id(flowdir, isolation):
    if isolation == "process":
        # No private root: the retry's sandbox shares the datastore, where attempt 0 left files.
        if flowdir.backend != "local":
            pytest.skip("the local backend's process mode")
        flowdir.env = {**flowdir.env, "METAFLOW_SANDBOX_LOCAL_ISOLATION": "process"}
    with _sleeping_run(flowdir) as (proc, lines):
        [launcher] = _launchers(proc.pid)
        os.kill(launcher, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=600)  # the retry (no sleep on attempt 1) finishes the run
        lines.append(rest)
    run_id = run_id_of("".join(lines))
    if flowdir.backend == "local":  # before anything lists (and so reaps) the sandbox it left
        assert not _sandboxed_processes(run_id), "the killed launcher's task runs on"
    assert proc.returncode == 0, "".join(lines)
    listed = flowdir.run("failing_flow.py", "sandbox", "list", "--run-id", run_id)
    # Its processes died with the launcher (bubblewrap's --die-with-parent, or the process mode's
    # supervisor; listing reaped the directory it left); a provider's sandbox was destroyed by the
    # attempt's process in the run's sandbox service when the launcher's connection closed.
    assert "No live sandboxes" in listed.stdout + listed.stderr
    assert flowdir.live_sandboxes("failing_flow.py") == []


def test_sandbox_kill_ends_the_attempt_as_killed_without_retry(flowdir):
    with _sleeping_run(flowdir) as (proc, lines):
        killed = flowdir.run("failing_flow.py", "sandbox", "kill")
        assert "Destroyed" in killed.stdout + killed.stderr
        rest, _ = proc.communicate(timeout=600)
        lines.append(rest)
    out = "".join(lines)
    assert proc.returncode != 0, out  # @retry(times=1) on the step, yet no second attempt
    assert "killed by `sandbox kill`" in out and "Infrastructure failure" not in out, out
    assert "(retry)" not in out, out
    assert flowdir.live_sandboxes("failing_flow.py") == []


def test_a_run_that_ignores_ctrl_c_runs_its_sandboxed_steps_to_the_end(flowdir):
    # A script's `flow.py run &` without job control: SIGINT ignored, inherited by every task.
    ignore_ctrl_c = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731
    proc = _start(flowdir, ignore_ctrl_c, "long_flow.py", "run", "--seconds", "3")
    lines: list[str] = []
    wait_for_line(proc, "long-step-started", lines)
    os.killpg(proc.pid, signal.SIGINT)
    rest, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, "".join(lines) + rest
    run = flowdir.inspect("LongFlow")
    assert task(run, "start")["artifacts"]["attempt"] == 0  # the first attempt was not interrupted


def test_sandbox_list_names_the_fix_for_a_backend_it_cannot_ask(flowdir):
    listed = flowdir.run("failing_flow.py", "sandbox", "list", "--backend", "no-such-backend", ok=False)
    out = listed.stdout + listed.stderr
    assert "Traceback" not in out and "no-such-backend" in out, out
    assert len([line for line in out.splitlines() if "no-such-backend" in line]) == 1, out


# A flow whose step names its backend: `sandbox list` must find its sandboxes whatever the default.
DAYTONA_STEP_FLOW = """
import time

from metaflow import FlowSpec, daytona, step


class DaytonaStepFlow(FlowSpec):
    @daytona
    @step
    def start(self):
        print("sleeping-now", flush=True)
        time.sleep(600)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    DaytonaStepFlow()
"""


@pytest.fixture
def daytona(flowdir: FlowDir) -> str:
    if flowdir.backend != "daytona":
        pytest.skip("a flow with @daytona steps: runs with MFSBX_E2E_BACKEND=daytona")
    (flowdir.path / "daytona_step_flow.py").write_text(DAYTONA_STEP_FLOW)
    return flowdir.env["MFSBX_DAYTONA_EMULATOR"]


def test_sandbox_list_and_kill_ask_the_backends_the_flows_steps_use(flowdir, daytona):
    other_default = {"METAFLOW_SANDBOX_BACKEND": "local"}
    proc = _start(flowdir, None, "daytona_step_flow.py", "run", env=other_default)
    lines: list[str] = []
    try:
        wait_for_line(proc, "sleeping-now", lines)
        listed = flowdir.run("daytona_step_flow.py", "sandbox", "list", env=other_default)
        assert "daytona:" in listed.stdout + listed.stderr
        unreachable = {**other_default, "DAYTONA_API_URL": "http://127.0.0.1:9/api"}
        failed = flowdir.run("daytona_step_flow.py", "sandbox", "list", env=unreachable, ok=False)
        out = failed.stdout + failed.stderr
        assert "Traceback" not in out and len([x for x in out.splitlines() if "'daytona'" in x]) == 1, out
        killed = flowdir.run("daytona_step_flow.py", "sandbox", "kill", env=other_default)
        assert "Destroyed daytona:" in killed.stdout + killed.stderr
        rest, _ = proc.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and "killed by `sandbox kill`" in "".join(lines) + rest


def test_a_stalled_log_stream_does_not_hang_the_run(flowdir, daytona):
    from sandbox_testing.daytona import NO_FAULTS, set_faults

    # The step's command ("... step start ...") streams no more output, yet runs to its end.
    set_faults(daytona, stall_next=1, match=" step start ")
    fast_checks = {"METAFLOW_SANDBOX_DAYTONA_CHECK_INTERVAL_S": "2"}
    proc = _start(flowdir, None, "long_flow.py", "run", "--seconds", "1", env=fast_checks)
    try:
        out, _ = proc.communicate(timeout=300)  # a generous bound: the run takes ~15 s
    finally:
        set_faults(daytona, **NO_FAULTS)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    flowdir.outputs.append(out)
    run = flowdir.inspect("LongFlow")
    assert run["successful"] and task(run, "start")["artifacts"]["attempt"] == 0, out


def _services(runtime: int) -> list[int]:
    """The sandbox service processes of the runtime ``runtime`` (not the attempts they fork)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            args = cmdline.read_bytes().split(b"\0")
            if b"metaflow_extensions.sandbox.plugins.runservice" not in args:
                continue
            if not Path(
                args[args.index(b"metaflow_extensions.sandbox.plugins.runservice") + 1].decode()
            ).name.startswith(f"{runtime}-"):
                continue
            parent = int(Path(cmdline.parent, "stat").read_text().rsplit(")", 1)[1].split()[1])
            if b"plugins.runservice" not in Path(f"/proc/{parent}/cmdline").read_bytes() and _alive(
                int(cmdline.parent.name)
            ):
                found.append(int(cmdline.parent.name))
    return found


def test_one_service_serves_a_runs_tasks_a_killed_one_fails_its_task_retryably_and_none_outlives_the_run(
    flowdir,
):
    with _sleeping_run(flowdir) as (proc, lines):
        services = _services(proc.pid)
        if flowdir.backend == "local":  # its attempts run in the launcher (docs/architecture.md)
            assert services == []
            return  # the sleeping attempt is killed with the run's process group
        # Services live as long as their runtime: one now means `start` and `work` used the same.
        assert len(services) == 1, services
        os.kill(services[0], signal.SIGKILL)
        rest, _ = proc.communicate(timeout=600)  # the retry (no sleep on attempt 1) finishes the run
        lines.append(rest)
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert "The run's sandbox service ended while this task ran" in out, out
    assert "(retry)" in out, out  # attempt 1 started a new service
    start = time.monotonic()
    while _services(proc.pid):
        if time.monotonic() - start > GONE_WITHIN_S:
            pytest.fail(f"{GONE_WITHIN_S} s after the run, its sandbox services still run")
        time.sleep(0.2)
    assert flowdir.live_sandboxes("failing_flow.py") == []
