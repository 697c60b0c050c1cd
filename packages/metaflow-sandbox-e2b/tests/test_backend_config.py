"""Unit tests of the e2b backend's configuration: registration, credentials, spec checks, SDK loading.

Layer: tests (e2b backend). Imports: pytest, the standard library, core and the e2b backend.

No server is involved: every failure here must happen before any sandbox exists.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest

from metaflow_extensions.sandbox.core import (
    ConfigurationError,
    Resources,
    SandboxSpec,
    TransientError,
    get_backend,
)
from metaflow_extensions.sandbox.core.provider import release, supported_range
from metaflow_extensions.sandbox.e2b import E2BBackend, E2BResourceWarning
from metaflow_extensions.sandbox.e2b.sdk import sdk_and_version

KEY = "e2b_" + "0" * 40
# Nothing listens here: a call that reaches the network fails fast with "connection refused".
NOWHERE = "http://127.0.0.1:9"


def test_registered_under_e2b():
    assert isinstance(get_backend("e2b", api_key=KEY), E2BBackend)


def test_missing_key_names_the_variable_and_where_to_get_one(monkeypatch):
    monkeypatch.delenv("E2B_API_KEY", raising=False)
    with pytest.raises(ConfigurationError) as info:
        get_backend("e2b")
    assert "export E2B_API_KEY=" in str(info.value) and "https://e2b.dev/dashboard" in str(info.value)
    assert not info.value.transient


def test_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("E2B_API_KEY", KEY)
    assert get_backend("e2b").name == "e2b"


def test_unknown_option_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="Unknown option 'cpu' for the 'e2b' sandbox backend"):
        get_backend("e2b", api_key=KEY, cpu=2)


@pytest.mark.parametrize("option", ["check_interval_s", "request_timeout_s", "max_timeout_s"])
def test_intervals_must_be_positive(option):
    with pytest.raises(ConfigurationError, match=option):
        get_backend("e2b", api_key=KEY, **{option: 0})


def test_gpu_is_refused_before_any_request():
    backend = get_backend("e2b", api_key=KEY, api_url=NOWHERE, sandbox_url=NOWHERE)
    with pytest.raises(ConfigurationError, match="no GPUs"):
        backend.create(SandboxSpec(resources=Resources(gpu=1)))


def test_cpu_and_memory_warn_that_the_template_decides():
    backend = get_backend("e2b", api_key=KEY, api_url=NOWHERE, sandbox_url=NOWHERE)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(TransientError, match="cannot be reached"):
            backend.create(SandboxSpec(image="my-template", resources=Resources(cpu=8, memory_mb=4096)))
    messages = [str(w.message) for w in seen if issubclass(w.category, E2BResourceWarning)]
    assert len(messages) == 1
    assert "cpu=8, memory_mb=4096" in messages[0] and "'my-template'" in messages[0]
    assert "e2b template build" in messages[0]


def test_unreachable_api_is_transient_after_bounded_retries():
    backend = get_backend("e2b", api_key=KEY, api_url=NOWHERE, sandbox_url=NOWHERE)
    with pytest.raises(TransientError):
        backend.list(labels={"a": "b"})


def test_installed_sdk_is_supported():
    # The range is the one the distribution declares, read from its installed metadata.
    assert supported_range("metaflow-sandbox-e2b", "e2b") == ">=2.7,<3"
    assert release(sdk_and_version()[1]) >= (2, 7)


def test_missing_sdk_names_the_install_command():
    script = textwrap.dedent("""
        import sys
        sys.modules["e2b"] = None  # what an environment without the SDK looks like to `import e2b`
        from metaflow_extensions.sandbox.core import ConfigurationError, get_backend
        try:
            get_backend("e2b", api_key="k")
        except ConfigurationError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "pip install 'e2b>=2.7,<3'" in out


def test_check_interval_and_template_from_the_environment(monkeypatch):
    monkeypatch.setenv("METAFLOW_SANDBOX_E2B_CHECK_INTERVAL_S", "2.5")
    monkeypatch.setenv("METAFLOW_SANDBOX_E2B_TEMPLATE", "team-template")
    backend = get_backend("e2b", api_key=KEY)
    assert (backend.check_interval_s, backend.template) == (2.5, "team-template")
    monkeypatch.setenv("METAFLOW_SANDBOX_E2B_CHECK_INTERVAL_S", "soon")
    with pytest.raises(ConfigurationError, match="METAFLOW_SANDBOX_E2B_CHECK_INTERVAL_S"):
        get_backend("e2b", api_key=KEY)


def test_sandbox_timeout_is_the_lease_not_the_lifetime(monkeypatch):
    monkeypatch.delenv("METAFLOW_SANDBOX_LEASE_S", raising=False)
    backend = get_backend("e2b", api_key=KEY)
    assert backend.sandbox_timeout(SandboxSpec(lifetime_s=5 * 24 * 3600)) == 300
    assert backend.sandbox_timeout(SandboxSpec(lifetime_s=120)) == 120


def test_sandbox_timeout_is_capped_to_what_every_plan_accepts(monkeypatch):
    monkeypatch.setenv("METAFLOW_SANDBOX_LEASE_S", str(10**7))
    backend = get_backend("e2b", api_key=KEY)
    assert backend.sandbox_timeout(SandboxSpec(lifetime_s=5 * 24 * 3600)) == 3600
    assert backend.sandbox_timeout(SandboxSpec(lifetime_s=120)) == 120
    assert get_backend("e2b", api_key=KEY, max_timeout_s=86400).sandbox_timeout(SandboxSpec(lifetime_s=10**6)) == 86400


def test_numeric_options_may_be_strings():
    backend = get_backend("e2b", api_key=KEY, check_interval_s="5", request_timeout_s="20", max_timeout_s="600")
    assert (backend.check_interval_s, backend.request_timeout_s, backend.max_timeout_s) == (5.0, 20.0, 600)
    with pytest.raises(ConfigurationError, match="check_interval_s"):
        get_backend("e2b", api_key=KEY, check_interval_s="often")
