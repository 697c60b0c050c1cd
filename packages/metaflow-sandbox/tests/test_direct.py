"""The launcher side of the direct data path against Metaflow's own datastore code (its local
storage standing in for S3: the same ``TaskDataStore`` calls): logs land where ``flow.py logs``
reads them, and the local metadata a task uploads with Metaflow's
``sync_local_metadata_to_datastore`` comes back into the launcher's ``.metaflow``.

Layer: tests of metaflow-sandbox. Imports: pytest, the standard library, metaflow, plugins.
"""

from __future__ import annotations

from pathlib import Path

import metaflow  # noqa: F401 - Metaflow loads this extension first; importing its modules alone would not
import pytest
from metaflow.datastore import FlowDataStore
from metaflow.plugins.datastores.local_storage import LocalStorage

from metaflow_extensions.sandbox.plugins import compat, direct, staging
from metaflow_extensions.sandbox.plugins.request import TaskRequest


@pytest.fixture
def remote(tmp_path: Path):
    """A datastore (``local`` storage under ``tmp_path/store``) and a task location in it."""
    root = tmp_path / "store"
    root.mkdir()
    loc = staging.TaskLocation(root=str(root), flow="F", run_id="5", step="b", task_id="9")
    return FlowDataStore("F", None, storage_impl=LocalStorage, ds_root=str(root)), loc


def request(loc: staging.TaskLocation, metadata_root: str) -> TaskRequest:
    return TaskRequest(
        backend="local", backend_options={}, step_command="true", location=loc, input_paths=[],
        extract_commands=[], extract_env={}, env={}, labels={}, hard_limit_s=60, attempt=1,
        data_path="direct", datastore="local", metadata_root=metadata_root,
    )  # fmt: skip


def test_logs_are_saved_where_metaflow_reads_them(remote):
    flow_ds, loc = remote
    direct.save_task_logs("local", loc, 1, {"stdout": b"out-line\n", "stderr": b"err-line\n"})
    task_ds = flow_ds.get_task_datastore("5", "b", "9", attempt=1, mode="r", allow_not_done=True)
    assert task_ds.load_logs(["task"], "stdout") == [("task", b"out-line\n")]
    assert task_ds.load_logs(["task"], "stderr") == [("task", b"err-line\n")]


def test_the_tasks_local_metadata_comes_back_through_the_datastore(remote, tmp_path: Path, monkeypatch):
    flow_ds, loc = remote
    sandbox = tmp_path / "sandbox"  # the task's working directory and its local metadata
    own = sandbox / ".metaflow" / "F" / "5" / "b" / "9" / "_meta"
    own.mkdir(parents=True)
    (own / "sysmeta_attempt_1.json").write_text('{"value": 1}')
    (sandbox / ".metaflow" / "F" / "6" / "_meta").mkdir(parents=True)
    (sandbox / ".metaflow" / "F" / "6" / "_meta" / "_self.json").write_text("another run")
    monkeypatch.chdir(sandbox)
    task_ds = flow_ds.get_task_datastore("5", "b", "9", attempt=1, mode="w")
    task_ds.init_task()
    compat.sync_local_metadata_to_datastore(".metaflow", task_ds)  # what the task does

    launcher = tmp_path / "launcher" / ".metaflow"
    direct.sync_local_metadata(request(loc, str(launcher)))
    assert (launcher / "F" / "5" / "b" / "9" / "_meta" / "sysmeta_attempt_1.json").read_text() == '{"value": 1}'
    assert not (launcher / "F" / "6").exists()


def test_a_task_that_uploaded_no_metadata_is_a_direct_error(remote, tmp_path: Path):
    flow_ds, loc = remote
    flow_ds.get_task_datastore("5", "b", "9", attempt=1, mode="w").init_task()
    with pytest.raises(direct.DirectError, match="saved no local metadata"):
        direct.sync_local_metadata(request(loc, str(tmp_path / "launcher")))


def test_without_local_metadata_nothing_is_copied(remote):
    _, loc = remote
    direct.sync_local_metadata(request(loc, ""))  # --metadata service: nothing to do, no datastore access
