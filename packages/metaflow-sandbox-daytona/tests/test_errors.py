"""Provider exceptions (the SDK's own classes, as it raises them) become core errors.

Layer: tests of metaflow-sandbox-daytona. Imports: pytest, httpx (an SDK dependency), the SDK, core
and the backend's ``errors`` module.
"""

from __future__ import annotations

import httpx
import pytest

from metaflow_extensions.sandbox.core import (
    AuthenticationError,
    ImageError,
    QuotaExceeded,
    SandboxError,
    SandboxFileNotFound,
    TransientError,
)
from metaflow_extensions.sandbox.daytona.errors import TABLE, call, download_error, translate
from metaflow_extensions.sandbox.daytona.sdk import load_sdk
from sandbox_testing.exceptions import raised_from

SDK, _ = load_sdk()
DaytonaError = SDK.DaytonaError


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_rate_limits_and_server_errors_are_transient(status):
    assert isinstance(translate(DaytonaError("busy", status_code=status), "create"), TransientError)


def test_connection_failures_are_transient():
    err = raised_from(DaytonaError("Failed to create sandbox"), httpx.ConnectError("Connection refused"))
    assert isinstance(translate(err, "create"), TransientError)
    assert isinstance(translate(ConnectionResetError("reset by peer"), "list"), TransientError)


def test_status_only_in_the_message_of_older_sdks():
    assert TABLE.status_of(DaytonaError("Failed: (503)\nReason: Service Unavailable")) == 503
    assert TABLE.status_of(DaytonaError("Server error '502 Bad Gateway' for url 'http://x'")) == 502
    assert TABLE.status_of(DaytonaError("Total CPU quota exceeded. Maximum allowed: 400")) is None


def test_rejected_key_is_final_and_says_what_to_do():
    err = translate(DaytonaError("Invalid credentials", status_code=401), "create")
    assert isinstance(err, AuthenticationError) and not err.transient
    assert "DAYTONA_API_KEY" in str(err) and "app.daytona.io" in str(err)


def test_quota_is_final_with_a_remedy():
    err = translate(DaytonaError("Total CPU quota exceeded. Maximum allowed: 10", status_code=403), "create")
    assert isinstance(err, QuotaExceeded) and not err.transient and "sandbox kill" in str(err)


@pytest.mark.parametrize(
    ("status", "message"),
    [(404, "Snapshot foo not found"), (400, "Failed to pull image missing:1: manifest unknown")],
)
def test_bad_image_or_snapshot_at_create_is_an_image_error(status, message):
    err = translate(DaytonaError(message, status_code=status), "create")
    assert isinstance(err, ImageError) and err.remedy and message in str(err)


def test_other_errors_keep_the_provider_message():
    err = translate(DaytonaError("something odd", status_code=400), "upload")
    assert type(err) is SandboxError and "something odd" in str(err)


def test_missing_file_versus_missing_sandbox():
    assert isinstance(download_error(DaytonaError("file not found: /x"), "/x", "sb"), SandboxFileNotFound)
    daemon_json = DaytonaError('Failed to download file: {"message": "...", "code": "FILE_NOT_FOUND"}')
    assert isinstance(download_error(daemon_json, "/x", "sb"), SandboxFileNotFound)
    gone = DaytonaError("Sandbox sb not found", status_code=404)
    assert not isinstance(download_error(gone, "/x", "sb"), SandboxFileNotFound)


def test_call_retries_transient_failures_only():
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise DaytonaError("busy", status_code=503)
        return "ok"

    assert call("list", flaky) == "ok" and len(attempts) == 3

    def final() -> None:
        attempts.append(1)
        raise DaytonaError("bad", status_code=400)

    attempts.clear()
    with pytest.raises(SandboxError):
        call("list", final)
    assert len(attempts) == 1


def test_a_rate_limit_message_is_not_a_quota():
    err = translate(DaytonaError("Rate limit exceeded, retry later", status_code=429), "create")
    assert isinstance(err, TransientError)


def test_a_create_timeout_is_final_with_a_remedy():
    err = translate(SDK.DaytonaTimeoutError("Sandbox creation timed out after 60 seconds"), "create")
    assert not err.transient and "create_timeout_s" in str(err)
    assert isinstance(translate(SDK.DaytonaTimeoutError("timed out"), "list"), TransientError)
