"""Flows with ``--metadata service`` against a real service (``metaflow-local-service``), every step
in a sandbox, on the direct and the relayed metadata path, on the local datastore and on S3 (moto):
read back through the Client API against the service and compared with a plain run on the same peer.

Layer: tests-shared/remote. Imports: pytest, the standard library, ``sandbox_testing``.

The peer does not list artifacts whose names start with ``_`` (so ``successful`` reads False even
for a plain run): every comparison is with a plain run, never with an absolute ``successful``.
"""

from __future__ import annotations

import json

import pytest

from sandbox_testing.flows import FlowDir, run_id_of
from sandbox_testing.metadata_service import API_KEY, MetadataService

pytestmark = pytest.mark.e2e

FLOW, FLOW_CLASS = "service_flow.py", "ServiceFlow"
SANDBOX_FIELDS = {"sandbox-backend", "sandbox-id"}
RELAYED = "metadata relay)"


def run_flow(fd: FlowDir, *args: str, env: dict[str, str] | None = None) -> tuple[str, str]:
    """(run id, console output) of a successful run of the service flow."""
    proc = fd.run(FLOW, *args, "run", "--alpha", "3", env=env)
    output = proc.stdout + proc.stderr
    return run_id_of(output), output


def metadata_of(fd: FlowDir, run_id: str) -> dict:
    proc = fd.run("inspect_metadata.py", FLOW_CLASS, run_id)
    return json.loads(proc.stdout.splitlines()[-1])


def by_step(run: dict, key: str) -> dict[str, list]:
    """Per step, the sorted ``key`` of its tasks (task ids differ between runs)."""
    return {step: sorted(json.dumps(t[key], sort_keys=True) for t in tasks) for step, tasks in run["steps"].items()}


def without_probe(run: dict) -> dict[str, list]:
    return {
        step: sorted(json.dumps({k: v for k, v in t["artifacts"].items() if k != "seen"}, sort_keys=True) for t in ts)
        for step, ts in run["steps"].items()
    }


def assert_matches_plain(
    fd: FlowDir, service: MetadataService, plain_id: str, run_id: str, backend: str, *, relayed: bool
) -> None:
    """The sandboxed run holds in the service what the plain run holds, plus where each task ran."""
    plain, run = fd.inspect(FLOW_CLASS, plain_id), fd.inspect(FLOW_CLASS, run_id)
    assert run["finished"] == plain["finished"] and run["successful"] == plain["successful"]
    assert without_probe(run) == without_probe(plain)
    assert by_step(run, "stdout") == by_step(plain, "stdout")
    plain_meta, meta = metadata_of(fd, plain_id), metadata_of(fd, run_id)
    fields = {name.split("/")[0]: set(m["fields"]) for name, m in plain_meta.items()}
    assert len(meta) == len(plain_meta) == 5  # start, 2 x fan, join, end
    for name, m in meta.items():
        assert set(m["fields"]) == fields[name.split("/")[0]] | SANDBOX_FIELDS, name
        assert m["attempt"] == "0" and m["ds_type"] == plain_meta[next(iter(plain_meta))]["ds_type"]
    for tasks in run["steps"].values():
        for t in tasks:
            assert t["sandbox"]["sandbox-backend"] == backend and t["sandbox"]["sandbox-id"], t["pathspec"]
            seen = t["artifacts"]["seen"]
            assert seen["in_sandbox"], t["pathspec"]
            # The service's auth key reaches a sandbox only on the direct path (as a sourced file).
            assert seen["auth_in_env"] is not relayed, t["pathspec"]
    calls = [r for r in service.requests() if r["path"].startswith(f"/flows/{FLOW_CLASS}/runs/{run_id}")]
    assert calls and all(r["api_key"] == API_KEY for r in calls), "a call reached the service without its auth key"
    if relayed:
        # The launcher heartbeats for every task it relays (Metaflow's own sidecar may miss short tasks).
        beats = {r["path"] for r in calls if r["path"].endswith("/heartbeat") and "/tasks/" in r["path"]}
        steps = f"/flows/{FLOW_CLASS}/runs/{run_id}/steps"
        assert beats == {f"{steps}/{name.replace('/', '/tasks/')}/heartbeat" for name in meta}


def assert_no_secret_kept(fd: FlowDir, *outputs: str) -> None:
    """The service's auth key is in no console output and no file of the flow's directory (the local
    datastore, its logs and metadata)."""
    for output in outputs:
        assert API_KEY not in output
    for path in fd.path.rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), f"the service's auth key was written to {path}"


def test_service_metadata_direct_and_relayed_matches_a_plain_run(remote_flows, metadata_service, backend_name):
    fd = remote_flows
    fd.env.update(metadata_service.env())
    plain_id, plain_out = run_flow(fd)
    # Default: direct for `local` with the network on (it shares the host's loopback); relayed for a
    # provider's sandbox, which cannot reach this machine's loopback.
    auto_id, auto_out = run_flow(fd, "--with", "sandbox")
    relayed = backend_name != "local"
    assert (RELAYED in auto_out) is relayed
    assert_matches_plain(fd, metadata_service, plain_id, auto_id, backend_name, relayed=relayed)
    # Without network the task cannot reach the service: always relayed.
    off_id, off_out = run_flow(fd, "--with", "sandbox:network=False")
    assert RELAYED in off_out
    assert_matches_plain(fd, metadata_service, plain_id, off_id, backend_name, relayed=True)
    assert_no_secret_kept(fd, plain_out, auto_out, off_out)
    assert fd.live_sandboxes(FLOW) == []


def test_service_metadata_relayed_on_s3_matches_a_plain_run(s3dir, metadata_service, backend_name):
    fd = s3dir
    fd.env.update(metadata_service.env())
    plain_id, _ = run_flow(fd)
    # The S3 data path needs the network; the metadata is relayed by choice (the direct metadata
    # path is the local datastore test's).
    relayed_id, output = run_flow(fd, "--with", "sandbox", env={"METAFLOW_SANDBOX_METADATA_PATH": "relay"})
    # A provider's sandbox cannot reach the loopback endpoint: its data is relayed too (and the
    # launcher rewrites the records that name the datastore before replaying them).
    data_path = "direct" if backend_name == "local" else "relay"
    assert f"data path {data_path}, metadata relay)" in output
    assert_matches_plain(fd, metadata_service, plain_id, relayed_id, backend_name, relayed=True)
    assert fd.live_sandboxes(FLOW) == []


def test_a_sandboxed_step_reads_another_flows_run_through_the_client_api(s3dir, metadata_service):
    """Metaflow's tutorial 03 pattern: on S3 with the service, both reached directly, a step in a
    sandbox sees another flow's run as a plain step would."""
    fd = s3dir
    fd.env.update(metadata_service.env())
    origin, _ = run_flow(fd)  # a plain run: alpha=3
    fd.run(
        "client_flow.py", "--with", "sandbox:data_path=direct", "run", "--origin", origin,
        env={"METAFLOW_SANDBOX_METADATA_PATH": "direct"},
    )  # fmt: skip
    run = fd.inspect("ClientFlow")
    start = run["steps"]["start"][0]
    assert start["sandbox"]["sandbox-id"]
    assert start["artifacts"]["seen_values"] == [13, 23] and start["artifacts"]["seen_alpha"] == 3
