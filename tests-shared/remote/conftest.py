"""Fixtures of the remote-datastore suite: the e2e fixtures (backend, flow directory) plus real peers
per worker — S3 (``moto_server``) and the metadata service (``metaflow-local-service``) — and an S3
datastore prefix per test.

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
from sandbox_testing.metadata_service import MetadataService, start_metadata_service
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


@pytest.fixture(scope="session")
def metadata_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetadataService]:
    with start_metadata_service(tmp_path_factory.mktemp("metadata-service")) as service:
        yield service


@pytest.fixture
def remote_flows(flowdir: FlowDir) -> FlowDir:
    """``flowdir`` with the remote flows (local datastore until a test says otherwise)."""
    for path in FLOWS.glob("*.py"):
        shutil.copy(path, flowdir.path / path.name)
    return flowdir


@pytest.fixture
def s3dir(remote_flows: FlowDir, s3: S3Server) -> FlowDir:
    """The remote flows, running on S3 under a prefix of their own."""
    remote_flows.env.update(s3.env(prefix=remote_flows.path.name))
    return remote_flows
