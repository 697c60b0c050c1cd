"""The Modal wire emulator through the real ``modal`` SDK: sandboxes created from Modal images,
exec with streamed output and exit codes, files, tags and list, lifetimes, terminate, a refused
token and injected faults, on both of the SDK's sandbox paths (V2, its default, and V1).

Layer: tests-shared. Imports: pytest, the standard library, the ``modal`` SDK and
``sandbox_testing``. These check the emulator that ``metaflow-sandbox-modal`` will be tested
against; the backend's own conformance suite comes with the backend.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from sandbox_testing.modal import (
    emulated_sandboxes,
    emulator_state,
    modal_emulator,
    set_faults,
    start_emulator,
    use_emulator,
)

modal = pytest.importorskip("modal", reason="the modal SDK is installed by the modal_emulator nox session")

__all__ = ["modal_emulator", "use_emulator"]  # fixtures, imported so pytest finds them


def _has_v2() -> bool:
    try:
        return bool(modal.config.config.get("sandbox_v2"))
    except KeyError:  # SDKs before 1.6 create every sandbox through V1
        return False


HAS_V2 = _has_v2()
CREATE_RPC = "SandboxCreateV2" if HAS_V2 else "SandboxCreate"  # what Sandbox.create calls by default


@pytest.fixture(params=["v2", "v1"] if HAS_V2 else ["v1"])
def version(request: pytest.FixtureRequest, use_emulator: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both sandbox paths of the SDK: V2 (``SandboxCreateV2``, the 1.6 default) and V1 (older SDKs,
    GPU sandboxes), chosen by the SDK's own ``MODAL_SANDBOX_V2`` setting."""
    monkeypatch.setenv("MODAL_SANDBOX_V2", "1" if request.param == "v2" else "0")
    return str(request.param)


@pytest.fixture
def app(use_emulator: str):
    return modal.App.lookup("metaflow-sandbox-tests", create_if_missing=True)


@pytest.fixture
def sandbox(app, version: str) -> Iterator[object]:
    sb = modal.Sandbox.create(app=app, image=modal.Image.debian_slim(), timeout=600)
    yield sb
    sb.terminate()


def test_exec_streams_output_and_returns_the_exit_code(sandbox, version):
    assert sandbox.object_id.startswith("sb-v2-" if version == "v2" else "sb-")
    proc = sandbox.exec("bash", "-c", "echo out; echo err >&2; printf 'no newline'; exit 3")
    assert proc.wait() == 3
    assert (proc.stdout.read(), proc.stderr.read()) == ("out\nno newline", "err\n")


def test_output_arrives_while_the_command_runs(sandbox):
    # The command waits for a file that the test writes only after reading the first line.
    script = "echo started; until [ -e /tmp/go ]; do sleep 0.05; done; echo finished"
    proc = sandbox.exec("bash", "-c", script)
    lines = iter(proc.stdout)
    assert next(lines) == "started\n"  # a whole line at once, while the command still runs
    assert proc.poll() is None
    sandbox.filesystem.write_text("", "/tmp/go")
    assert list(lines) == ["finished\n"]
    assert proc.wait() == 0


def test_workdir_and_environment_reach_commands(app, use_emulator):
    sb = modal.Sandbox.create(app=app, env={"FROM_CREATE": "x y"})
    try:
        proc = sb.exec(
            "bash", "-c", 'printf "%s|%s|%s" "$FROM_CREATE" "$FROM_EXEC" "$PWD"', env={"FROM_EXEC": "z"}, workdir="/tmp"
        )
        assert proc.stdout.read() == "x y|z|/tmp"
    finally:
        sb.terminate()


def test_files_are_written_and_read_back(sandbox, tmp_path):
    payload = bytes(range(256)) * 12_000  # 3 MB of every byte value: several stream chunks
    sandbox.filesystem.write_bytes(payload, "/tmp/dir/data.bin")
    assert sandbox.exec("wc", "-c", "/tmp/dir/data.bin").stdout.read().split()[0] == str(len(payload))
    assert sandbox.filesystem.read_bytes("/tmp/dir/data.bin") == payload
    (tmp_path / "in.txt").write_text("from the launcher\n")
    sandbox.filesystem.copy_from_local(tmp_path / "in.txt", "/tmp/in.txt")
    sandbox.filesystem.copy_to_local("/tmp/in.txt", tmp_path / "back.txt")
    assert (tmp_path / "back.txt").read_text() == "from the launcher\n"
    with pytest.raises(modal.exception.SandboxFilesystemNotFoundError):
        sandbox.filesystem.read_text("/tmp/no-such-file")


def test_sandboxes_do_not_see_the_launchers_files(sandbox, tmp_path):
    (tmp_path / "secret.txt").write_text("s3cr3t")
    proc = sandbox.exec("bash", "-c", f"cat {tmp_path}/secret.txt; ls {tmp_path}")
    assert proc.wait() != 0 and "s3cr3t" not in proc.stdout.read()


def test_tags_find_a_sandbox_until_it_is_terminated(app, version):
    sb = modal.Sandbox.create(app=app, tags={"flow": "F", "run": "1"})
    other = modal.Sandbox.create(app=app, tags={"flow": "F", "run": "2"})
    try:
        assert [s.object_id for s in modal.Sandbox.list(app_id=app.app_id, tags={"run": "1"})] == [sb.object_id]
        sb.set_tags({"flow": "F", "run": "1", "step": "start"})
        assert sb.get_tags() == {"flow": "F", "run": "1", "step": "start"}
        found = modal.Sandbox.list(app_id=app.app_id, tags={"flow": "F"})
        assert {s.object_id for s in found} == {sb.object_id, other.object_id}
        sb.terminate()
        assert [s.object_id for s in modal.Sandbox.list(app_id=app.app_id, tags={"flow": "F"})] == [other.object_id]
    finally:
        other.terminate()


def test_terminate_ends_the_sandbox_and_its_commands(app, version, use_emulator):
    before = emulator_state(use_emulator)
    sb = modal.Sandbox.create(app=app)
    proc = sb.exec("sleep", "300")
    sb.terminate()
    sb.wait(raise_on_termination=False)
    assert sb.returncode == 137  # what the SDK reports for a terminated sandbox
    assert proc.wait() != 0
    after = emulator_state(use_emulator)
    assert (after["created"] - before["created"], after["destroyed"] - before["destroyed"]) == (1, 1)
    with pytest.raises(modal.exception.Error):
        sb.exec("true")


def test_an_entrypoint_sandbox_ends_with_its_command(app, version):
    sb = modal.Sandbox.create("bash", "-c", "exit 5", app=app)
    sb.wait()
    assert sb.returncode == 5


def test_a_sandbox_ends_at_its_timeout(app, version):
    sb = modal.Sandbox.create(app=app, timeout=1)
    with pytest.raises(modal.exception.SandboxTimeoutError):
        sb.wait()
    assert sb.returncode == 124


def test_an_idle_sandbox_ends_at_its_idle_timeout(app):
    sb = modal.Sandbox.create(app=app, idle_timeout=1, timeout=600)
    assert sb.exec("true").wait() == 0
    sb.wait()  # returns once idle; a running command would have kept it alive
    assert sb.poll() is not None


def test_a_command_longer_than_the_idle_timeout_keeps_the_sandbox(app):
    # Idle time counts from the end of the last command, not from its start: a second after the
    # first command ends, well within the idle timeout, the sandbox still runs the next one.
    sb = modal.Sandbox.create(app=app, idle_timeout=3, timeout=600)
    try:
        assert sb.exec("sleep", "4").wait() == 0
        time.sleep(1)
        assert sb.exec("bash", "-c", "sleep 0.5; echo alive").stdout.read() == "alive\n"
    finally:
        sb.terminate()


def test_block_network_leaves_only_loopback(app, version):
    sb = modal.Sandbox.create(app=app, block_network=True)
    try:
        interfaces = sb.exec("bash", "-c", "tail -n +3 /proc/net/dev | cut -d: -f1").stdout.read().split()
        assert interfaces == ["lo"]
    finally:
        sb.terminate()


def test_a_registry_image_is_accepted_and_a_missing_one_fails(app):
    sb = modal.Sandbox.create(app=app, image=modal.Image.from_registry("python:3.12-slim"))
    sb.terminate()
    with pytest.raises(modal.exception.RemoteError, match="missing"):
        modal.Sandbox.create(app=app, image=modal.Image.from_registry("example.com/missing:1"))


@pytest.mark.parametrize("gpu", [None, "A100"])  # a GPU sandbox goes through V1 whatever the setting
def test_what_reached_the_wire_can_be_read_back(app, use_emulator, gpu):
    image = modal.Image.from_registry("python:3.12-slim")
    sb = modal.Sandbox.create(
        app=app,
        image=image,
        cpu=1.5,
        memory=1536,
        gpu=gpu,
        timeout=1234,
        idle_timeout=99,
        block_network=True,
        tags={"flow": "F"},
        env={"E": "1"},
    )
    sb.terminate()
    (seen,) = [s for s in emulated_sandboxes(use_emulator) if s["id"] == sb.object_id]
    assert "python:3.12-slim" in seen["image"] and seen["v2"] is (gpu is None and HAS_V2)
    assert (seen["cpu"], seen["memory_mb"], seen["timeout_s"], seen["idle_timeout_s"]) == (1.5, 1536, 1234, 99)
    assert (seen["gpu"] or "").startswith("A100" if gpu else "")
    assert seen["block_network"] and seen["tags"] == {"flow": "F"} and seen["env"] == {"E": "1"}
    assert not seen["running"]


def test_a_wrong_token_is_refused(use_emulator):
    client = modal.Client.from_credentials("ak-wrong", "as-wrong")
    with pytest.raises(modal.exception.AuthError, match="modal token new"):
        modal.App.lookup("metaflow-sandbox-tests", create_if_missing=True, client=client)


# -- faults ---------------------------------------------------------------------------------------


def test_unavailable_answers_are_retried_by_the_sdk(app, use_emulator):
    set_faults(use_emulator, fail_next=2, fail_rpc=CREATE_RPC, fail_status="UNAVAILABLE")
    sb = modal.Sandbox.create(app=app)
    sb.terminate()
    assert set_faults(use_emulator)["refused"] == 2


def test_rate_limits_and_unavailable_answers_are_retried(app, use_emulator, tmp_path):
    # A fifth of control-plane calls refused, spread evenly, so that retries always get through.
    set_faults(use_emulator, rate_429=0.1, rate_503=0.1)
    for _ in range(3):
        sb = modal.Sandbox.create(app=app, tags={"faulty": "1"})
        assert sb.exec("echo", "ok").stdout.read() == "ok\n"
        sb.terminate()
    assert list(modal.Sandbox.list(app_id=app.app_id, tags={"faulty": "1"})) == []
    assert set_faults(use_emulator, rate_429=0, rate_503=0)["refused"] >= 2


def test_resource_exhausted_reaches_the_caller(app, use_emulator):
    set_faults(use_emulator, fail_next=1, fail_rpc=CREATE_RPC, fail_status="RESOURCE_EXHAUSTED")
    with pytest.raises(modal.exception.ResourceExhaustedError):
        modal.Sandbox.create(app=app)
    assert set_faults(use_emulator)["fail_next"] == 0


def test_cut_output_streams_lose_and_repeat_nothing(sandbox, use_emulator):
    set_faults(use_emulator, cut_next=20, match="cut-me")
    script = "for i in $(seq 1 40); do echo line$i; echo err$i >&2; sleep 0.01; done # cut-me"
    proc = sandbox.exec("bash", "-c", script)
    assert proc.stdout.read() == "".join(f"line{i}\n" for i in range(1, 41))
    assert proc.stderr.read() == "".join(f"err{i}\n" for i in range(1, 41))
    assert proc.wait() == 0
    assert set_faults(use_emulator)["cut_next"] == 19  # one exec's stream was cut


def test_create_latency_delays_every_creation(app, use_emulator):
    set_faults(use_emulator, create_latency_ms=300)
    started = time.monotonic()
    sb = modal.Sandbox.create(app=app)
    # A lower bound only: the emulator sleeps that long before answering, however fast the machine.
    assert time.monotonic() - started >= 0.3
    sb.terminate()


def test_a_dying_sandbox_ends_its_commands(app, use_emulator):
    set_faults(use_emulator, die_next=1, die_after_s=0.3, match="die-here")
    sb = modal.Sandbox.create(app=app)
    proc = sb.exec("bash", "-c", "echo die-here; sleep 300")
    assert proc.wait() != 0
    sb.wait(raise_on_termination=False)
    assert sb.poll() is not None


def test_faults_and_settings_from_command_line_flags(tmp_path, monkeypatch):
    flags = ["--token-id", "ak-other", "--token-secret", "as-other", "--fail-next", "1", "--fail-rpc", CREATE_RPC]
    flags += ["--max-lifetime", "2"]
    with start_emulator("modal", *flags) as url:
        env = {"MODAL_SERVER_URL": url, "MODAL_TOKEN_ID": "ak-other", "MODAL_TOKEN_SECRET": "as-other"}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        client = modal.Client.from_credentials("ak-other", "as-other")
        app = modal.App.lookup("flags", create_if_missing=True, client=client)
        modal.Sandbox.create(app=app, client=client).terminate()
        assert emulator_state(url) == {"live": 0, "created": 1, "destroyed": 1}
        assert set_faults(url)["refused"] == 1
        capped = modal.Sandbox.create(app=app, client=client, timeout=600)
        with pytest.raises(modal.exception.SandboxTimeoutError):
            capped.wait()  # ended by --max-lifetime, not by its own timeout
