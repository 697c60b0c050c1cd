"""The backend conformance suite: what every ``SandboxBackend`` must do, the same way, as pytest
tests a backend's own test file inherits.

Layer: core (test support, shipped so that third-party backends can use it). Imports: pytest
(``pip install metaflow-sandbox-core[testing]``), the standard library and the core API. No other
core module imports it; pytest loads it as a plugin (entry point ``pytest11``) so its asserts
explain their failures.

A backend passes by subclassing ``BackendConformance`` with a ``backend`` fixture, e.g.::

    import pytest
    from metaflow_extensions.sandbox.core import get_backend
    from metaflow_extensions.sandbox.core.conformance import BackendConformance


    class TestMyBackend(BackendConformance):
        @pytest.fixture
        def backend(self):
            return get_backend("mine", region="test")

Set ``image`` on the subclass when the backend needs one. Tests talk only to the public core API.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from . import (
    OWNER_LABEL,
    CommandTimeout,
    ConfigurationError,
    Sandbox,
    SandboxBackend,
    SandboxFileNotFound,
    SandboxSpec,
    SandboxUnavailable,
)

LEAK_VAR = "MFSBX_CONFORMANCE_LAUNCHER_SECRET"
# Counts processes whose command line matches a pattern, without needing ps in the image.
COUNT_PROCS = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c '{}'"


def _unique_sleeps() -> tuple[str, str]:
    """Two ``sleep`` commands no other test (or other run on this machine) starts, and a pattern
    matching only them: a backend without a pid namespace sees every process of the host."""
    n = uuid.uuid4().int % 10**6
    return f"sleep 271{n:06d} & sleep 272{n:06d}", f"sleep 27[12]{n:06d}"


class BackendConformance:
    image: str | None = None

    @pytest.fixture
    def backend(self) -> SandboxBackend:
        raise NotImplementedError("A conformance subclass provides the `backend` fixture.")

    @pytest.fixture
    def labels(self) -> dict[str, str]:
        return {"suite": "conformance", "case": uuid.uuid4().hex[:10]}

    @pytest.fixture
    def sandbox(self, backend: SandboxBackend, labels: dict[str, str]) -> Iterator[Sandbox]:
        with backend.create(self.spec(labels=labels)) as sbx:
            yield sbx

    @pytest.fixture
    def foreign_sandbox(self, backend: SandboxBackend, labels: dict[str, str]) -> Iterator[str]:
        """The id of a sandbox made at the provider *without* this library (through its SDK, so
        without ``OWNER_LABEL``) carrying ``labels``; removed afterwards. A backend whose sandboxes
        can only exist through this library (``local``) has none to make."""
        pytest.skip("no sandbox can be made outside the library on this backend")
        yield ""  # pragma: no cover

    def spec(self, **kwargs: Any) -> SandboxSpec:
        return SandboxSpec(image=self.image, **kwargs)

    def test_read_only_dirs_are_honoured_or_refused_before_any_sandbox(
        self, backend: SandboxBackend, labels: dict[str, str], tmp_path: Path
    ) -> None:
        # A directory of this machine the sandbox should see: either it is there (a backend that
        # says it shares host directories) or create refuses, naming the fix, and makes nothing.
        shared = tmp_path / "shared"
        shared.mkdir()
        (shared / "f.txt").write_text("shared\n")
        spec = self.spec(labels=labels, read_only_dirs={"ro": str(shared)})
        if not type(backend).shares_host_dirs:
            with pytest.raises(ConfigurationError, match="read_only_dirs") as info:
                backend.create(spec)
            assert "Sandbox.upload" in str(info.value)
            assert backend.list(labels) == []
            return
        with backend.create(spec) as sbx:
            assert sbx.run("cat ro/f.txt").stdout == "shared\n"

    # -- run ---------------------------------------------------------------------------------

    def test_exit_code_stdout_stderr_and_env(self, backend: SandboxBackend) -> None:
        with backend.create(self.spec(env={"A": "1"})) as sbx:
            out: list[str] = []
            err: list[str] = []
            res = sbx.run("echo $A; echo oops >&2; exit 3", timeout_s=60, on_stdout=out.append, on_stderr=err.append)
        assert (res.exit_code, res.stdout, res.stderr) == (3, "1\n", "oops\n")
        assert (out, err) == (["1"], ["oops"])

    def test_zero_exit_and_signal_exit(self, sandbox: Sandbox) -> None:
        assert sandbox.run("true").exit_code == 0
        assert sandbox.run("kill -9 $$").exit_code == 137

    def test_streamed_lines_arrive_in_order_across_streams(self, sandbox: Sandbox) -> None:
        seen: list[str] = []
        script = "echo a; sleep 0.3; echo b >&2; sleep 0.3; echo c; sleep 0.3; printf 'no newline' >&2"
        res = sandbox.run(
            script, on_stdout=lambda line: seen.append(f"out:{line}"), on_stderr=lambda line: seen.append(f"err:{line}")
        )
        assert seen == ["out:a", "err:b", "out:c", "err:no newline"]
        assert (res.stdout, res.stderr) == ("a\nc\n", "b\nno newline")

    def test_output_streams_while_the_command_runs(self, sandbox: Sandbox) -> None:
        # The command only finishes once we react to its first line: batching output until exit
        # would make it time out.
        def on_line(line: str) -> None:
            if line == "ready":
                threading.Thread(target=sandbox.upload, args=(b"go", "go.flag")).start()

        res = sandbox.run(
            "echo ready; while [ ! -f go.flag ]; do sleep 0.05; done; echo done", timeout_s=60, on_stdout=on_line
        )
        assert res.stdout == "ready\ndone\n"

    def test_large_and_unicode_output(self, sandbox: Sandbox) -> None:
        lines: list[str] = []
        res = sandbox.run("seq 1 200000; printf 'h\\xc3\\xa9llo \\xe2\\x9c\\x93\\n'", on_stdout=lines.append)
        assert lines[:2] == ["1", "2"] and lines[199999] == "200000" and lines[-1] == "héllo ✓"
        assert len(lines) == 200001 and res.stdout.endswith("héllo ✓\n")

    def test_env_per_command_and_launcher_env_not_leaked(
        self, backend: SandboxBackend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv(LEAK_VAR, "must-not-leak")
        with backend.create(self.spec(env={"A": "spec", "B": "spec"})) as sbx:
            res = sbx.run(f'echo "$A $B ${{{LEAK_VAR}:-unset}}"', env={"B": "cmd"})
            again = sbx.run('echo "$B"')
        assert res.stdout == "spec cmd unset\n"
        assert again.stdout == "spec\n"

    def test_env_names_are_never_shell_code_and_values_arrive_verbatim(
        self, backend: SandboxBackend, labels: dict[str, str]
    ) -> None:
        # Backends export variables in shell scripts: a name must not be able to run code there.
        injected = {"X; echo INJECTED >&2; Y": "v"}
        with pytest.raises(ConfigurationError, match="not a valid environment variable name"):
            backend.create(self.spec(env=injected, labels=labels))
        hostile = "$(echo INJECTED) `echo INJECTED` ; echo INJECTED ' \" \\ \n$HOME ${A:-x}"
        with backend.create(self.spec(env={"SPEC_V": hostile}, labels=labels)) as sbx:
            with pytest.raises(ConfigurationError, match="not a valid environment variable name"):
                sbx.run("true", env=injected)
            res = sbx.run('printf "%s|%s" "$SPEC_V" "$CMD_V"', env={"CMD_V": hostile})
        assert res.stdout == f"{hostile}|{hostile}" and "INJECTED" not in res.stderr

    def test_timeout_raises_and_kills_the_process_tree(self, sandbox: Sandbox) -> None:
        sleeps, pattern = _unique_sleeps()
        with pytest.raises(CommandTimeout) as info:
            sandbox.run(f"echo started; {sleeps}; echo never", timeout_s=2)
        assert info.value.timeout_s == 2
        assert "never" not in info.value.stdout
        assert sandbox.run(COUNT_PROCS.format(pattern)).stdout.strip() == "0"
        assert sandbox.run("echo still usable").stdout == "still usable\n"

    def test_a_timeout_carries_the_output_so_far(self, sandbox: Sandbox) -> None:
        lines: list[str] = []
        with pytest.raises(CommandTimeout) as info:
            sandbox.run("echo out1; echo err1 >&2; printf partial; sleep 60", timeout_s=3, on_stdout=lines.append)
        assert (info.value.stdout, info.value.stderr) == ("out1\npartial", "err1\n")
        assert lines == ["out1", "partial"]

    def test_raw_output_reaches_on_output_unsplit(self, sandbox: Sandbox) -> None:
        chunks: list[tuple[str, str]] = []
        res = sandbox.run("printf 'a\nb'; printf 'e' >&2", on_output=lambda kind, text: chunks.append((kind, text)))
        assert "".join(t for k, t in chunks if k == "stdout") == res.stdout == "a\nb"
        assert "".join(t for k, t in chunks if k == "stderr") == res.stderr == "e"

    def test_cancel_kills_the_command_and_what_it_started(self, sandbox: Sandbox) -> None:
        cancel = threading.Event()
        sleeps, pattern = _unique_sleeps()
        res = sandbox.run(
            f"echo up; {sleeps}; echo never",
            timeout_s=120,
            cancel=cancel,
            on_stdout=lambda line: cancel.set() if line == "up" else None,
        )
        assert res.exit_code == 137 and res.stdout == "up\n"
        assert sandbox.run(COUNT_PROCS.format(pattern)).stdout.strip() == "0"
        # A cancel never set changes nothing.
        assert sandbox.run("echo fine; exit 4", cancel=threading.Event()) == sandbox.run("echo fine; exit 4")

    def test_bad_timeout_is_a_configuration_error(self, sandbox: Sandbox) -> None:
        with pytest.raises(ConfigurationError):
            sandbox.run("true", timeout_s=0)

    # -- files -------------------------------------------------------------------------------

    def test_relative_paths_are_the_run_working_directory(self, sandbox: Sandbox, tmp_path: Path) -> None:
        sandbox.upload(b"hello\n", "sub/dir/in.txt")
        assert sandbox.run("cat sub/dir/in.txt").stdout == "hello\n"
        sandbox.run("echo made > made.txt")
        sandbox.download("made.txt", tmp_path / "made.txt")
        assert (tmp_path / "made.txt").read_text() == "made\n"

    def test_binary_round_trip_bytes_and_path(self, sandbox: Sandbox, tmp_path: Path) -> None:
        payload = bytes(range(256)) * 17 + b"\r\n\x00end"
        sandbox.upload(payload, "bin/a.bin")
        local = tmp_path / "b.bin"
        local.write_bytes(payload[::-1])
        sandbox.upload(local, "/tmp/abs/b.bin")
        sandbox.download("bin/a.bin", tmp_path / "out" / "a.bin")
        sandbox.download("/tmp/abs/b.bin", tmp_path / "b.out")
        assert (tmp_path / "out" / "a.bin").read_bytes() == payload
        assert (tmp_path / "b.out").read_bytes() == payload[::-1]
        assert sandbox.run("wc -c < bin/a.bin").stdout.strip() == str(len(payload))

    def test_100_mib_round_trip(self, sandbox: Sandbox, tmp_path: Path) -> None:
        src = tmp_path / "big.bin"
        with src.open("wb") as f:
            for _ in range(100):
                f.write(os.urandom(1 << 20))
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        sandbox.upload(src, "big.bin")
        assert sandbox.run("sha256sum big.bin").stdout.split()[0] == digest
        sandbox.download("big.bin", tmp_path / "back.bin")
        assert hashlib.sha256((tmp_path / "back.bin").read_bytes()).hexdigest() == digest

    def test_download_missing_file_is_typed_and_leaves_nothing(self, sandbox: Sandbox, tmp_path: Path) -> None:
        with pytest.raises(SandboxFileNotFound):
            sandbox.download("no/such/file", tmp_path / "x")
        assert list(tmp_path.iterdir()) == []

    def test_upload_missing_local_file_is_a_configuration_error(self, sandbox: Sandbox, tmp_path: Path) -> None:
        with pytest.raises(ConfigurationError):
            sandbox.upload(tmp_path / "absent", "x")

    # -- lifecycle ---------------------------------------------------------------------------

    def test_list_by_labels(self, backend: SandboxBackend, labels: dict[str, str]) -> None:
        with backend.create(self.spec(labels=labels)) as sbx:
            other = {**labels, "case": labels["case"] + "-other"}
            with backend.create(self.spec(labels=other)) as sbx2:
                assert [i.id for i in backend.list(labels=labels)] == [sbx.id]
                found = {i.id: i for i in backend.list(labels={"suite": "conformance"})}
                assert {sbx.id, sbx2.id} <= found.keys()
                assert dict(found[sbx.id].labels).items() >= labels.items()
        assert backend.list(labels=labels) == []

    def test_list_reports_only_sandboxes_this_library_created(
        self, backend: SandboxBackend, labels: dict[str, str], foreign_sandbox: str
    ) -> None:
        with backend.create(self.spec(labels=labels)) as sbx:
            assert [i.id for i in backend.list(labels=labels)] == [sbx.id]
            assert foreign_sandbox not in {i.id for i in backend.list()}
            info = backend.list(labels=labels)[0]
            assert dict(info.labels).get(OWNER_LABEL[0]) == OWNER_LABEL[1]

    def test_destroy_is_idempotent_and_final(self, backend: SandboxBackend, labels: dict[str, str]) -> None:
        sbx = backend.create(self.spec(labels=labels))
        sbx.destroy()
        sbx.destroy()
        assert sbx.destroyed and backend.list(labels=labels) == []
        with pytest.raises(SandboxUnavailable):
            sbx.run("true")
        backend.destroy(sbx.id)  # already gone: not an error

    def test_backend_destroy_by_id_stops_running_commands(
        self, backend: SandboxBackend, labels: dict[str, str]
    ) -> None:
        sbx = backend.create(self.spec(labels=labels))
        errors: list[BaseException] = []

        def long_command() -> None:
            try:
                sbx.run("echo up; sleep 300", timeout_s=120, on_stdout=lambda _: started.set())
            except BaseException as e:
                errors.append(e)

        started = threading.Event()
        worker = threading.Thread(target=long_command)
        worker.start()
        assert started.wait(60)
        backend.destroy(sbx.id)
        worker.join(60)
        assert not worker.is_alive(), "a command kept running after its sandbox was destroyed"
        assert len(errors) == 1 and isinstance(errors[0], SandboxUnavailable)
        assert backend.list(labels=labels) == []
        sbx.destroy()

    def test_leaving_the_block_on_error_destroys(self, backend: SandboxBackend, labels: dict[str, str]) -> None:
        with pytest.raises(RuntimeError), backend.create(self.spec(labels=labels)) as sbx:
            assert backend.list(labels=labels)[0].id == sbx.id
            raise RuntimeError("user code failed")
        assert sbx.destroyed and backend.list(labels=labels) == []
