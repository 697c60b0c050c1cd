"""The backend's construction (validated before any sandbox exists) and its spec mapping onto the
SDK's own parameter classes.

Layer: tests of metaflow-sandbox-daytona. Imports: pytest, core, the backend.
"""

from __future__ import annotations

import sys

import pytest

from metaflow_extensions.sandbox.core import (
    OWNER_LABEL,
    ConfigurationError,
    Resources,
    SandboxSpec,
    available_backends,
    get_backend,
)
from metaflow_extensions.sandbox.daytona import DaytonaBackend
from metaflow_extensions.sandbox.daytona.backend import TOKEN_LABEL


@pytest.fixture
def backend(monkeypatch) -> DaytonaBackend:
    monkeypatch.setenv("DAYTONA_API_KEY", "k")
    return get_backend("daytona", api_url="http://127.0.0.1:9/api")  # never contacted here


def test_registered_through_the_entry_point():
    assert "daytona" in available_backends()


def test_missing_key_fails_at_construction_with_the_fix(monkeypatch):
    monkeypatch.delenv("DAYTONA_API_KEY", raising=False)
    monkeypatch.delenv("DAYTONA_JWT_TOKEN", raising=False)
    with pytest.raises(ConfigurationError, match="export DAYTONA_API_KEY=") as info:
        get_backend("daytona")
    assert "https://app.daytona.io/dashboard/keys" in str(info.value)


def test_environment_is_read(monkeypatch):
    monkeypatch.setenv("DAYTONA_API_KEY", "k")
    monkeypatch.setenv("DAYTONA_API_URL", "http://example.invalid/api")
    monkeypatch.setenv("DAYTONA_TARGET", "eu")
    backend = get_backend("daytona")
    assert (backend.api_url, backend.target) == ("http://example.invalid/api", "eu")


def test_bad_option_is_a_configuration_error(monkeypatch):
    monkeypatch.setenv("DAYTONA_API_KEY", "k")
    with pytest.raises(ConfigurationError):
        get_backend("daytona", create_timeout_s=0)
    with pytest.raises(ConfigurationError):
        get_backend("daytona", region="nowhere")


@pytest.mark.parametrize(("mb", "gib"), [(1, 1), (1024, 1), (1025, 2), (1500, 2), (4096, 4), (16000, 16)])
def test_memory_and_disk_round_up_to_whole_gib(backend, mb, gib):
    params = backend.params(SandboxSpec(image="python:3.11", resources=Resources(memory_mb=mb, disk_mb=mb)), "t")
    assert (params.resources.memory, params.resources.disk) == (gib, gib)


def test_cpu_rounds_up_to_whole_vcpus(backend):
    params = backend.params(SandboxSpec(image="python:3.11", resources=Resources(cpu=0.5, gpu=1)), "t")
    assert (params.resources.cpu, params.resources.gpu) == (1, 1)


def test_image_snapshot_env_labels_network_and_lifetime(backend):
    spec = SandboxSpec(env={"A": "1"}, labels={"flow": "F"}, lifetime_s=3601, network=False)
    params = backend.params(spec, "tok")
    assert type(params).__name__ == "CreateSandboxFromSnapshotParams" and params.snapshot is None
    assert params.env_vars == {"A": "1"} and params.network_block_all is True
    assert params.labels == {"flow": "F", OWNER_LABEL[0]: OWNER_LABEL[1], TOKEN_LABEL: "tok"}
    # Auto-stop after the lease (default 300 s, not the whole lifetime) of inactivity, in whole
    # minutes, then delete at once: an orphan dies within minutes.
    assert (params.auto_stop_interval, params.auto_delete_interval) == (5, 0)
    image = backend.params(SandboxSpec(image="python:3.11"), "t")
    assert type(image).__name__ == "CreateSandboxFromImageParams" and image.image == "python:3.11"


def test_the_lease_comes_from_the_environment_and_is_checked(monkeypatch):
    monkeypatch.setenv("DAYTONA_API_KEY", "k")
    monkeypatch.setenv("METAFLOW_SANDBOX_LEASE_S", "90")
    params = get_backend("daytona").params(SandboxSpec(lifetime_s=3601), "t")
    assert params.auto_stop_interval == 2
    monkeypatch.setenv("METAFLOW_SANDBOX_LEASE_S", "soon")
    with pytest.raises(ConfigurationError, match="METAFLOW_SANDBOX_LEASE_S"):
        get_backend("daytona")


def test_snapshot_option_and_resources_warning(monkeypatch):
    monkeypatch.setenv("DAYTONA_API_KEY", "k")
    backend = get_backend("daytona", snapshot="my-snap")
    assert backend.params(SandboxSpec(), "t").snapshot == "my-snap"
    with pytest.warns(UserWarning, match="snapshot"):
        backend.params(SandboxSpec(resources=Resources(cpu=4)), "t")


def test_missing_sdk_names_the_install_command(monkeypatch):
    # As if neither `daytona` nor its alias `daytona-sdk` were installed.
    monkeypatch.setitem(sys.modules, "daytona", None)
    monkeypatch.setitem(sys.modules, "daytona_sdk", None)
    monkeypatch.setenv("DAYTONA_API_KEY", "k")
    # The SDK's own distribution and the range this package declares, not this package again.
    with pytest.raises(ConfigurationError, match="the `daytona` distribution") as info:
        get_backend("daytona")
    assert "pip install 'daytona>=0.150,<1'" in str(info.value)
    assert "metaflow-sandbox-daytona" not in str(info.value)
