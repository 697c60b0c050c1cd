"""The provider kit: a declared error table, statuses and transports, the SDK range read from a
distribution's own metadata, and retrying a create with a reconcile hook.

Layer: tests of metaflow-sandbox-core. Imports: pytest, the standard library and core.
"""

from __future__ import annotations

import re
import sys

import pytest

from metaflow_extensions.sandbox.core import (
    AuthenticationError,
    ConfigurationError,
    QuotaExceeded,
    SandboxError,
    TransientError,
)
from metaflow_extensions.sandbox.core.provider import (
    ErrorRule,
    ErrorTable,
    SdkSpec,
    Transport,
    in_workdir,
    load_sdk,
    status_of,
    supported_range,
)
from metaflow_extensions.sandbox.core.retry import create_with_reconcile
from sandbox_testing.exceptions import raised_from


class ProviderError(Exception):
    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


class ProviderTimeout(ProviderError):
    pass


TABLE = ErrorTable(
    provider="Acme",
    transport=Transport(names=("Timeout",), texts=("connection refused",)),
    status_patterns=(re.compile(r"\((\d{3})\)"),),
    rules=(
        ErrorRule(AuthenticationError, statuses=(401,), remedy="export ACME_KEY=..."),
        ErrorRule(TransientError, statuses=(429, *range(500, 600))),
        ErrorRule(TransientError, transport=True),
        ErrorRule(QuotaExceeded, texts=("quota",), contexts=("create",), remedy="delete some"),
    ),
)


def test_first_matching_row_decides_the_class_and_whether_it_is_transient():
    auth = TABLE.translate(ProviderError("no", 401), "create")
    assert isinstance(auth, AuthenticationError) and not auth.transient and "ACME_KEY" in str(auth)
    assert TABLE.translate(ProviderError("busy", 503), "list").transient
    assert TABLE.translate(ProviderTimeout("slow"), "list").transient
    assert TABLE.translate(ConnectionRefusedError("x"), "list").transient


def test_contexts_and_texts_narrow_a_row_and_no_match_keeps_the_message():
    assert isinstance(TABLE.translate(ProviderError("quota exceeded", 403), "create", context="create"), QuotaExceeded)
    other = TABLE.translate(ProviderError("quota exceeded", 403), "upload")
    assert type(other) is SandboxError and "Acme: upload failed: quota exceeded" in str(other)


def test_status_along_the_cause_chain_or_only_in_the_text():
    assert status_of(raised_from(ProviderError("outer"), ProviderError("inner", 502))) == 502
    assert TABLE.status_of(ProviderError("Failed (503)")) == 503
    # A status answer is not a transport failure, even with a "Timeout" class name.
    assert TABLE.match(ProviderTimeout("x", 404)) is None


def test_core_errors_pass_through_and_a_row_needs_a_criterion():
    original = ConfigurationError("x")
    assert TABLE.translate(original, "anything") is original
    with pytest.raises(TypeError):
        ErrorRule(TransientError)


def test_create_with_reconcile_adopts_what_a_lost_answer_made_instead_of_creating_twice():
    made: list[str] = []

    def create() -> str:
        made.append("sbx")  # the provider made it, but the answer is lost
        raise TransientError("connection reset")

    assert create_with_reconcile(create, lambda: made[0] if made else None, sleep=lambda _: None) == "sbx"
    assert made == ["sbx"]


def test_create_with_reconcile_retries_when_nothing_was_made_then_gives_up():
    calls: list[int] = []

    def create() -> str:
        calls.append(1)
        raise TransientError("503")

    with pytest.raises(TransientError):
        create_with_reconcile(create, lambda: None, attempts=3, sleep=lambda _: None)
    assert len(calls) == 3

    def final() -> str:
        calls.append(1)
        raise SandboxError("bad request")

    calls.clear()
    with pytest.raises(SandboxError):
        create_with_reconcile(final, lambda: None, sleep=lambda _: None)
    assert len(calls) == 1


@pytest.fixture
def fake_backend_dist(tmp_path, monkeypatch):
    """An installed distribution declaring ``pytest<1``: no pytest release satisfies it."""
    info = tmp_path / "fake_backend-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fake-backend\nVersion: 1.0\nRequires-Dist: pytest<1\n"
        "Requires-Dist: other>=2 ; extra == 'x'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "fake-backend"


def test_the_supported_range_comes_from_the_distribution_metadata(fake_backend_dist):
    assert supported_range(fake_backend_dist, "pytest") == "<1"
    assert supported_range(fake_backend_dist, "absent") == ""


def test_an_sdk_outside_the_declared_range_is_refused_naming_the_range(fake_backend_dist):
    spec = SdkSpec(backend="fake", dist=fake_backend_dist, modules={"pytest": "pytest"}, title="Pytest SDK")
    with pytest.raises(ConfigurationError, match=r"supports pytest<1; pytest \d") as info:
        load_sdk(spec)
    assert "pip install 'pytest<1'" in str(info.value)


def test_a_missing_sdk_names_its_own_distribution_not_the_backend(fake_backend_dist, monkeypatch):
    monkeypatch.setitem(sys.modules, "pytest_alias_absent", None)
    spec = SdkSpec(
        backend="fake", dist=fake_backend_dist, modules={"no_such_sdk_mod": "pytest", "pytest_alias_absent": "x"},
        title="Pytest SDK",
    )  # fmt: skip
    with pytest.raises(ConfigurationError, match="needs the Pytest SDK \\(the `pytest` distribution\\)") as info:
        load_sdk(spec)
    assert "pip install 'pytest<1'" in str(info.value) and "fake-backend" not in str(info.value)


def test_relative_paths_are_under_the_working_directory():
    assert in_workdir("in.tar", "/home/user") == in_workdir("in.tar", "/home/user/") == "/home/user/in.tar"
    assert in_workdir("/tmp/x", "/home/user") == "/tmp/x"
    assert in_workdir("a/b", "/") == "/a/b"
