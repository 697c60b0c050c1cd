"""The relay data path of a remote datastore without a peer: the mirror filled from the datastore,
the outputs pushed back (content addresses never moved twice, ``DONE`` last), and the metadata
records rewritten to name the remote datastore. The remote side is Metaflow's ``LocalStorage``
here (the same storage interface as ``S3Storage``; S3 itself is tested against moto in
``tests-shared/remote``).

Layer: tests of metaflow-sandbox. Imports: pytest, the standard library, metaflow, plugins.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import metaflow  # noqa: F401 - Metaflow loads this extension first; importing its modules alone would not
import pytest
from metaflow.datastore import FlowDataStore
from metaflow.plugins.datastores.local_storage import LocalStorage

from metaflow_extensions.sandbox.plugins import relay, staging
from metaflow_extensions.sandbox.plugins.request import TaskRequest


def write_task(root: str, step: str, task_id: str, values: dict) -> None:
    """A finished task of flow F, run 5, as Metaflow writes it."""
    flow_ds = FlowDataStore("F", None, storage_impl=LocalStorage, ds_root=root)
    task_ds = flow_ds.get_task_datastore("5", step, task_id, attempt=0, mode="w")
    task_ds.init_task()
    # What ``persist`` reads of a flow: its attributes are the artifacts.
    flow = type("Flow", (), {"_EPHEMERAL": {"_EPHEMERAL", "_datastore"}, "_datastore": None})()
    for name, value in values.items():
        setattr(flow, name, value)
    task_ds.persist(flow)
    task_ds.done()


def files_under(root: str) -> list[str]:
    return sorted(str(p) for p in Path(root).rglob("*") if p.is_file())


@pytest.fixture
def req(tmp_path: Path) -> TaskRequest:
    remote, mirror = tmp_path / "remote", tmp_path / "mirror" / ".metaflow"
    remote.mkdir()
    mirror.mkdir(parents=True)
    loc = staging.TaskLocation(
        root=str(mirror), flow="F", run_id="5", step="b", task_id="9", card_root=str(mirror / "mf.cards")
    )
    return TaskRequest(
        backend="local", backend_options={}, step_command="true", location=loc, input_paths=["5/a/1"],
        extract_commands=[], extract_env={}, env={}, labels={}, hard_limit_s=60, attempt=0,
        data_path="relay", datastore="local", remote_root=str(remote), remote_card_root=str(remote / "mf.cards"),
    )  # fmt: skip


def test_the_mirror_gets_the_parents_last_done_attempt_and_its_blobs(req):
    write_task(req.remote_root, "a", "1", {"x": 41})
    relay.fetch_inputs(req)
    files, blobs = staging.input_files(req.location, req.input_paths)
    parent = os.path.join(req.location.root, "F", "5", "a", "1")
    assert {os.path.join(parent, f"0.{s}") for s in ("attempt.json", "DONE.lock", "data.json")} <= set(files)
    assert blobs and all(os.path.exists(os.path.join(req.location.blob_dir, b[:2], b)) for b in blobs)
    flow_ds = FlowDataStore("F", None, storage_impl=LocalStorage, ds_root=req.location.root)
    assert flow_ds.get_task_datastore("5", "a", "1", mode="r")["x"] == 41


def test_a_parent_without_a_done_attempt_is_an_error_naming_it(req):
    with pytest.raises(relay.RelayError, match="5/a/1 has no completed attempt"):
        relay.fetch_inputs(req)


def test_outputs_are_pushed_without_moving_a_known_blob_twice(req):
    write_task(req.remote_root, "a", "1", {"x": 41})  # the remote has the blob of 41 already
    write_task(req.location.root, "b", "9", {"y": 41, "z": "new"})
    known = {p: os.stat(p).st_ino for p in files_under(os.path.join(req.remote_root, "F", "data"))}
    written = [p for p in files_under(req.location.root) if "/b/9/" in p or "/data/" in p]
    relay.push_outputs(req, written)
    after = FlowDataStore("F", None, storage_impl=LocalStorage, ds_root=req.remote_root)
    task = after.get_task_datastore("5", "b", "9", mode="r")
    assert task["y"] == 41 and task["z"] == "new"
    assert all(os.stat(p).st_ino == inode for p, inode in known.items())  # never written again


def test_metadata_records_name_the_remote_datastore(req):
    mirror, remote = req.location.root, req.remote_root
    artifact = {"name": "x", "ds_type": "local", "location": f":root:{mirror}", "sha": "ab"}
    records = [{"field_name": "ds-type", "value": "local"}, {"field": "ds-root", "value": mirror}, {"field": "attempt"}]
    req = type(req)(**{**req.__dict__, "datastore": "s3", "remote_root": "s3://b/p"})
    assert json.loads(relay.rewrite_meta(json.dumps(artifact).encode(), req)) == {
        **artifact, "ds_type": "s3", "location": ":root:s3://b/p"
    }  # fmt: skip
    assert json.loads(relay.rewrite_meta(json.dumps(records).encode(), req)) == [
        {"field_name": "ds-type", "value": "s3"}, {"field": "ds-root", "value": "s3://b/p"}, {"field": "attempt"}
    ]  # fmt: skip
    assert remote != "s3://b/p"


def test_done_is_pushed_last_and_a_failed_push_leaves_no_done(req, monkeypatch):
    write_task(req.location.root, "b", "9", {"y": 1})
    written = [p for p in files_under(req.location.root) if "/b/9/" in p or "/data/" in p]
    saved: list[str] = []

    class Recording(LocalStorage):
        def save_bytes(self, path_and_bytes_iter, overwrite=False, len_hint=0):
            items = list(path_and_bytes_iter)
            saved.extend(path for path, _ in items)
            if fail and items[-1][0].endswith("data.json"):
                raise OSError("the store went away")
            return super().save_bytes(iter(items), overwrite=overwrite, len_hint=len_hint)

    monkeypatch.setattr(relay, "_storage", lambda datastore, root: Recording(root))
    fail = False
    relay.push_outputs(req, written)
    assert saved[-1].endswith("0.DONE.lock") and sum(p.endswith("DONE.lock") for p in saved) == 1
    fail, saved[:] = True, []
    done = Path(req.remote_root, "F", "5", "b", "9", "0.DONE.lock")
    done.unlink()
    with pytest.raises(relay.RelayError, match=r"Could not save the task's outputs.*the store went away"):
        relay.push_outputs(req, written)
    assert not done.exists()
