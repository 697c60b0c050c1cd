"""Flows on an S3 datastore (moto) with every step in a sandbox, on the direct and the relay data
path: read back through the Client API and ``flow.py logs``, compared with a plain run, and checked
for the credentials each sandbox got.

Layer: tests-shared/remote. Imports: pytest, the standard library, ``sandbox_testing``.
"""

from __future__ import annotations

import hashlib

import pytest

from sandbox_testing.flows import run_id_of, task
from sandbox_testing.moto import STATIC_SECRET, create_role

ROLE_ARN = "METAFLOW_SANDBOX_S3_ROLE_ARN"

pytestmark = pytest.mark.e2e

STATIC_SHA = hashlib.sha256(STATIC_SECRET.encode()).hexdigest()


def tasks(run: dict) -> list[dict]:
    return [t for step in run["steps"].values() for t in step]


def assert_temporary_credentials(run: dict) -> None:
    """Every task ran in a sandbox with a session token, never with the user's static secret."""
    for t in tasks(run):
        creds = t["artifacts"]["creds"]
        assert creds["in_sandbox"], t["pathspec"]
        assert creds["session_token"], f"{t['pathspec']} got no session token"
        assert creds["secret_sha"] != STATIC_SHA, f"{t['pathspec']} got the static secret key"


def test_every_step_in_a_sandbox_on_s3_matches_a_plain_run(s3dir, backend_name):
    (s3dir.path / "input.txt").write_text("included-text")
    proc = s3dir.run(
        "s3_flow.py",
        "--with",
        "sandbox:data_path=direct",
        "run",
        "--alpha",
        "5",
        "--data",
        "input.txt",
        env={"BIG_MB": "48"},
    )
    output = proc.stdout + proc.stderr
    assert "data path direct)" in output
    assert "with a temporary session (sts:GetSessionToken)." in output  # said once, before the run
    run = s3dir.inspect("S3Flow")
    assert run["successful"] and run["finished"]
    start = task(run, "start")
    assert start["sandbox"]["sandbox-backend"] == backend_name and start["sandbox"]["sandbox-id"]
    assert start["stdout"] == "start says alpha=5\n" and "start warns" in start["stderr"]
    assert start["artifacts"]["data_text"] == "included-text"
    assert "card-from-s3" in " ".join(start["cards"])
    assert sorted(t["artifacts"]["value"] for t in run["steps"]["fan"]) == [5, 15]
    assert task(run, "join")["artifacts"]["values"] == [5, 15]
    assert task(run, "join")["artifacts"]["part_sums"] == [11, 31]  # the nested foreach
    assert sorted(t["artifacts"]["part_value"] for t in run["steps"]["inner"]) == [5, 6, 15, 16]
    assert_card_get(s3dir, run["id"])
    check = task(run, "check")
    assert check["artifacts"]["big_ok"] is True and check["artifacts"]["big_mb"] == 48
    assert_temporary_credentials(run)
    logs = s3dir.run("s3_flow.py", "logs", f"{run['id']}/start")
    assert "start says alpha=5" in logs.stdout + logs.stderr
    err_logs = s3dir.run("s3_flow.py", "logs", "--stderr", f"{run['id']}/start")
    assert "start warns" in err_logs.stdout + err_logs.stderr
    assert s3dir.live_sandboxes("s3_flow.py") == []

    s3dir.run("s3_flow.py", "run", "--alpha", "5", "--data", "input.txt")
    plain = s3dir.inspect("S3Flow")
    assert plain["id"] != run["id"] and plain["successful"]
    assert set(plain["steps"]) == set(run["steps"])
    for step in ("start", "join"):
        assert task(plain, step)["stdout"] == task(run, step)["stdout"]
        assert {k: v for k, v in task(plain, step)["artifacts"].items() if k != "creds"} == {
            k: v for k, v in task(run, step)["artifacts"].items() if k != "creds"
        }
    assert not task(plain, "start")["sandbox"]


def test_forwarded_keys_on_opt_in_and_a_failed_run_resumed_with_a_role(s3dir, s3):
    first = s3dir.run(
        "s3_flow.py", "--with", "sandbox:credentials=forward,data_path=direct", "run", ok=False, env={"SBX_FAIL": "1"}
    )
    origin = run_id_of(first.stdout + first.stderr)
    assert "with your own credentials, forwarded (credentials='forward')." in first.stdout + first.stderr
    assert "boom-s3-check" in first.stdout + first.stderr
    failed = s3dir.inspect("S3Flow", origin)
    assert not failed["successful"]
    # Opted in: the sandbox had the user's own static key (and no session token).
    start = task(failed, "start")["artifacts"]["creds"]
    assert start["in_sandbox"] and start["secret_sha"] == STATIC_SHA and not start["session_token"]

    # Resumed with a role to assume: the sandboxes get its session.
    role = create_role(s3, f"mfsbx-{s3dir.path.name}"[:64])
    proc = s3dir.run(
        "s3_flow.py", "--with", "sandbox:data_path=direct", "resume", "--origin-run-id", origin, env={ROLE_ARN: role}
    )
    assert f"with assumed role {role}, limited to the flow's prefixes." in proc.stdout + proc.stderr
    resumed = s3dir.inspect("S3Flow")
    assert resumed["successful"] and resumed["id"] != origin
    assert task(resumed, "large")["artifacts"]["big_sha"] == task(failed, "large")["artifacts"]["big_sha"]
    check = task(resumed, "check")
    assert check["artifacts"]["big_ok"] is True and check["sandbox"]["sandbox-id"]
    for step in ("check", "end"):  # run again, with the role's temporary credentials
        creds = task(resumed, step)["artifacts"]["creds"]
        assert creds["session_token"] and creds["secret_sha"] != STATIC_SHA
    assert s3dir.live_sandboxes("s3_flow.py") == []


def assert_card_get(fd, run_id: str) -> None:
    """``card get`` reads the start step's card back from the card store, as after a plain run."""
    proc = fd.run("s3_flow.py", "card", "get", f"{run_id}/start", "card.html")
    assert (fd.path / "card.html").stat().st_size > 0, proc.stdout + proc.stderr


def assert_no_credentials(run: dict) -> None:
    """Every task ran in a sandbox that had no AWS credentials at all (the relay path)."""
    empty = hashlib.sha256(b"").hexdigest()
    for t in tasks(run):
        creds = t["artifacts"]["creds"]
        assert creds["in_sandbox"], t["pathspec"]
        assert not creds["session_token"] and creds["secret_sha"] == empty, f"{t['pathspec']} got credentials"


def test_relay_without_network_a_failed_run_resumed(s3dir):
    """No network in the sandboxes: ``auto`` relays the data (said in each lifecycle line), no
    credentials enter a sandbox, the failed attempt is not visible as done, and a resume (again
    relayed) completes the run, reading the failed run's outputs from S3."""
    first = s3dir.run(
        "s3_flow.py", "--with", "sandbox:network=False", "run", "--alpha", "4", ok=False, env={"SBX_FAIL": "1"}
    )
    output = first.stdout + first.stderr
    origin = run_id_of(output)
    assert "data path relay)" in output and "data path direct" not in output
    assert "relays sandboxed steps' data" in output
    assert "boom-s3-check" in output
    failed = s3dir.inspect("S3Flow", origin)
    assert not failed["successful"]
    assert task(failed, "join")["artifacts"]["values"] == [4, 14]
    assert task(failed, "join")["artifacts"]["part_sums"] == [9, 29]  # the nested foreach
    assert_card_get(s3dir, origin)
    assert "card-from-s3" in " ".join(task(failed, "start")["cards"])
    assert_no_credentials(failed)
    # The failed attempt is on S3 as Metaflow records one (its data, then DONE: the attempt ended).
    listing = s3dir.run("inspect_s3.py", "S3Flow", origin, "check").stdout.split()
    assert {"0.data.json", "0.DONE.lock", "0.task_stderr.log"} <= {name.split("/")[-1] for name in listing}

    proc = s3dir.run("s3_flow.py", "--with", "sandbox:network=False", "resume", "--origin-run-id", origin)
    assert "data path relay)" in proc.stdout + proc.stderr
    resumed = s3dir.inspect("S3Flow")
    assert resumed["successful"] and resumed["id"] != origin
    assert task(resumed, "large")["artifacts"]["big_sha"] == task(failed, "large")["artifacts"]["big_sha"]
    assert task(resumed, "check")["artifacts"]["big_ok"] is True
    for step in ("check", "end"):
        assert task(resumed, step)["sandbox"]["sandbox-id"]
    logs = s3dir.run("s3_flow.py", "logs", f"{origin}/start")
    assert "start says alpha=4" in logs.stdout + logs.stderr
    assert s3dir.live_sandboxes("s3_flow.py") == []
