"""The relay data path on a remote datastore, launcher side: the sandboxed task runs against a local
datastore *mirror* (no credentials, no network needed); the launcher fills the mirror from the
remote datastore before the task and pushes the task's outputs from it afterwards.

Layer: plugins (bottom: used by the executor and ``logs``). Imports: the standard library,
``plugins.staging`` and ``plugins.direct``; metaflow lazily, inside the functions below (as in
``direct``: only on this path, so the local datastore's launcher stays Metaflow-free).

Why a mirror and not an S3 view of the datastore: an S3 view means an endpoint the sandbox can
reach, which is what a network-less sandbox or a loopback MinIO lacks. A local mirror keeps every
other piece of the local relay path as it is (inbound and outbound archives, the verified merge),
and the datastore's files are location-independent: only the metadata records name the datastore
(``ds-type``/``ds-root`` and each artifact's ``ds_type``/``location``), and ``rewrite_meta``
turns the mirror's names into the remote ones before any record leaves the launcher.

Bytes move with Metaflow's own storage classes (``S3Storage`` and ``LocalStorage``: the same
client, retries, endpoint and blob metadata a plain run uses), never a second S3 client:

- in: each parent's latest DONE attempt (``attempt.json``, ``DONE.lock``, ``data.json``), the
  blobs its ``data.json`` names, and the run's ``_self.json`` files from the local metadata;
- out, in this order: the new blobs (``overwrite=False``: a blob the datastore has is never
  uploaded again), the task's attempt files and its cards, and ``DONE.lock`` last, so an attempt
  whose push stops half way is never visible as done (a task that raised is recorded as Metaflow
  records one: its data, then DONE, with ``_task_ok`` False).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import direct
from .staging import DONE, META, TaskLocation

if TYPE_CHECKING:
    from .request import TaskRequest

_ROOT_TAG = ":root:"  # an artifact's ``location`` in the metadata: ``:root:<datastore root>``
# ``S3Storage`` moves up to 10 keys per call in this process and more through a pool of ``s3op``
# subprocesses, whose start-up (seconds on a busy machine) dwarfs a task's few small artifacts.
IN_PROCESS = 10


class RelayError(direct.DirectError):
    """Moving a task's data between the remote datastore and the mirror failed (the message says which)."""


def is_remote_relay(req: TaskRequest) -> bool:
    return req.data_path == "relay" and req.datastore != "local"


def remote_location(req: TaskRequest) -> TaskLocation:
    """The task's location on the remote datastore (its ``TaskLocation`` is the mirror's)."""
    return replace(req.location, root=req.remote_root, card_root=req.remote_card_root or None)


def _storage(datastore: str, root: str) -> Any:
    from metaflow.plugins import DATASTORES

    cls = next(d for d in DATASTORES if datastore == d.TYPE)
    return cls(root)


def _chunks(keys: list[str]) -> list[list[str]]:
    return [keys[i : i + IN_PROCESS] for i in range(0, len(keys), IN_PROCESS)]


def _copy(source: Any, target: Any, keys: list[str], *, overwrite: bool) -> None:
    """Copy ``keys`` (paths relative to both roots) with their storage metadata, in order."""
    for chunk in _chunks(keys):
        _copy_chunk(source, target, chunk, overwrite=overwrite)


def _copy_chunk(source: Any, target: Any, keys: list[str], *, overwrite: bool) -> None:
    with source.load_bytes(keys) as loaded:

        def contents() -> Iterable[tuple[str, Any]]:
            for key, path, meta in loaded:
                if path is None:
                    raise RelayError(f"{key} is missing from {source.datastore_root}.")
                with open(path, "rb") as f:  # storages read file objects (ContentAddressedStore's BytesIO)
                    data = io.BytesIO(f.read())
                yield key, ((data, meta) if meta else data)

        target.save_bytes(contents(), overwrite=overwrite, len_hint=len(keys))


def fetch_inputs(req: TaskRequest) -> None:
    """Fill the mirror with what the task reads (see the module docstring), from the remote datastore."""
    loc = req.location
    try:
        remote = _storage(req.datastore, req.remote_root)
        mirror = _storage("local", loc.root)
        task_keys = [
            f"{prefix}/{attempt}.{suffix}"
            for pathspec, prefix, attempt in _latest_done_attempts(req, remote)
            for suffix in ("attempt.json", "data.json", "DONE.lock")
        ]
        _copy(remote, mirror, task_keys, overwrite=True)
        blobs: set[str] = set()
        for key in task_keys:
            if key.endswith(".data.json"):
                with open(os.path.join(loc.root, key)) as f:
                    blobs.update(json.load(f).get("objects", {}).values())
        blob_keys = [os.path.relpath(os.path.join(loc.blob_dir, sha[:2], sha), loc.root) for sha in sorted(blobs)]
        _copy(remote, mirror, blob_keys, overwrite=True)
    except RelayError:
        raise
    except Exception as e:  # storage failures of any kind
        raise RelayError(f"Could not read the task's inputs from the {req.datastore} datastore: {e}") from e
    _copy_self_metadata(req)


def _latest_done_attempts(req: TaskRequest, remote: Any) -> list[tuple[str, str, int]]:
    """(input path, task prefix, its latest attempt with a DONE marker) of each parent. One
    existence check of every possible marker rather than a listing per parent: Metaflow's S3
    client lists in a subprocess per call, and a join has many parents."""
    from metaflow.metaflow_config import MAX_ATTEMPTS

    parents = []
    for pathspec in req.input_paths:
        run_id, step, task_id = pathspec.split("/")[-3:]
        parents.append((pathspec, f"{req.location.flow}/{run_id}/{step}/{task_id}"))
    markers = [f"{prefix}/{attempt}.DONE.lock" for _, prefix in parents for attempt in range(MAX_ATTEMPTS)]
    exists = iter([found for chunk in _chunks(markers) for found in remote.is_file(chunk)])
    found = []
    for pathspec, prefix in parents:
        done = [attempt for attempt in range(MAX_ATTEMPTS) if next(exists)]
        if not done:
            raise RelayError(f"The input task {pathspec} has no completed attempt in {req.remote_root}.")
        found.append((pathspec, prefix, max(done)))
    return found


def _copy_self_metadata(req: TaskRequest) -> None:
    """The ``_self.json`` of the flow, run, steps and task the runtime registered in its local
    metadata, into the mirror (the task's local metadata provider and the Client API read them)."""
    if not req.metadata_root:
        return
    loc = req.location
    steps = {loc.step} | {p.split("/")[-2] for p in req.input_paths}
    relatives = [(), (loc.run_id,), (loc.run_id, loc.step, loc.task_id), *((loc.run_id, s) for s in sorted(steps))]
    for parts in relatives:
        relative = os.path.join(loc.flow, *parts, META, "_self.json")
        source = os.path.join(req.metadata_root, relative)
        if os.path.isfile(source):
            target = os.path.join(loc.root, relative)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(source, target)


def push_outputs(req: TaskRequest, written: Iterable[str]) -> None:
    """Push what the merge wrote into the mirror (``written``: absolute paths) to the remote
    datastore: blobs, attempt files and cards, ``DONE.lock`` last. Metadata files stay out (they
    go to the metadata provider, rewritten)."""
    loc = req.location
    blob_prefix = loc.blob_dir + "/"
    task_prefix = loc.task_dir + "/"
    card_root = (loc.card_root or "").rstrip("/") + "/"
    blobs: list[str] = []
    files: list[str] = []
    cards: list[str] = []
    done: list[str] = []
    for path in written:
        if path.startswith(blob_prefix):
            if not path.endswith(META):  # LocalStorage's sidecar ``<blob>_meta``: travels as the blob's metadata
                blobs.append(os.path.relpath(path, loc.root))
        elif path.startswith(task_prefix):
            relative = os.path.relpath(path, loc.root)
            if f"/{META}/" in f"/{os.path.relpath(path, loc.task_dir)}":
                continue
            (done if DONE.match(os.path.basename(path)) else files).append(relative)
        elif loc.card_root and path.startswith(card_root):
            cards.append(os.path.relpath(path, loc.card_root))
    try:
        remote = _storage(req.datastore, req.remote_root)
        mirror = _storage("local", loc.root)
        _copy(mirror, remote, blobs, overwrite=False)  # content-addressed: never uploaded twice
        _copy(mirror, remote, files, overwrite=True)
        if cards:
            if not req.remote_card_root:
                raise RelayError("the datastore has no card root (set METAFLOW_CARD_S3ROOT)")
            _copy(
                _storage("local", loc.card_root or ""),
                _storage(req.datastore, req.remote_card_root),
                cards,
                overwrite=True,
            )
        _copy(mirror, remote, done, overwrite=True)
    except Exception as e:  # storage failures of any kind; without DONE the attempt is not visible as done
        raise RelayError(f"Could not save the task's outputs to the {req.datastore} datastore: {e}") from e


def rewrite_meta(data: bytes, req: TaskRequest) -> bytes:
    """A metadata record the task wrote against the mirror, naming the remote datastore instead."""
    try:
        doc = json.loads(data)
    except ValueError:
        return data
    mirror, remote = req.location.root, req.remote_root

    def fix(record: Any) -> Any:
        if isinstance(record, list):
            return [fix(r) for r in record]
        if not isinstance(record, dict):
            return record
        record = dict(record)
        if record.get("ds_type") == "local":
            record["ds_type"] = req.datastore
        if record.get("location") == f"{_ROOT_TAG}{mirror}":
            record["location"] = f"{_ROOT_TAG}{remote}"
        # A metadatum: ``field_name`` in the local provider's files, ``field`` in the service's bodies.
        name = record.get("field_name", record.get("field"))
        if name == "ds-type" and record.get("value") == "local":
            record["value"] = req.datastore
        if name == "ds-root" and record.get("value") == mirror:
            record["value"] = remote
        return record

    return json.dumps(fix(doc)).encode()


def local_metadata(req: TaskRequest, written: Iterable[str]) -> None:
    """Copy the task's metadata files from the mirror into the launcher's ``.metaflow``, rewritten."""
    if not req.metadata_root:
        return
    loc = req.location
    members = {}
    for path in written:
        relative = os.path.relpath(path, loc.root)
        name = os.path.join(direct.LOCAL_DIR, relative)
        if f"/{META}/" in f"/{relative}" and direct.allowed_metadata(name, loc):
            with open(path, "rb") as f:
                members[name] = rewrite_meta(f.read(), req)
    direct.write_local_metadata(members, req.metadata_root, loc)


def remove_mirror(req: TaskRequest) -> None:
    """The mirror is private to the attempt (``reroute`` made its parent directory)."""
    shutil.rmtree(os.path.dirname(req.location.root.rstrip("/")), ignore_errors=True)
