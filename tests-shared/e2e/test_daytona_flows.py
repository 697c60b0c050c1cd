"""Flows on ``@daytona`` through the Daytona emulator's injected faults: 429/503 answers, cut log
streams, a sandbox dying mid-step; and never a sandbox left behind. With ``-m live`` and a
``DAYTONA_API_KEY``, one flow runs on the real Daytona.

Layer: tests-shared/e2e. Imports: pytest, the standard library, ``sandbox_testing``.

Runs only when the e2e suite targets the daytona backend (``MFSBX_E2E_BACKEND=daytona``): the
faults are the emulator's, and the live flow needs the daytona backend installed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from sandbox_testing.daytona import NO_FAULTS, emulator_state, set_faults

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.edges,
    pytest.mark.skipif(
        os.environ.get("MFSBX_E2E_BACKEND") != "daytona",
        reason="injects faults through the Daytona emulator: runs with MFSBX_E2E_BACKEND=daytona",
    ),
]


@pytest.fixture
def emulator(backend_env: dict[str, str]) -> Iterator[str]:
    url = backend_env["MFSBX_DAYTONA_EMULATOR"]
    set_faults(url, **NO_FAULTS)
    yield url
    set_faults(url, **NO_FAULTS)
    assert emulator_state(url)["live"] == 0, "a flow left a Daytona sandbox behind"


def test_flow_finishes_with_correct_artifacts_under_429_503_and_cut_streams(flowdir, emulator):
    (flowdir.path / "input.txt").write_text("included-text")
    set_faults(emulator, rate_429=0.1, rate_503=0.1, drop_next=1000)
    flowdir.run("linear_flow.py", "run", "--alpha", "5", "--data", "input.txt")
    assert set_faults(emulator, **NO_FAULTS)["refused"] >= 5
    run = flowdir.inspect("LinearFlow")
    assert run["successful"]
    start = run["steps"]["start"][0]
    assert start["artifacts"]["x"] == 10 and start["artifacts"]["data_text"] == "included-text"
    assert start["stdout"] == "start says hi\n"
    assert run["steps"]["middle"][0]["artifacts"]["y"] == 11


def test_sandbox_dying_mid_step_fails_the_attempt_and_retry_recovers(flowdir, emulator):
    # The step's own command ("... step work ...") kills its sandbox a second in.
    set_faults(emulator, die_next=1, die_after_s=1.0, match=" step work ")
    proc = flowdir.run("failing_flow.py", "run", "--mode", "sleep")
    out = proc.stdout + proc.stderr
    assert "Infrastructure failure" in out, out
    run = flowdir.inspect("FailingFlow")
    assert run["successful"] and run["steps"]["work"][0]["artifacts"]["attempt"] == 1


# Captured before any fixture points the flows at the emulator.
LIVE_ENV = {
    "DAYTONA_API_KEY": os.environ.get("DAYTONA_API_KEY", ""),
    "DAYTONA_API_URL": os.environ.get("DAYTONA_API_URL", "https://app.daytona.io/api"),
}


@pytest.mark.live
@pytest.mark.skipif(
    not LIVE_ENV["DAYTONA_API_KEY"] or "127.0.0.1" in LIVE_ENV["DAYTONA_API_URL"],
    reason="DAYTONA_API_KEY is not set: no real Daytona to run a flow on",
)
def test_a_flow_on_the_real_daytona(flowdir):
    (flowdir.path / "input.txt").write_text("included-text")
    flowdir.run("linear_flow.py", "run", "--alpha", "5", "--data", "input.txt", env=LIVE_ENV)
    run = flowdir.inspect("LinearFlow")
    assert run["successful"] and run["steps"]["start"][0]["artifacts"]["x"] == 10
    assert run["steps"]["start"][0]["sandbox"]["sandbox-backend"] == "daytona"
    listed = flowdir.run("linear_flow.py", "sandbox", "list", env=LIVE_ENV)
    assert "daytona:" not in listed.stdout, "the flow left a sandbox behind on Daytona"
