"""The metadata service for sandboxed tasks: which path a task's metadata takes, what the relay
accepts from a sandbox, and where the relay finds the task's metadata on the direct data path
(Metaflow's own ``sync_local_metadata_to_datastore`` and local storage standing in for S3). The
flows against a real service are in ``tests-shared/remote/test_metadata_service.py``.

Layer: tests of metaflow-sandbox. Imports: pytest, the standard library, metaflow, plugins.
"""

from __future__ import annotations

import json
from pathlib import Path

import metaflow  # noqa: F401 - Metaflow loads this extension first; importing its modules alone would not
import pytest
from metaflow.datastore import FlowDataStore
from metaflow.plugins.datastores.local_storage import LocalStorage

from metaflow_extensions.sandbox.plugins import compat, direct, service, service_relay, staging, task_script
from metaflow_extensions.sandbox.plugins.exceptions import SandboxException
from metaflow_extensions.sandbox.plugins.request import TaskRequest

LOC = staging.TaskLocation(root="/ds/.metaflow", flow="F", run_id="5", step="b", task_id="9")


@pytest.mark.parametrize(
    ("url", "backend", "network", "requested", "path"),
    [
        ("http://127.0.0.1:8080", "local", True, "auto", "direct"),  # a local sandbox shares the host's loopback
        ("http://localhost:8080/api", "daytona", True, "auto", "relay"),  # a provider's cannot reach it
        ("http://[::1]:8080", "e2b", True, None, "relay"),
        ("https://metadata.example.com", "daytona", True, "auto", "direct"),
        ("https://metadata.example.com", "local", False, "auto", "relay"),  # no network: always relayed
        ("https://metadata.example.com", "daytona", True, "relay", "relay"),
        ("http://127.0.0.1:8080", "daytona", True, "Direct", "direct"),
    ],
)
def test_the_metadata_path_of_a_task(monkeypatch, url, backend, network, requested, path):  # noqa: PLR0917 - parametrized
    monkeypatch.delenv(service.PATH_ENV, raising=False)
    assert service.metadata_path(url, backend, network, requested) == path


def test_the_metadata_path_follows_the_environment_and_refuses_what_cannot_work(monkeypatch):
    monkeypatch.setenv(service.PATH_ENV, "relay")
    assert service.metadata_path("https://metadata.example.com", "local", True) == "relay"
    with pytest.raises(SandboxException, match=r"one of auto, direct, relay"):
        service.metadata_path("http://127.0.0.1", "local", True, "sideways")
    with pytest.raises(SandboxException, match=r"network=False.*Unset METAFLOW_SANDBOX_METADATA_PATH"):
        service.metadata_path("http://127.0.0.1", "local", False, "direct")


def test_the_direct_path_gets_the_headers_only_as_secrets():
    task = service.ServiceTask("direct", "http://svc", {"x-api-key": "k"})
    assert task.env() == {"METAFLOW_DEFAULT_METADATA": "service", "METAFLOW_SERVICE_URL": "http://svc"}
    assert json.loads(task.secret_env()["METAFLOW_SERVICE_HEADERS"]) == {"x-api-key": "k"}


def test_secrets_are_sourced_on_the_relay_data_path_too():
    req = TaskRequest(
        backend="local", backend_options={}, step_command="true", location=LOC, input_paths=[],
        extract_commands=[], extract_env={}, env={}, labels={}, hard_limit_s=60,
        secret_env={"METAFLOW_SERVICE_HEADERS": "{}"},
    )  # fmt: skip
    sourced = f". ../{task_script.SECRETS_FILE} && set +a && rm -f ../{task_script.SECRETS_FILE}"
    assert sourced in task_script.script(req)


def datum(**changes: str) -> bytes:
    body = {"flow_id": "F", "run_number": "5", "step_name": "b", "task_id": "9", "field_name": "attempt_ok"}
    return json.dumps({**body, **changes}).encode()


def test_the_relay_sends_the_tasks_own_metadata_and_artifacts():
    files = {
        "sysmeta_attempt_ok_1.json": datum(),
        "1_artifact_x.json": json.dumps({"run_number": "5", "step_name": "b", "task_id": "9", "name": "x"}).encode(),
        "_self.json": b"{}",  # the runtime registered the task: not replayed
    }
    metadata, artifacts = service_relay.bodies(files, LOC)
    assert [m["field_name"] for m in metadata] == ["attempt_ok"] and [a["name"] for a in artifacts] == ["x"]


@pytest.mark.parametrize("other", [{"task_id": "10"}, {"run_number": "4"}, {"flow_id": "G"}, {"step_name": "a"}])
def test_a_step_cannot_write_another_tasks_metadata_through_the_relay(other):
    files = {"sysmeta_attempt_ok_1.json": datum(), "sysmeta_x_2.json": datum(**other)}
    with pytest.raises(service_relay.RelayError, match="names another task: nothing was replayed"):
        service_relay.bodies(files, LOC)


def test_on_the_direct_data_path_the_relay_reads_the_tasks_metadata_from_the_datastore(tmp_path: Path, monkeypatch):
    root = tmp_path / "store"
    loc = staging.TaskLocation(root=str(root), flow="F", run_id="5", step="b", task_id="9")
    sandbox = tmp_path / "sandbox"
    own = sandbox / ".metaflow" / "F" / "5" / "b" / "9" / "_meta"
    own.mkdir(parents=True)
    (own / "sysmeta_attempt_ok_1.json").write_bytes(datum())
    (sandbox / ".metaflow" / "F" / "5" / "b" / "8" / "_meta").mkdir(parents=True)
    (sandbox / ".metaflow" / "F" / "5" / "b" / "8" / "_meta" / "sysmeta_x_1.json").write_text("{}")
    monkeypatch.chdir(sandbox)
    task_ds = FlowDataStore("F", None, storage_impl=LocalStorage, ds_root=str(root)).get_task_datastore(
        "5", "b", "9", attempt=1, mode="w"
    )
    task_ds.init_task()
    compat.sync_local_metadata_to_datastore(".metaflow", task_ds)  # what the task does

    req = TaskRequest(
        backend="local", backend_options={}, step_command="true", location=loc, input_paths=[],
        extract_commands=[], extract_env={}, env={}, labels={}, hard_limit_s=60, attempt=1,
        data_path="direct", datastore="local",
    )  # fmt: skip
    assert direct.task_meta_files(req) == {"sysmeta_attempt_ok_1.json": datum()}
