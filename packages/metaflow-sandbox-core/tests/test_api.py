"""Specs validate early, retries back off and give up, streamed text becomes lines.

Layer: core tests. Imports: pytest and core.
"""

from __future__ import annotations

import pytest

from metaflow_extensions.sandbox.core import (
    ConfigurationError,
    Resources,
    SandboxError,
    SandboxSpec,
    TransientError,
)
from metaflow_extensions.sandbox.core.backend import ByteDecoder, LineSplitter
from metaflow_extensions.sandbox.core.retry import with_retries


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"env": {"A": 1}}, "SandboxSpec.env"),
        ({"labels": {"a": None}}, "SandboxSpec.labels"),
        ({"lifetime_s": 0}, "lifetime_s"),
    ],
)
def test_bad_spec_names_the_parameter(kwargs, names):
    with pytest.raises(ConfigurationError, match=names.replace(".", r"\.")):
        SandboxSpec(**kwargs)


@pytest.mark.parametrize("value", [-1, "2", True])
def test_bad_resources_name_the_field(value):
    with pytest.raises(ConfigurationError, match=r"Resources\.cpu"):
        Resources(cpu=value)


def test_spec_is_immutable():
    spec = SandboxSpec(env={"A": "1"})
    with pytest.raises(TypeError):
        spec.env["B"] = "2"  # type: ignore[index]


def test_error_message_carries_the_remedy():
    err = SandboxError("No key.", remedy="export X=...")
    assert str(err) == "No key. export X=..." and not err.transient
    assert TransientError("busy").transient


def test_retries_transient_then_succeeds():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise TransientError("429")
        return "ok"

    assert with_retries(flaky, attempts=5, base_s=1, cap_s=4, sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2
    assert 0 <= sleeps[0] <= 1 and 0 <= sleeps[1] <= 2


def test_retries_are_bounded_and_final_errors_pass_at_once():
    calls = []

    def always(exc):
        calls.append(1)
        raise exc

    with pytest.raises(TransientError):
        with_retries(lambda: always(TransientError("503")), attempts=4, sleep=lambda _: None)
    assert len(calls) == 4
    calls.clear()
    with pytest.raises(SandboxError):
        with_retries(lambda: always(SandboxError("bad image")), attempts=4, sleep=lambda _: None)
    assert len(calls) == 1


def test_line_splitter_across_chunks():
    lines = []
    split = LineSplitter(lines.append)
    for chunk in ["he", "llo\nwor", "ld\n\nlast"]:
        split.feed(chunk)
    assert split.close() == "hello\nworld\n\nlast"
    assert lines == ["hello", "world", "", "last"]


def test_byte_decoder_keeps_split_utf8_characters():
    parts = []
    decoder = ByteDecoder(parts.append)
    data = "é✓".encode()
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
    decoder.close()
    assert "".join(parts) == "é✓"


def test_cancellable_is_public_and_a_flag_file_kills_the_command(tmp_path):
    # Third-party backends whose SDK cannot kill a process group wrap commands with it (Modal does).
    import subprocess

    from metaflow_extensions.sandbox import core

    assert "cancellable" in core.__all__
    proc = subprocess.Popen(
        ["bash", "-c", core.cancellable("echo started; sleep 600", "stop")], cwd=tmp_path, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
    (tmp_path / "stop").touch()
    assert proc.wait(timeout=60) == 128 + 9
    assert not (tmp_path / "stop").exists(), "the flag is removed with the command"
    proc.stdout.close()
