"""The fault table: 429 / 5xx / a cut stream / a stalled stream / a sandbox destroyed mid-step,
on create, exec, upload and download, injected through the wire emulator of the provider backend
the e2e cell runs (``MFSBX_E2E_BACKEND``).

Layer: tests-shared/e2e. Imports: pytest, the standard library, ``sandbox_testing``.

Each row maps to its emulator's knobs (``emulator_faults.Faults`` and each emulator's subclass),
or to why that emulator cannot inject it (the row is skipped naming the missing knob). A fault the
backend absorbs (its own retries) must leave the run successful, every step's user code run exactly
once on attempt 0 and its artifacts correct: those rows share few runs of ``faults_flow.py`` (no
``@retry``), the knobs of one group set together. A fault that fails the attempt gets a run of its
own, still without ``@retry``: the run fails, the step's user code ran once, and the datastore holds
no half task (no artifact of the attempt, not successful, no ``DONE.lock``). That ``@retry`` then
recovers is proven per provider in ``test_{daytona,e2b,modal}_flows.py``.

User code runs are counted outside the datastore: the flow reports each to an HTTP server of this
test (the emulated sandboxes share the machine's network). Marked ``edges``: it runs in the oldest
and newest Metaflow cells of each provider, for CI time.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from sandbox_testing.emulators import set_faults
from sandbox_testing.flows import FlowDir

# The e2e conftest's backend, read at collection to group the rows into runs.
BACKEND = os.environ.get("MFSBX_E2E_BACKEND", "local")
# Where each backend's emulator listens (a key of the e2e conftest's ``backend_env``).
EMULATOR_URL = {"daytona": "MFSBX_DAYTONA_EMULATOR", "e2b": "E2B_API_URL", "modal": "MODAL_SERVER_URL"}

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.edges,
    pytest.mark.skipif(BACKEND not in EMULATOR_URL, reason="injects faults through a provider's wire emulator"),
]
# Both rates together refuse about one request in three (spread evenly, see ``Faults``). At 0.5
# (every other request) Daytona's create, retried with a listing in between, lands on a refusal
# every time, in lockstep: an artifact of the even spread that random faults would not show.
RATES = 0.15
FLOW = "faults_flow.py"


@dataclasses.dataclass(frozen=True)
class Knobs:
    """How one emulator injects a row: the faults to set, whether the backend absorbs them or the
    attempt fails, and the run they share with other absorbed rows (same group, one run)."""

    faults: Mapping[str, Any]
    absorbed: bool = True
    group: str = "rates"
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Row:
    fault: str
    operation: str
    backends: Mapping[str, Knobs | str]  # backend -> its knobs, or why its emulator cannot inject it

    @property
    def id(self) -> str:
        return f"{self.fault}-{self.operation}"


# The work step's command (``python flow.py ... step work ...``): what exec faults match.
WORK = " step work "
NO_CONTROL_PLANE_ONLY = "rate_429/rate_503 of {emu} refuse control-plane calls only: no knob refuses {what}"
ROWS = [
    Row(
        "429",
        "create",
        {
            "daytona": Knobs({"rate_429": RATES}),
            "e2b": Knobs({"rate_429": RATES}),
            "modal": Knobs({"rate_429": RATES}),
        },
    ),
    Row(
        "5xx",
        "create",
        {
            "daytona": Knobs({"rate_503": RATES}),
            "e2b": Knobs({"rate_503": RATES}),
            "modal": Knobs({"rate_503": RATES}),
        },
    ),
    *[
        Row(
            status,
            operation,
            {
                # Daytona's rates refuse every request, the toolbox's (exec, bulk-upload/-download) too.
                "daytona": Knobs({knob: RATES}),
                "e2b": NO_CONTROL_PLANE_ONLY.format(emu="E2BFaults", what=f"envd's {operation} requests"),
                "modal": NO_CONTROL_PLANE_ONLY.format(emu="ModalFaults", what=f"the command router's {operation}"),
            },
        )
        for status, knob in [("429", "rate_429"), ("5xx", "rate_503")]
        for operation in ["exec", "upload", "download"]
    ],
    Row(
        "reset",
        "exec",
        {
            "daytona": Knobs({"drop_next": 1, "match": WORK}, group="reset"),
            "e2b": "E2BFaults has no knob that cuts a command stream (only stall_next)",
            "modal": Knobs({"cut_next": 1, "match": WORK}, group="reset"),
        },
    ),
    Row(
        "reset",
        "create",
        {
            "daytona": "DaytonaFaults.drop_next cuts log streams only: no knob cuts a create",
            "e2b": "E2BFaults has no knob that cuts a create",
            "modal": "ModalFaults.cut_next cuts exec output streams only: no knob cuts a create",
        },
    ),
    *[
        Row(
            "reset",
            operation,
            {
                "daytona": f"DaytonaFaults.drop_next cuts log streams only: no knob cuts a {operation}",
                "e2b": f"E2BFaults has no knob that cuts a {operation}",
                # Modal's filesystem API is an exec of its fs tool: its output stream can be cut.
                "modal": Knobs({"cut_next": 1, "match": fs_op}, group=f"reset-{operation}"),
            },
        )
        for operation, fs_op in [("upload", "WriteFile"), ("download", "ReadFile")]
    ],
    Row(
        "stall",
        "exec",
        {
            # The log stream goes silent while the command runs on: the backend's liveness checks
            # (every 2 s here) see it finish.
            "daytona": Knobs(
                {"stall_next": 1, "match": WORK},
                group="stall",
                env={"METAFLOW_SANDBOX_DAYTONA_CHECK_INTERVAL_S": "2"},
            ),
            # E2B's command stream sends keepalives: a silent one is reported as stalled, the attempt fails.
            "e2b": Knobs({"stall_next": 1, "match": WORK}, absorbed=False),
            "modal": "ModalFaults.stall_next is accepted and ignored (the SDK cannot notice a silent stream)",
        },
    ),
    Row(
        "stall",
        "upload",
        {
            "daytona": "DaytonaFaults has no knob that stalls an upload",
            # The upload's watchdog gives up after the request timeout (5 s here) without
            # progress; the backend uploads again, before any user code ran.
            "e2b": Knobs(
                {"stall_upload_next": 1, "match": ""},
                group="stall-upload",
                env={"METAFLOW_SANDBOX_E2B_REQUEST_TIMEOUT_S": "5"},
            ),
            "modal": "ModalFaults has no knob that stalls an upload",
        },
    ),
    *[
        Row(
            "stall",
            operation,
            {b: f"the {b} emulator has no knob that stalls a {operation}" for b in ["daytona", "e2b", "modal"]},
        )
        for operation in ["create", "download"]
    ],
    Row(
        "destroyed",
        "exec",
        {
            backend: Knobs({"die_next": 1, "die_after_s": 1.0, "match": WORK}, absorbed=False)
            for backend in ["daytona", "e2b", "modal"]
        },
    ),
    Row(
        "destroyed",
        "upload",
        {
            "daytona": "DaytonaFaults.die_next matches commands only: an upload is no command",
            "e2b": "E2BFaults.die_next matches commands only: an upload is no command",
            "modal": "ModalFaults.die_next races a WriteFile exec: no knob destroys a chosen upload",
        },
    ),
    Row(
        "destroyed",
        "download",
        {
            "daytona": "DaytonaFaults.die_next matches commands only: a download is no command",
            "e2b": "E2BFaults.die_next matches commands only: a download is no command",
            # The sandbox dies die_after_s after the fs tool's exec starts, racing the read or
            # write itself: no knob destroys the sandbox of a chosen transfer.
            "modal": "ModalFaults.die_next races a ReadFile exec: no knob destroys a chosen download",
        },
    ),
]


class Counter:
    """An HTTP server counting the GETs of each path: ``/<step>/<retry count>`` per user-code run."""

    def __init__(self) -> None:
        self.runs: collections.Counter[str] = collections.Counter()
        counter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                counter.runs[self.path.strip("/")] += 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("0.0.0.0", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@dataclasses.dataclass
class Outcome:
    run: dict[str, Any]
    runs: dict[str, int]  # user-code runs reported, by ``<step>/<retry count>``
    faults: dict[str, Any]  # the emulator's faults after the run (a consumed ``*_next`` is 0)
    refused: int  # requests refused during the run
    done_steps: set[str]  # steps with a task ``DONE.lock`` in the local datastore


def _cases(backend: str) -> list[Any]:
    """One test per flow run: the absorbed rows of a group together, each failing row alone, and
    each row this backend's emulator cannot inject as a skip naming the missing knob. Grouped at
    collection, so that xdist never runs one group twice."""
    cases: list[Any] = []
    groups: dict[str, list[Row]] = {}
    for row in ROWS:
        knobs = row.backends.get(backend)
        if isinstance(knobs, str):
            cases.append(pytest.param([row], id=row.id, marks=pytest.mark.skip(reason=knobs)))
        elif knobs is None:
            reason = f"backend {backend!r} has no wire emulator to inject faults through"
            cases.append(pytest.param([row], id=row.id, marks=pytest.mark.skip(reason=reason)))
        elif knobs.absorbed:
            groups.setdefault(knobs.group, []).append(row)
        else:
            cases.append(pytest.param([row], id=row.id))
    cases += [pytest.param(rows, id="+".join(r.id for r in rows)) for rows in groups.values()]
    return cases


def _run_with(flowdir: FlowDir, url: str, knobs: list[Knobs], ok: bool, seconds: float) -> Outcome:
    faults: dict[str, Any] = {k: v for kn in knobs for k, v in kn.faults.items()}
    env: dict[str, str] = {k: v for kn in knobs for k, v in kn.env.items()}
    before = set_faults(url)
    counter = Counter()
    set_faults(url, **faults)
    try:
        flowdir.run(FLOW, "run", "--record", counter.url, "--seconds", str(seconds), ok=ok, env=env)
    finally:
        after = set_faults(url, **{k: before[k] for k in faults})
        counter.server.shutdown()
    run = flowdir.inspect("FaultsFlow")
    root = flowdir.path / ".metaflow" / "FaultsFlow" / run["id"]
    done = {p.relative_to(root).parts[0] for p in root.glob("*/*/*DONE.lock")} - {"_parameters"}
    return Outcome(run, dict(counter.runs), after, after["refused"] - before["refused"], done)


def _was_injected(row: Row, knobs: Knobs, outcome: Outcome) -> None:
    for name, value in knobs.faults.items():
        if name.endswith("_next"):
            assert outcome.faults[name] == 0, f"{row.id}: {name}={value} was never consumed: {outcome.faults}"
        elif name.startswith("rate_"):
            assert outcome.refused > 0, f"{row.id}: {name}={value} refused nothing"


@pytest.mark.parametrize("rows", _cases(BACKEND))
def test_faults(rows: list[Row], flowdir: FlowDir, backend_env: dict[str, str]) -> None:
    knobs = [row.backends[BACKEND] for row in rows]
    assert all(isinstance(k, Knobs) for k in knobs)
    knobs = [k for k in knobs if isinstance(k, Knobs)]  # for mypy
    absorbed = knobs[0].absorbed
    # A destroyed or stalled sandbox must find the step still running.
    outcome = _run_with(flowdir, backend_env[EMULATOR_URL[BACKEND]], knobs, ok=absorbed, seconds=0 if absorbed else 30)
    for row, kn in zip(rows, knobs, strict=True):
        _was_injected(row, kn, outcome)
    run = outcome.run
    assert flowdir.live_sandboxes(FLOW) == [], "a faulted run left sandboxes behind"
    if absorbed:
        # The backend's own retries absorbed them: no attempt failed, no user code ran twice.
        assert run["successful"], run
        assert outcome.runs == {"start/0": 1, "work/0": 1}, outcome.runs
        (work,) = run["steps"]["work"]
        assert work["attempt"] == 0 and work["artifacts"]["total"] == 499500
        return
    # Without @retry the attempt fails the run: no user code ran twice or on a retry, and the
    # datastore holds whole tasks only (a DONE.lock exactly for the tasks the Client API finished).
    assert not run["successful"] and not run["finished"], run
    assert all(n == 1 and key.endswith("/0") for key, n in outcome.runs.items()), outcome.runs
    finished = {step for step, tasks in run["steps"].items() if any(t["successful"] for t in tasks)}
    assert outcome.done_steps == finished, (outcome.done_steps, finished)
    for step, tasks in run["steps"].items():
        for task in tasks:
            assert task["attempt"] == 0, task
            if not task["successful"]:
                assert not {"numbers", "total", "attempt"} & set(task["artifacts"]), (step, task["artifacts"])
