"""Conformance of the ``e2b`` backend, through the real ``e2b`` SDK, against the E2B wire emulator;
plus what is specific to E2B: lifetimes kept alive, faults, errors, spec mapping, and ``-m live``
against E2B itself when ``E2B_API_KEY`` is set.

Layer: tests-shared. Imports: pytest, the standard library, core and ``sandbox_testing``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from conformance.leases import orphan_dies_while_the_live_owner_keeps_its_sandbox
from metaflow_extensions.sandbox.core import (
    AuthenticationError,
    ConfigurationError,
    ImageError,
    Resources,
    SandboxSpec,
    SandboxUnavailable,
    TransientError,
    get_backend,
)
from metaflow_extensions.sandbox.core.conformance import BackendConformance
from sandbox_testing.e2b import (
    EMULATOR_API_KEY,
    e2b_emulator,
    emulator_env,
    emulator_state,
    set_faults,
    start_emulator,
)
from sandbox_testing.emulators import free_port

__all__ = ["e2b_emulator"]  # the fixture, imported so pytest finds it


def emulated(url: str, **options) -> object:
    return get_backend("e2b", api_url=url, sandbox_url=url, api_key=EMULATOR_API_KEY, **options)


class TestE2BEmulated(BackendConformance):
    @pytest.fixture
    def backend(self, e2b_emulator):
        return emulated(e2b_emulator, check_interval_s=1)

    @pytest.fixture
    def foreign_sandbox(self, e2b_emulator, labels):
        import e2b

        opts = {"api_key": EMULATOR_API_KEY, "api_url": e2b_emulator, "sandbox_url": e2b_emulator}
        made = e2b.Sandbox.create(metadata=labels, timeout=60, **opts)
        yield made.sandbox_id
        e2b.Sandbox.kill(made.sandbox_id, **opts)

    def test_launcher_files_are_invisible(self, sandbox, tmp_path, monkeypatch):
        (tmp_path / "flow.py").write_text("s3cr3t")
        monkeypatch.chdir(tmp_path)
        assert sandbox.run(f"cat {tmp_path}/flow.py").exit_code != 0
        assert "flow.py" not in sandbox.run(f"ls -a {tmp_path} {Path.cwd()}").stdout

    def test_runs_in_the_user_home_with_bash(self, sandbox):
        res = sandbox.run('echo "$PWD $HOME $BASH_VERSION"')
        pwd, home, bash = res.stdout.split()
        assert (pwd, home) == ("/home/user", "/home/user") and bash

    def test_a_command_outlives_the_sandbox_lifetime(self, backend):
        # E2B kills a sandbox at its timeout; the backend must push it forward while a step runs.
        with backend.create(self.spec(lifetime_s=2)) as sbx:
            res = sbx.run("sleep 6; echo survived")
        assert res.stdout == "survived\n"

    def test_a_lifetime_beyond_what_e2b_accepts_is_capped(self, backend):
        # Metaflow's default run time limit is 5 days; E2B refuses sandbox timeouts over 24 h.
        with backend.create(self.spec(lifetime_s=5 * 24 * 3600)) as sbx:
            assert sbx.run("echo ok").stdout == "ok\n"

    def test_network_false_cuts_the_network(self, backend):
        with backend.create(self.spec(network=False)) as sbx:
            interfaces = sbx.run("tail -n +3 /proc/net/dev | cut -d: -f1").stdout.split()
        assert interfaces == ["lo"]

    def test_labels_are_metadata_and_env_reaches_commands(self, backend, labels):
        with backend.create(self.spec(labels=labels, env={"E": "x y"})) as sbx:
            assert sbx.run('printf %s "$E"').stdout == "x y"
            (info,) = backend.list(labels=labels)
        assert info.backend == "e2b" and dict(info.labels).items() >= labels.items()

    def test_unknown_template_is_an_image_error(self, backend):
        with pytest.raises(ImageError, match="no-such-template"):
            backend.create(SandboxSpec(image="no-such-template"))

    def test_resources_warn_and_gpu_is_refused(self, backend):
        with pytest.warns(UserWarning, match="template"), backend.create(self.spec(resources=Resources(cpu=4))):
            pass
        with pytest.raises(ConfigurationError, match="GPU"):
            backend.create(self.spec(resources=Resources(gpu=1)))

    def test_wrong_key_is_a_final_authentication_error(self, e2b_emulator):
        backend = get_backend("e2b", api_url=e2b_emulator, sandbox_url=e2b_emulator, api_key="e2b_" + "1" * 40)
        with pytest.raises(AuthenticationError, match="E2B_API_KEY") as info:
            backend.create(SandboxSpec())
        assert not info.value.transient

    def test_a_dying_sandbox_is_unavailable_not_a_hang(self, backend, e2b_emulator, labels):
        marker = f"die-{uuid.uuid4().hex[:8]}"
        set_faults(e2b_emulator, die_next=1, die_after_s=0.5, match=marker)
        with backend.create(self.spec(labels=labels)) as sbx, pytest.raises(SandboxUnavailable):
            sbx.run(f"echo {marker}; sleep 120", timeout_s=90)
        assert backend.list(labels=labels) == []

    def test_a_stalled_stream_is_detected(self, backend, e2b_emulator):
        marker = f"stall-{uuid.uuid4().hex[:8]}"
        set_faults(e2b_emulator, stall_next=1, match=marker)
        with backend.create(self.spec()) as sbx:
            started = time.monotonic()
            with pytest.raises(SandboxUnavailable, match="stalled"):
                sbx.run(f"echo {marker}; sleep 1")
            assert time.monotonic() - started < 60
            assert sbx.run("echo next").stdout == "next\n"


def test_a_stalled_upload_is_abandoned_and_retried(e2b_emulator, tmp_path):
    backend = emulated(e2b_emulator, check_interval_s=1, request_timeout_s=3)
    name = f"stalled-{uuid.uuid4().hex[:8]}.bin"
    set_faults(e2b_emulator, stall_upload_next=1, match=name)
    with backend.create(SandboxSpec()) as sbx:
        started = time.monotonic()
        sbx.upload(b"payload", name)
        assert time.monotonic() - started < 60
        assert sbx.run(f"cat {name}").stdout == "payload"


def test_sandboxes_expire_at_their_timeout_in_the_emulator(e2b_emulator):
    # The control for test_a_command_outlives_the_sandbox_lifetime: the SDK alone loses it.
    import e2b

    sbx = e2b.Sandbox.create(timeout=1, api_key=EMULATOR_API_KEY, api_url=e2b_emulator, sandbox_url=e2b_emulator)
    time.sleep(2.5)
    assert not sbx.is_running()


@pytest.fixture(scope="module")
def short_lived_emulator():
    # Every sandbox lives at most 3 s past its last refresh, whatever the client asks for; silent
    # commands get a keepalive event every second (E2B: every 50 s), which the SDK must skip.
    with start_emulator("e2b", "--max-lifetime", "3", "--keepalive-s", "1") as url:
        yield url


def test_long_commands_are_kept_alive_when_e2b_grants_less_than_asked(short_lived_emulator):
    backend = emulated(short_lived_emulator, check_interval_s=30)
    with backend.create(SandboxSpec(lifetime_s=600)) as sbx:
        assert sbx.run("sleep 8; echo survived").stdout == "survived\n"


def test_an_unreachable_api_is_reported_as_unreachable_naming_the_url_and_its_variable():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(TransientError) as info:
        emulated(url).list()
    message = str(info.value)
    assert f"the API at {url} ($E2B_API_URL) cannot be reached" in message


def test_missing_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("E2B_API_KEY", raising=False)
    with pytest.raises(ConfigurationError, match=r"export E2B_API_KEY=") as info:
        get_backend("e2b")
    assert "e2b.dev" in str(info.value)


@pytest.fixture(scope="module")
def flaky_emulator():
    with start_emulator("e2b", "--rate-429", "0.2", "--rate-503", "0.2", "--latency-ms", "20") as url:
        yield url


def test_rate_limits_and_busy_answers_are_retried(flaky_emulator, tmp_path):
    backend = emulated(flaky_emulator, check_interval_s=1)
    labels = {"case": uuid.uuid4().hex}
    for _ in range(3):
        with backend.create(SandboxSpec(labels=labels)) as sbx:
            sbx.upload(b"abc", "f")
            assert sbx.run("cat f").stdout == "abc"
            sbx.download("f", tmp_path / "f")
            assert [i.id for i in backend.list(labels=labels)] == [sbx.id]
    assert backend.list(labels=labels) == []
    assert emulator_state(flaky_emulator)["live"] == 0
    assert set_faults(flaky_emulator)["refused"] >= 5


def test_nothing_is_left_live(e2b_emulator):
    backend = emulated(e2b_emulator)
    threads = [threading.Thread(target=lambda: backend.create(SandboxSpec()).destroy()) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = emulator_state(e2b_emulator)
    assert state["created"] >= 4 and state["live"] == 0


def doctor(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The installed ``metaflow-sandbox`` console script, without the caller's E2B settings."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
    script = os.path.join(os.path.dirname(sys.executable), "metaflow-sandbox")
    return subprocess.run(
        [script, "doctor", *args], check=False, capture_output=True, text=True, timeout=300, env={**base, **env}
    )


def test_doctor_fails_without_a_key_and_passes_against_the_emulator(e2b_emulator):
    proc = doctor("--backend", "e2b", env={})
    assert proc.returncode == 1 and "FAIL  e2b: configured" in proc.stdout and "E2B_API_KEY" in proc.stdout
    before = emulator_state(e2b_emulator)
    proc = doctor("--backend", "e2b", env=emulator_env(e2b_emulator))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok    e2b: e2b: " in proc.stdout and "ok    e2b: destroyed" in proc.stdout
    after = emulator_state(e2b_emulator)
    assert (after["created"] - before["created"], after["live"]) == (1, 0)


def _live_configured() -> bool:
    key = os.environ.get("E2B_API_KEY", "")
    return bool(key) and key != EMULATOR_API_KEY and "127.0.0.1" not in os.environ.get("E2B_API_URL", "")


@pytest.mark.live
@pytest.mark.skipif(not _live_configured(), reason="E2B_API_KEY is not set: no real E2B to test against")
class TestE2BLive(BackendConformance):
    @pytest.fixture
    def backend(self):
        return get_backend("e2b")


def test_an_orphan_dies_with_its_lease_while_a_live_owner_keeps_its_sandbox(e2b_emulator, monkeypatch):
    # A 3 s lease is the E2B timeout; live owners push it forward every second.
    monkeypatch.setenv("METAFLOW_SANDBOX_LEASE_S", "3")
    options = {"api_url": e2b_emulator, "sandbox_url": e2b_emulator, "api_key": EMULATOR_API_KEY}
    orphan_dies_while_the_live_owner_keeps_its_sandbox(emulated(e2b_emulator), json.dumps(options))
