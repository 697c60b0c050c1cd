"""Fixtures of the e2e suite: which backend the flows run on, and a flow directory to run them in.

Layer: tests-shared/e2e. Imports: pytest, the standard library, ``sandbox_testing``.

The backend comes from ``MFSBX_E2E_BACKEND`` (default ``local``) and is chosen in ONE place,
``BACKENDS`` below: an entry is a context manager that prepares the backend for the whole session
(e.g. starts its wire emulator) and yields the environment variables the flows need. Provider
backends hook in by adding their entry; nothing else in the suite names a backend.

Flows run as ``python flow.py ... run`` subprocesses with the interpreter running pytest (the
nox session installs the built wheels there), each test in its own directory, so every test has
its own local datastore and its own sandboxes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox_testing.flows import FlowDir

HERE = Path(__file__).resolve().parent
FLOWS = HERE / "flows"
BACKEND = os.environ.get("MFSBX_E2E_BACKEND", "local")


@contextlib.contextmanager
def _local() -> Iterator[dict[str, str]]:
    yield {}


@contextlib.contextmanager
def _e2b() -> Iterator[dict[str, str]]:
    from sandbox_testing.e2b import E2B_E2E_LIFETIME_S, emulator_env, start_emulator

    with start_emulator("e2b", "--max-lifetime", str(E2B_E2E_LIFETIME_S)) as url:
        # E2B's 300 s default lifetime scaled down (a step that outlives it proves sandboxes are
        # kept alive); checks every 2 s, so a stalled stream is reported within seconds.
        yield {**emulator_env(url), "METAFLOW_SANDBOX_E2B_CHECK_INTERVAL_S": "2"}


@contextlib.contextmanager
def _daytona() -> Iterator[dict[str, str]]:
    from sandbox_testing.daytona import emulator_env, emulator_state, start_emulator

    with start_emulator("daytona") as url:
        yield {**emulator_env(url), "MFSBX_DAYTONA_EMULATOR": url}
        state = emulator_state(url)
        assert state["live"] == 0, f"the e2e flows left Daytona sandboxes behind: {state}"


@contextlib.contextmanager
def _modal() -> Iterator[dict[str, str]]:
    from sandbox_testing.modal import emulator_env, emulator_state, start_emulator

    with start_emulator("modal") as url:
        yield emulator_env(url)
        state = emulator_state(url)
        assert state["live"] == 0, f"the e2e flows left Modal sandboxes behind: {state}"


# backend name -> session setup yielding the environment flows need (emulator URLs, keys...).
BACKENDS: dict[str, Callable[[], contextlib.AbstractContextManager[dict[str, str]]]] = {
    "local": _local,
    "e2b": _e2b,
    "daytona": _daytona,
    "modal": _modal,
}


@pytest.fixture(scope="session")
def backend_name() -> str:
    """The backend every flow runs on (the only place it is chosen)."""
    return BACKEND


@pytest.fixture(scope="session")
def backend_env() -> Iterator[dict[str, str]]:
    if BACKEND not in BACKENDS:
        pytest.fail(f"MFSBX_E2E_BACKEND={BACKEND!r} has no entry in BACKENDS (e2e/conftest.py): {sorted(BACKENDS)}")
    with BACKENDS[BACKEND]() as env:
        yield {"METAFLOW_SANDBOX_BACKEND": BACKEND, **env}


@pytest.fixture
def flowdir(tmp_path: Path, backend_env: dict[str, str], request: pytest.FixtureRequest) -> Iterator[FlowDir]:
    for path in [*FLOWS.glob("*.py"), HERE / "inspect_run.py"]:
        shutil.copy(path, tmp_path / path.name)
    sandbox_root = tmp_path / "sandboxes"
    env = {
        **os.environ,
        "USERNAME": "e2e",
        "METAFLOW_SANDBOX_LOCAL_ROOT": str(sandbox_root),
        **backend_env,
    }
    env.pop("METAFLOW_PROFILE", None)
    fd = FlowDir(tmp_path, env, BACKEND, sandbox_root)
    yield fd
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print("\n\n".join(fd.outputs))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
