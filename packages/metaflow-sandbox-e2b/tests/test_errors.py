"""Unit tests of how E2B SDK exceptions become core errors, and of exit statuses.

Layer: tests (e2b backend). Imports: pytest, the ``e2b`` SDK, core and the e2b backend.

The exceptions are the SDK's own classes, built the way the SDK builds them (e.g. REST errors carry
a ``"<status>: "`` message prefix), so a change of SDK behaviour shows up here.
"""

from __future__ import annotations

import e2b
import e2b.exceptions
import pytest

from metaflow_extensions.sandbox.core import (
    AuthenticationError,
    ConfigurationError,
    ImageError,
    QuotaExceeded,
    SandboxError,
    SandboxFileNotFound,
    SandboxUnavailable,
    TransientError,
)
from metaflow_extensions.sandbox.e2b.commands import exit_status
from metaflow_extensions.sandbox.e2b.errors import translate, translate_create, translate_download


def test_rejected_key_is_final_with_a_remedy():
    err = translate(e2b.AuthenticationException("401: Unauthorized, please check your credentials."), "creating")
    assert isinstance(err, AuthenticationError) and not err.transient
    assert "E2B_API_KEY" in (err.remedy or "")


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_rest_overload_statuses_are_transient(status):
    assert translate(e2b.SandboxException(f"{status}: try later"), "listing").transient


def test_rate_limit_class_is_transient():
    assert isinstance(translate(e2b.exceptions.RateLimitException("429: slow down"), "creating"), TransientError)


def test_concurrency_limit_is_a_quota():
    error = e2b.exceptions.RateLimitException("429: You have reached the maximum number of concurrent sandboxes")
    assert isinstance(translate(error, "creating"), QuotaExceeded)


def test_connection_failures_are_transient_on_the_api_and_unavailable_in_a_sandbox():
    assert isinstance(translate(ConnectionRefusedError("refused"), "listing"), TransientError)
    err = translate(ConnectionResetError("reset"), "running", sandbox_id="i1", envd=True)
    assert isinstance(err, SandboxUnavailable) and err.sandbox_id == "i1"


def test_envd_502_means_the_sandbox_is_gone():
    err = translate(e2b.SandboxException("502: The sandbox was not found"), "uploading", sandbox_id="i1", envd=True)
    assert isinstance(err, SandboxUnavailable)


def test_envd_timeout_means_the_sandbox_stopped_answering():
    err = translate(e2b.TimeoutException("sandbox timeout"), "reading", sandbox_id="i1", envd=True)
    assert isinstance(err, SandboxUnavailable)


def test_other_errors_are_final_and_keep_the_message():
    err = translate(e2b.SandboxException("500: disk on fire"), "uploading")
    assert type(err) is SandboxError and not err.transient and "disk on fire" in str(err)


def test_core_errors_pass_through():
    original = ConfigurationError("x")
    assert translate(original, "anything") is original


def test_missing_template_is_an_image_error():
    err = translate_create(e2b.SandboxException("404: template 'nope' not found"), "nope")
    assert isinstance(err, ImageError) and "nope" in str(err) and "e2b template" in (err.remedy or "")


def test_bad_create_values_are_configuration_errors():
    err = translate_create(e2b.SandboxException("400: Timeout cannot be greater than 1 hours"), "base")
    assert isinstance(err, ConfigurationError)


def test_missing_file_on_download():
    err = translate_download(e2b.NotFoundException("path '/home/user/x' does not exist"), "/home/user/x", "i1")
    assert isinstance(err, SandboxFileNotFound)


@pytest.mark.parametrize(
    ("code", "error", "expected"),
    [
        (0, None, 0),
        (3, "exit status 3", 3),
        (-1, "signal: killed", 137),
        (-1, "signal: terminated", 143),
        (-1, "signal: segmentation fault", 139),
        (-1, "something else", 255),
        (None, None, 255),
    ],
)
def test_exit_status_is_shell_style(code, error, expected):
    assert exit_status(code, error) == expected
