"""The direct data path, launcher side: what the launcher still does for a task that read and wrote
a remote datastore itself — save its captured logs there, and copy its local metadata back.

Layer: plugins (bottom: used by the executor). Imports: the standard library; metaflow lazily,
inside the functions below.

Why metaflow here, in the launcher that otherwise never loads it: these two steps write and read
Metaflow's remote datastore formats (``TaskDataStore.save_logs`` and the ``local_metadata``
tarball of ``sync_local_metadata_to_datastore``) through Metaflow's own storage classes, which
know S3 (and later Azure) with their configuration, retries and endpoints. Reimplementing that
would be a second S3 client to keep in step with Metaflow's. They run after the task, only on
the direct path; the local datastore's launcher stays Metaflow-free.

The metadata tarball comes from the sandbox and is not trusted: only this task's own metadata
files, and the ``_self.json`` of its flow, run and step when missing, are written, and never over
an existing file.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .staging import CODE_PREFIX, TaskLocation

if TYPE_CHECKING:
    from .request import TaskRequest

TASK_LOG_SOURCE = "task"  # metaflow.mflog.TASK_LOG_SOURCE
METADATA_KEY = "local_metadata"  # the attempt metadata sync_local_metadata_to_datastore writes
LOCAL_DIR = ".metaflow"  # metaflow_config.DATASTORE_LOCAL_DIR, the tarball's top directory


class DirectError(Exception):
    """A datastore operation of the launcher failed on the direct path (the message says which)."""


def metadata_inputs(req: TaskRequest) -> dict[str, str]:
    """The run's local metadata the task (and the card it renders, through the Client API) needs
    in the sandbox: the ``_self.json`` of its flow, run, step and task, as inbound archive members
    under ``code/.metaflow/`` (the sandbox's local metadata root, see ``executor``)."""
    if not req.metadata_root:
        return {}
    loc = req.location
    found = {}
    for parts in ((), (loc.run_id,), (loc.run_id, loc.step), (loc.run_id, loc.step, loc.task_id)):
        relative = os.path.join(loc.flow, *parts, "_meta", "_self.json")
        path = os.path.join(req.metadata_root, relative)
        if os.path.isfile(path):
            found[f"{CODE_PREFIX}/{LOCAL_DIR}/{relative}"] = path
    return found


def _task_datastore(datastore: str, loc: TaskLocation, attempt: int, mode: str, **kwargs: Any) -> Any:
    from metaflow.datastore import FlowDataStore
    from metaflow.plugins import DATASTORES

    storage = next(d for d in DATASTORES if datastore == d.TYPE)
    flow_datastore = FlowDataStore(loc.flow, None, storage_impl=storage, ds_root=loc.root)
    return flow_datastore.get_task_datastore(loc.run_id, loc.step, loc.task_id, attempt, mode=mode, **kwargs)


def save_task_logs(datastore: str, loc: TaskLocation, attempt: int, logs: dict[str, bytes]) -> None:
    """Save the attempt's captured logs as the task's own would be (``mflog/save_logs.py``)."""
    try:
        _task_datastore(datastore, loc, attempt, "w").save_logs(TASK_LOG_SOURCE, logs)
    except Exception as e:  # any storage failure: the caller reports it, the task's result stands
        raise DirectError(f"Could not save the task's logs to the {datastore} datastore: {e}") from e


def sync_local_metadata(req: TaskRequest) -> None:
    """Copy the attempt's local metadata from the datastore into the launcher's ``.metaflow``
    (``req.metadata_root``), as ``@batch`` does with ``sync_local_metadata_from_datastore``."""
    if not req.metadata_root:
        return
    merge_local_metadata(_metadata_tarball(req), req.metadata_root, req.location)


def task_meta_files(req: TaskRequest) -> dict[str, bytes]:
    """The task's own ``_meta`` files (name -> bytes) from the local metadata it saved to the
    datastore: what the relayed metadata service replays (``service_relay``)."""
    loc = req.location
    wanted = (LOCAL_DIR, loc.flow, loc.run_id, loc.step, loc.task_id, "_meta")
    found = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(_metadata_tarball(req)), mode="r:gz") as tar:
            for member in tar:
                parts = Path(member.name).parts
                if member.isfile() and len(parts) == len(wanted) + 1 and parts[:-1] == wanted:
                    source = tar.extractfile(member)
                    if source is not None:
                        found[parts[-1]] = source.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DirectError(f"The task's local metadata is unreadable: {e}") from e
    return found


def _metadata_tarball(req: TaskRequest) -> bytes:
    """The ``local_metadata`` tarball the task saved to the datastore (its decorator's ``task_finished``)."""
    loc = req.location
    try:
        task_ds = _task_datastore(req.datastore, loc, req.attempt, "r", allow_not_done=True)
        if not task_ds.has_metadata(METADATA_KEY):
            raise DirectError(f"The task {loc.flow}/{loc.run_id}/{loc.step}/{loc.task_id} saved no local metadata.")
        key = task_ds.load_metadata([METADATA_KEY])[METADATA_KEY]
        _, tarball = next(task_ds.parent_datastore.load_data([key]))
    except DirectError:
        raise
    except Exception as e:  # storage failures of any kind
        raise DirectError(f"Could not read the task's metadata from the {req.datastore} datastore: {e}") from e
    return bytes(tarball)


def allowed_metadata(name: str, loc: TaskLocation) -> bool:
    """Whether the tarball member ``name`` (``.metaflow/<flow>/...``) is this task's metadata."""
    parts = Path(name).parts
    if ".." in parts or len(parts) < 3 or parts[0] != LOCAL_DIR or parts[1] != loc.flow:
        return False
    rest = parts[2:]
    task = (loc.run_id, loc.step, loc.task_id)
    if rest[:3] == task and len(rest) > 3:
        return True
    # The _self.json of the flow, the run and the step.
    return rest[-2:] == ("_meta", "_self.json") and rest[:-2] == task[: len(rest) - 2] and len(rest) <= 4


def merge_local_metadata(tarball: bytes, metadata_root: str, loc: TaskLocation) -> list[str]:
    """Write the task's metadata files from ``tarball`` under ``metadata_root`` (see the module
    docstring for what is accepted); returns the paths written."""
    members = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
            for member in tar:
                if member.isfile() and allowed_metadata(member.name, loc):
                    source = tar.extractfile(member)
                    assert source is not None
                    members[member.name] = source.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DirectError(f"The task's local metadata is unreadable: {e}") from e
    return write_local_metadata(members, metadata_root, loc)


def write_local_metadata(members: dict[str, bytes], metadata_root: str, loc: TaskLocation) -> list[str]:
    """Write each member (``.metaflow/<flow>/...`` -> bytes) this task may write (``allowed_metadata``)
    under ``metadata_root``, atomically and never over an existing file; returns the paths written."""
    written = []
    try:
        for name, data in members.items():
            if not allowed_metadata(name, loc):
                continue
            relative = os.path.join(*Path(name).parts[1:])
            path = os.path.join(metadata_root, relative)
            if os.path.exists(path):
                continue  # written by the runtime or an earlier copy: the launcher's wins
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            written.append(path)
    except OSError as e:
        raise DirectError(f"Could not write the task's local metadata: {e}") from e
    return written
