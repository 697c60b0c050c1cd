"""Fixtures of the remote-datastore suite: the e2e fixtures (backend, flow directory) plus a real
S3 peer (``moto_server``) per worker and an S3 datastore prefix per test.

Layer: tests-shared/remote. Imports: pytest, the standard library, ``sandbox_testing``, the e2e
fixtures (``e2e.conftest``: one place chooses the backend for both suites).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import e2e.conftest as e2e_fixtures
from sandbox_testing.flows import FlowDir
from sandbox_testing.moto import S3Server, start_moto

FLOWS = Path(__file__).resolve().parent / "flows"
# The e2e suite's fixtures and report hook, shared (pytest finds them by these names).
backend_name = e2e_fixtures.backend_name
backend_env = e2e_fixtures.backend_env
flowdir = e2e_fixtures.flowdir
pytest_runtest_makereport = e2e_fixtures.pytest_runtest_makereport


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    with start_moto() as server:
        yield server


@pytest.fixture
def s3dir(flowdir: FlowDir, s3: S3Server) -> FlowDir:
    """``flowdir`` with the remote flows, running on S3 under a prefix of its own."""
    for path in FLOWS.glob("*.py"):
        shutil.copy(path, flowdir.path / path.name)
    flowdir.env.update(s3.env(prefix=flowdir.path.name))
    return flowdir
