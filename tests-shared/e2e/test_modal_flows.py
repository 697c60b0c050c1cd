"""What only the ``modal`` backend must prove end to end, against the Modal wire emulator: a step
decorated ``@modal`` runs in a Modal sandbox whatever the default backend, and a sandbox dying
mid-step is an infrastructure failure that ``@retry`` recovers from; nothing left live.

Layer: tests-shared/e2e. Imports: pytest, the standard library, ``sandbox_testing``.
"""

from __future__ import annotations

import pytest

from sandbox_testing.modal import emulator_state, set_faults

pytestmark = [pytest.mark.e2e, pytest.mark.edges]

MODAL_STEP_FLOW = """
import os

from metaflow import FlowSpec, modal, step


class ModalStepFlow(FlowSpec):
    @modal
    @step
    def start(self):
        self.where = os.getcwd()
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ModalStepFlow()
"""


@pytest.fixture
def emulator(backend_name, backend_env) -> str:
    if backend_name != "modal":
        pytest.skip("modal-specific: run with MFSBX_E2E_BACKEND=modal")
    return backend_env["MODAL_SERVER_URL"]


def test_a_modal_step_runs_on_modal_whatever_the_default(flowdir, emulator):
    (flowdir.path / "modal_step_flow.py").write_text(MODAL_STEP_FLOW)
    flowdir.run("modal_step_flow.py", "run", env={"METAFLOW_SANDBOX_BACKEND": "local"})
    run = flowdir.inspect("ModalStepFlow")
    assert run["successful"]
    (task,) = run["steps"]["start"]
    assert task["sandbox"]["sandbox-backend"] == "modal"
    assert task["artifacts"]["where"].startswith("/root/")  # the step's code lives under the workdir
    assert emulator_state(emulator)["live"] == 0


def test_a_dying_sandbox_fails_the_attempt_and_retry_recovers(flowdir, emulator):
    # The datastore root (inside the test's directory) is in the step's command line.
    set_faults(emulator, die_next=1, match=str(flowdir.path))
    proc = flowdir.run("long_flow.py", "run", "--seconds", "6")
    out = proc.stdout + proc.stderr
    assert "Infrastructure failure" in out and "Task is starting (retry)" in out
    run = flowdir.inspect("LongFlow")
    assert run["successful"] and run["steps"]["start"][0]["artifacts"]["attempt"] == 1
    assert emulator_state(emulator)["live"] == 0
