"""What only the ``e2b`` backend must prove end to end, against the E2B wire emulator: a step that
outlives the sandbox lifetime, a sandbox dying mid-step (``@retry`` recovers), a stalled output
stream (detected, reported, retried), and API rate limits that flows ride out; nothing left live.

Layer: tests-shared/e2e. Imports: pytest, the standard library, ``sandbox_testing``.

The emulator of this session caps every sandbox lifetime at ``E2B_E2E_LIFETIME_S`` (see
``sandbox_testing/e2b.py``): E2B's 300 s default, scaled down so that outliving it takes seconds.
"""

from __future__ import annotations

import pytest

from sandbox_testing.e2b import E2B_E2E_LIFETIME_S, emulator_state, set_faults

pytestmark = [pytest.mark.e2e, pytest.mark.edges]


@pytest.fixture
def emulator(backend_name, backend_env) -> str:
    if backend_name != "e2b":
        pytest.skip("e2b-specific: run with MFSBX_E2E_BACKEND=e2b")
    return backend_env["E2B_API_URL"]


def start_task(run: dict) -> dict:
    return run["steps"]["start"][0]


def test_a_step_outlives_the_sandbox_lifetime(flowdir, emulator):
    seconds = 2.5 * E2B_E2E_LIFETIME_S
    flowdir.run("long_flow.py", "run", "--seconds", str(seconds))
    run = flowdir.inspect("LongFlow")
    assert run["successful"]
    task = start_task(run)
    assert task["attempt"] == 0 and task["artifacts"]["waited"] == seconds
    assert task["sandbox"]["sandbox-backend"] == "e2b"
    assert flowdir.live_sandboxes("long_flow.py") == [] and emulator_state(emulator)["live"] == 0


def test_a_dying_sandbox_fails_the_attempt_and_retry_recovers(flowdir, emulator):
    # The datastore root (inside the test's directory) is in the step's command line.
    set_faults(emulator, die_next=1, die_after_s=2.0, match=str(flowdir.path))
    proc = flowdir.run("long_flow.py", "run", "--seconds", "6")
    out = proc.stdout + proc.stderr
    assert "Infrastructure failure" in out and "Task is starting (retry)" in out
    run = flowdir.inspect("LongFlow")
    assert run["successful"] and start_task(run)["artifacts"]["attempt"] == 1
    assert emulator_state(emulator)["live"] == 0


def test_a_stalled_stream_is_reported_and_retried(flowdir, emulator):
    set_faults(emulator, stall_next=1, match=str(flowdir.path))
    proc = flowdir.run("long_flow.py", "run", "--seconds", "1")
    out = proc.stdout + proc.stderr
    assert "stalled" in out and "Task is starting (retry)" in out
    run = flowdir.inspect("LongFlow")
    assert run["successful"] and start_task(run)["artifacts"]["attempt"] == 1
    assert emulator_state(emulator)["live"] == 0


def test_rate_limits_and_latency_do_not_fail_flows(flowdir, emulator):
    set_faults(emulator, rate_429=0.25, rate_503=0.15, latency_ms=30)
    try:
        flowdir.run("long_flow.py", "run", "--seconds", "1")
    finally:
        refused = set_faults(emulator, rate_429=0, rate_503=0, latency_ms=0)["refused"]
    assert refused > 0  # control-plane calls met 429s and 503s, and the flow still succeeded
    run = flowdir.inspect("LongFlow")
    assert run["successful"] and start_task(run)["artifacts"]["attempt"] == 0
    assert emulator_state(emulator)["live"] == 0
