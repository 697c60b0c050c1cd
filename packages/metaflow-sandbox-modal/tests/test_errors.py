"""Unit tests of how Modal SDK exceptions become core errors.

Layer: tests (modal backend). Imports: pytest, the ``modal`` SDK, core and the modal backend.

The exceptions are the SDK's own classes, so a change of SDK behaviour shows up here.
"""

from __future__ import annotations

import modal.exception as mx
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
from metaflow_extensions.sandbox.modal.errors import translate, translate_create, translate_download


def test_rejected_token_is_final_with_a_remedy():
    err = translate(mx.AuthError("Token missing or invalid"), "creating")
    assert isinstance(err, AuthenticationError) and not err.transient
    assert "MODAL_TOKEN_ID" in (err.remedy or "")


def test_image_failures_at_create_are_image_errors():
    err = translate_create(mx.RemoteError("Image build failed: no such image"), "nope:latest")
    assert isinstance(err, ImageError) and "nope:latest" in str(err)


def test_refused_settings_at_create_are_configuration_errors():
    assert isinstance(translate_create(mx.InvalidError("timeout too large"), "debian_slim"), ConfigurationError)


def test_exhausted_resources_are_a_quota_at_create_and_transient_elsewhere():
    assert isinstance(translate_create(mx.ResourceExhaustedError("too many sandboxes"), "x"), QuotaExceeded)
    assert isinstance(translate(mx.ResourceExhaustedError("slow down"), "listing"), TransientError)


@pytest.mark.parametrize("cls", [mx.ConnectionError, mx.ServiceError, mx.InternalError])
def test_unreachable_or_busy_api_is_transient(cls):
    assert translate(cls("down"), "listing").transient


@pytest.mark.parametrize("cls", [mx.NotFoundError, mx.SandboxTerminatedError, mx.SandboxTimeoutError])
def test_a_missing_sandbox_is_unavailable(cls):
    err = translate(cls("gone"), "running", sandbox_id="sb-1")
    assert isinstance(err, SandboxUnavailable) and err.sandbox_id == "sb-1"


def test_missing_file_on_download():
    err = translate_download(mx.SandboxFilesystemNotFoundError("no such file"), "/root/x", "sb-1")
    assert isinstance(err, SandboxFileNotFound)


def test_other_errors_are_final_and_keep_the_message():
    err = translate(mx.Error("disk on fire"), "uploading")
    assert type(err) is SandboxError and not err.transient and "disk on fire" in str(err)
