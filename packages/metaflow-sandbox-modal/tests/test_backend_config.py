"""Unit tests of the modal backend's configuration: registration, credentials, spec mapping, SDK loading.

Layer: tests (modal backend). Imports: pytest, the standard library, core and the modal backend.

No server is involved: every failure here must happen before any sandbox exists.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from metaflow_extensions.sandbox.core import ConfigurationError, Resources, SandboxSpec, get_backend
from metaflow_extensions.sandbox.core.provider import release, supported_range
from metaflow_extensions.sandbox.modal import ModalBackend
from metaflow_extensions.sandbox.modal.sdk import sdk_and_version

TOKEN = {"token_id": "ak-unit", "token_secret": "as-unit"}


def test_registered_under_modal():
    assert isinstance(get_backend("modal", **TOKEN), ModalBackend)


@pytest.mark.parametrize("missing", ["MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"])
def test_missing_token_names_the_variables(monkeypatch, missing):
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-x")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-x")
    monkeypatch.delenv(missing)
    with pytest.raises(ConfigurationError) as info:
        get_backend("modal")
    assert "export MODAL_TOKEN_ID=" in str(info.value) and "modal token new" in str(info.value)
    assert not info.value.transient


def test_token_from_the_environment(monkeypatch):
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-x")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-x")
    assert get_backend("modal").name == "modal"


def test_unknown_option_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="Unknown option 'cpu' for the 'modal' sandbox backend"):
        get_backend("modal", cpu=2, **TOKEN)


def test_spec_maps_to_modal_create_arguments(monkeypatch):
    monkeypatch.delenv("METAFLOW_SANDBOX_LEASE_S", raising=False)
    backend = get_backend("modal", **TOKEN)
    spec = SandboxSpec(resources=Resources(cpu=2, memory_mb=4096, gpu=2), env={"A": "1"}, network=False, lifetime_s=600)
    assert backend.create_kwargs(spec) == {
        "timeout": 600,
        "idle_timeout": 300,  # the lease, not the lifetime
        "block_network": True,
        "workdir": "/root",
        "env": {"A": "1"},
        "cpu": 2.0,
        "memory": 4096,
        "gpu": "A10G:2",
    }
    assert (
        get_backend("modal", gpu_type="A100", **TOKEN).create_kwargs(SandboxSpec(resources=Resources(gpu=1)))["gpu"]
        == "A100"
    )


def test_timeouts_are_capped_to_what_modal_accepts(monkeypatch):
    monkeypatch.setenv("METAFLOW_SANDBOX_LEASE_S", str(10**7))
    kwargs = get_backend("modal", **TOKEN).create_kwargs(SandboxSpec(lifetime_s=5 * 24 * 3600))
    assert (kwargs["timeout"], kwargs["idle_timeout"]) == (86400, 86400)
    assert "gpu" not in kwargs and "env" not in kwargs and kwargs["block_network"] is False


def test_installed_sdk_is_supported():
    assert supported_range("metaflow-sandbox-modal", "modal") == ">=1.5,<2"
    assert release(sdk_and_version()[1]) >= (1, 5)


def test_missing_sdk_names_the_install_command():
    script = textwrap.dedent("""
        import sys
        sys.modules["modal"] = None  # what an environment without the SDK looks like to `import modal`
        from metaflow_extensions.sandbox.core import ConfigurationError, get_backend
        try:
            get_backend("modal", token_id="a", token_secret="b")
        except ConfigurationError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "pip install 'modal>=1.5,<2'" in out
