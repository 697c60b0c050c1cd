"""Conformance of the ``daytona`` backend against the Daytona wire emulator, plus its own contract:
configuration errors, error translation through the real SDK, spec mapping, injected faults, and
no sandbox left behind. ``-m live`` runs the same suite against the real Daytona.

Layer: tests-shared. Imports: pytest, the standard library, core, ``sandbox_testing`` and (for
inspecting what reached the wire) the backend's own SDK client.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator

import pytest

from conformance.leases import orphan_dies_while_the_live_owner_keeps_its_sandbox
from metaflow_extensions.sandbox.core import (
    AuthenticationError,
    ConfigurationError,
    ImageError,
    QuotaExceeded,
    Resources,
    SandboxSpec,
    SandboxUnavailable,
    TransientError,
    get_backend,
)
from metaflow_extensions.sandbox.core.conformance import BackendConformance
from sandbox_testing.daytona import (  # noqa: F401 - daytona_emulator is a fixture
    EMULATOR_API_KEY,
    NO_FAULTS,
    daytona_emulator,
    emulator_env,
    emulator_state,
    set_faults,
    start_emulator,
)
from sandbox_testing.emulators import free_port

KEY = EMULATOR_API_KEY


@pytest.fixture
def emulator(daytona_emulator: str) -> Iterator[str]:  # noqa: F811 - the imported fixture  # noqa: F811 - the imported fixture
    """The emulator, fault-free, checked to hold no sandbox after the test."""
    set_faults(daytona_emulator, **NO_FAULTS)
    yield daytona_emulator
    set_faults(daytona_emulator, **NO_FAULTS)
    assert emulator_state(daytona_emulator)["live"] == 0, "a test left a sandbox behind"


def daytona(url: str, **options: object):
    return get_backend("daytona", api_url=f"{url}/api", api_key=KEY, **options)


class TestDaytonaEmulated(BackendConformance):
    @pytest.fixture
    def backend(self, emulator):
        return daytona(emulator)

    @pytest.fixture
    def foreign_sandbox(self, emulator, labels):
        from metaflow_extensions.sandbox.daytona.sdk import load_sdk

        sdk, _ = load_sdk()  # ``daytona``, or its alias ``daytona_sdk`` alone
        client = sdk.Daytona(sdk.DaytonaConfig(api_key=KEY, api_url=f"{emulator}/api"))
        made = client.create(sdk.CreateSandboxFromSnapshotParams(labels=labels))
        yield str(made.id)
        made.delete()


class TestDaytonaUnderFaults(BackendConformance):
    """The whole suite again with a fifth of all requests answered 429 or 503 and log streams cut.

    The emulator spreads refusals evenly (every fifth request), so retries always get through.
    """

    @pytest.fixture
    def backend(self, emulator):
        set_faults(emulator, rate_429=0.1, rate_503=0.1, drop_next=1000)
        return daytona(emulator)


# -- configuration -------------------------------------------------------------------------------


def test_missing_api_key_says_how_to_get_one(monkeypatch):
    for var in ("DAYTONA_API_KEY", "DAYTONA_JWT_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigurationError) as info:
        get_backend("daytona")
    assert "DAYTONA_API_KEY" in str(info.value) and "export DAYTONA_API_KEY=" in str(info.value)
    assert "app.daytona.io" in str(info.value)


def test_the_deprecated_daytona_sdk_alias_is_used_when_it_is_all_there_is(emulator):
    backend = daytona(emulator)
    expected = "daytona" if importlib.util.find_spec("daytona") else "daytona_sdk"
    assert backend._sdk.__name__ == expected
    print(f"SDK in use: {expected} {backend.sdk_version}")


def test_environment_variables_configure_the_backend(emulator, monkeypatch):
    monkeypatch.setenv("DAYTONA_API_KEY", KEY)
    monkeypatch.setenv("DAYTONA_API_URL", f"{emulator}/api")
    monkeypatch.setenv("DAYTONA_TARGET", "eu")
    backend = get_backend("daytona")
    with backend.create(SandboxSpec()) as sbx:
        assert sbx.run("echo ok").stdout == "ok\n"
        assert backend.client.get(sbx.id).target == "eu"


def test_rejected_key_is_an_authentication_error(emulator):
    with pytest.raises(AuthenticationError) as info:
        get_backend("daytona", api_url=f"{emulator}/api", api_key="invalid-key").create(SandboxSpec())
    assert "DAYTONA_API_KEY" in str(info.value)


def test_a_rejected_key_on_list_names_the_variable(emulator):
    with pytest.raises(AuthenticationError) as info:
        get_backend("daytona", api_url=f"{emulator}/api", api_key="invalid-key").list()
    assert "DAYTONA_API_KEY" in str(info.value)


def test_an_unreachable_api_is_reported_as_unreachable_naming_the_url_and_its_variable():
    url = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    with pytest.raises(TransientError) as info:
        get_backend("daytona", api_url=url, api_key=KEY).list()
    message = str(info.value)
    assert f"the API at {url} ($DAYTONA_API_URL) cannot be reached" in message and "list failed" not in message


def test_a_command_the_sandbox_cannot_start_ends_instead_of_hanging(emulator):
    # 4 MB of environment: more than an exec accepts. The service's shell reports it and the
    # command ends (126); the emulator must answer the same, not leave the command running.
    with daytona(emulator).create(SandboxSpec()) as sbx:
        res = sbx.run("echo never", env={"BIG": "x" * 4_000_000}, timeout_s=120)
        assert res.exit_code == 126 and "never" not in res.stdout
        assert sbx.run("echo still usable").stdout == "still usable\n"


@pytest.mark.parametrize(("option", "spec"), [("snapshot", SandboxSpec()), (None, SandboxSpec(image="missing:1"))])
def test_unknown_snapshot_or_image_is_an_image_error(emulator, option, spec):
    backend = daytona(emulator, **({"snapshot": "missing-snapshot"} if option else {}))
    with pytest.raises(ImageError) as info:
        backend.create(spec)
    assert info.value.remedy


def test_quota_is_final_with_a_remedy():
    with start_emulator("daytona", "--max-live", "1") as url:
        backend = daytona(url)
        with backend.create(SandboxSpec()), pytest.raises(QuotaExceeded) as info:
            backend.create(SandboxSpec())
        assert "kill" in (info.value.remedy or "")
        assert emulator_state(url)["live"] == 0


def test_faults_from_command_line_flags(tmp_path):
    # Low rates: the flags must take effect, while five retries must make a failure vanishingly rare.
    with start_emulator("daytona", "--latency-ms", "20", "--rate-429", "0.05", "--rate-503", "0.05") as url:
        with daytona(url).create(SandboxSpec()) as sbx:
            sbx.upload(b"x" * 1000, "f")
            assert sbx.run("wc -c < f").stdout == "1000\n"
        assert emulator_state(url) == {"live": 0, "created": 1, "destroyed": 1}


def test_emulated_sandboxes_do_not_see_the_launchers_files(emulator, tmp_path):
    secret = tmp_path / "launcher-secret.txt"
    secret.write_text("s3cr3t")
    with daytona(emulator).create(SandboxSpec()) as sbx:
        res = sbx.run(f"cat {secret}; ls {tmp_path}")
    assert res.exit_code != 0 and "s3cr3t" not in res.stdout and "launcher-secret" not in res.stdout


# -- spec mapping ----------------------------------------------------------------------------------


def test_spec_maps_onto_daytona_parameters(emulator):
    backend = daytona(emulator)
    spec = SandboxSpec(
        image="python:3.11-slim",
        resources=Resources(cpu=1.5, memory_mb=1500, disk_mb=4096),
        lifetime_s=5400,
        network=False,
        labels={"flow": "F"},
    )
    with backend.create(spec) as sbx:
        seen = backend.client.get(sbx.id)
        assert (seen.cpu, seen.memory, seen.disk) == (2, 2, 4)  # whole vCPUs and GiB, rounded up
        assert seen.network_block_all is True
        # The lease (default 300 s), not the 90 min lifetime: an orphan stops within 5 minutes.
        assert (seen.auto_stop_interval, seen.auto_delete_interval) == (5, 0)
        assert seen.labels["flow"] == "F" and seen.labels["created-by"] == "metaflow-sandbox"


def test_a_live_handle_keeps_its_sandbox_from_auto_stopping(emulator):
    # Processes inside do not count as activity on Daytona: the handle refreshes it (every 5 s
    # for a 15 s lifetime) even while nothing talks to the sandbox.
    def last_activity(sandbox_id: str) -> str:
        request = urllib.request.Request(
            f"{emulator}/api/sandbox/{sandbox_id}", headers={"Authorization": f"Bearer {EMULATOR_API_KEY}"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return str(json.load(answer)["lastActivityAt"])

    with daytona(emulator).create(SandboxSpec(lifetime_s=15)) as sbx:
        first = last_activity(sbx.id)
        for _ in range(300):
            time.sleep(0.1)
            if last_activity(sbx.id) != first:
                break
        assert last_activity(sbx.id) != first


def test_list_reports_only_sandboxes_this_package_created(emulator):
    backend = daytona(emulator)
    foreign = backend.client.create(timeout=30)  # made with the SDK directly, as a user would
    try:
        with backend.create(SandboxSpec(labels={"mine": "1"})) as sbx:
            assert [i.id for i in backend.list()] == [sbx.id]
    finally:
        foreign.delete()


# -- faults ---------------------------------------------------------------------------------------


def test_sandbox_dying_mid_command_is_unavailable_not_retried(emulator):
    backend = daytona(emulator)
    set_faults(emulator, die_next=1, die_after_s=0.5, match="die-here")
    with backend.create(SandboxSpec()) as sbx:
        sbx.run("echo before > count.txt")
        with pytest.raises(SandboxUnavailable):
            sbx.run("echo die-here >> attempts.txt; sleep 30")
    # The emulator's state shows the sandbox removed by leaving the block (checked by the fixture).


def test_dropped_log_streams_lose_and_repeat_nothing(emulator):
    backend = daytona(emulator)
    set_faults(emulator, drop_next=50)
    with backend.create(SandboxSpec()) as sbx:
        lines: list[str] = []
        res = sbx.run("for i in $(seq 1 40); do echo line$i; echo err$i >&2; sleep 0.02; done", on_stdout=lines.append)
    assert lines == [f"line{i}" for i in range(1, 41)]
    assert res.stderr == "".join(f"err{i}\n" for i in range(1, 41))


def test_a_stalled_log_stream_does_not_hang_the_caller(emulator):
    # The stream stays open and silent; the periodic check sees the command end and catches up.
    backend = daytona(emulator, check_interval_s=1)
    set_faults(emulator, stall_next=1, match="stall-me")
    with backend.create(SandboxSpec()) as sbx:
        res = sbx.run("echo stall-me; echo err >&2; exit 4")
        assert (res.exit_code, res.stdout, res.stderr) == (4, "stall-me\n", "err\n")
        assert sbx.run("echo next").stdout == "next\n"


def test_rate_limits_and_unavailable_answers_are_retried(emulator, tmp_path):
    backend = daytona(emulator)
    set_faults(emulator, rate_429=0.1, rate_503=0.1)
    for _ in range(3):
        with backend.create(SandboxSpec(labels={"faulty": "1"})) as sbx:
            sbx.upload(b"payload", "in.bin")
            assert sbx.run("cat in.bin; echo; echo done").stdout == "payload\ndone\n"
            sbx.download("in.bin", tmp_path / "out.bin")
            assert (tmp_path / "out.bin").read_bytes() == b"payload"
    assert set_faults(emulator, rate_429=0, rate_503=0)["refused"] >= 5
    assert backend.list(labels={"faulty": "1"}) == []


def test_each_command_runs_once_under_faults(emulator):
    backend = daytona(emulator)
    with backend.create(SandboxSpec()) as sbx:
        set_faults(emulator, rate_429=0.1, rate_503=0.1, drop_next=100)
        for i in range(10):
            sbx.run(f"echo {i} >> runs.txt")
        set_faults(emulator, rate_429=0, rate_503=0)
        assert sbx.run("cat runs.txt").stdout == "".join(f"{i}\n" for i in range(10))


OWNER = """
import signal, sys
# Python's own Ctrl-C handler, even when started with SIGINT ignored (a background CI job).
signal.signal(signal.SIGINT, signal.default_int_handler)
from metaflow_extensions.sandbox.core import get_backend, SandboxSpec
backend = get_backend("daytona", api_url=sys.argv[1] + "/api", api_key="k")
with backend.create(SandboxSpec(labels={"owner": "interrupted"})) as sbx:
    sbx.run("echo started; sleep 300", on_stdout=print)
"""


def test_ctrl_c_of_the_caller_destroys_its_sandbox(emulator):
    owner = subprocess.Popen(
        [sys.executable, "-u", "-c", textwrap.dedent(OWNER), emulator], stdout=subprocess.PIPE, text=True
    )
    assert owner.stdout is not None and owner.stdout.readline() == "started\n"
    owner.send_signal(signal.SIGINT)
    owner.wait(60)
    for _ in range(100):
        if emulator_state(emulator)["live"] == 0:
            break
        time.sleep(0.1)
    assert emulator_state(emulator)["live"] == 0


# -- metaflow-sandbox doctor ----------------------------------------------------------------------


def doctor(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The installed ``metaflow-sandbox`` console script, without the caller's Daytona settings."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DAYTONA_")}
    script = os.path.join(os.path.dirname(sys.executable), "metaflow-sandbox")
    return subprocess.run(
        [script, "doctor", *args], check=False, capture_output=True, text=True, timeout=300, env={**base, **env}
    )


def test_doctor_without_an_api_key_fails_naming_it():
    proc = doctor("--backend", "daytona", env={})
    assert proc.returncode == 1, proc.stdout
    assert "FAIL  daytona: configured: The daytona backend needs a Daytona API key and DAYTONA_API_KEY is not set" in (
        proc.stdout
    )
    assert "fix: Create a key at" in proc.stdout and "export DAYTONA_API_KEY=" in proc.stdout


def test_doctor_passes_against_the_emulator_and_leaves_no_sandbox(emulator):
    before = emulator_state(emulator)
    proc = doctor("--backend", "daytona", env=emulator_env(emulator))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "ok    daytona: installed: metaflow-sandbox-daytona" in out
    # The SDK against the range the backend's distribution declares (daytona, or its alias alone).
    assert re.search(r"ok    daytona: daytona: daytona(-sdk \(an alias of daytona\))? \S+ \(supported: ", out), out
    assert "ok    daytona: configured" in out
    assert re.search(r"ok    daytona: API: listing sandboxes took \d+ ms", out), out
    assert re.search(r"ok    daytona: sandbox: \S+ created in \d+ ms, ran a command in \d+ ms", out), out
    assert "ok    daytona: destroyed" in out and out.rstrip().endswith("All is well.")
    after = emulator_state(emulator)
    assert (after["created"] - before["created"], after["destroyed"] - before["destroyed"]) == (1, 1)
    assert after["live"] == 0


def test_doctor_reports_a_rejected_key_with_its_fix(emulator):
    proc = doctor("--backend", "daytona", env={**emulator_env(emulator), "DAYTONA_API_KEY": "invalid-key"})
    assert proc.returncode == 1
    assert "FAIL  daytona: API:" in proc.stdout and "DAYTONA_API_KEY" in proc.stdout
    assert "daytona: sandbox" not in proc.stdout  # no sandbox is attempted once the API refuses


# -- the real service -----------------------------------------------------------------------------


def _live_configured() -> bool:
    return bool(os.environ.get("DAYTONA_API_KEY")) and "127.0.0.1" not in os.environ.get("DAYTONA_API_URL", "")


@pytest.mark.live
@pytest.mark.skipif(not _live_configured(), reason="DAYTONA_API_KEY is not set: no real Daytona to test against")
class TestDaytonaLive(BackendConformance):
    @pytest.fixture
    def backend(self):
        return get_backend("daytona")


# -- leases ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_minute_emulator() -> Iterator[str]:
    # Auto-stop "minutes" of 2 s, so an orphan's death can be watched.
    with start_emulator("daytona", "--minute-s", "2") as url:
        yield url


def test_an_orphan_dies_with_its_lease_while_a_live_owner_keeps_its_sandbox(short_minute_emulator, monkeypatch):
    url = short_minute_emulator
    # A 3 s lease: auto-stop after one (2 s) minute without activity; live owners renew every second.
    monkeypatch.setenv("METAFLOW_SANDBOX_LEASE_S", "3")
    options = {"api_url": f"{url}/api", "api_key": KEY}
    orphan_dies_while_the_live_owner_keeps_its_sandbox(daytona(url), json.dumps(options))
