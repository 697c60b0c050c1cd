"""The metadata service's relay, launcher side: heartbeat for a sandboxed task while it runs, and
replay the metadata it recorded locally in the sandbox to the service once it has ended.

Layer: plugins (bottom: used by the executor). Imports: ``plugins.staging`` and the standard library
only (``urllib``) — the launcher process does not load Metaflow.

On the relay path the task runs with ``--metadata local`` in the sandbox (it cannot reach the
service, or its auth headers must not enter the sandbox). Metaflow's local provider writes exactly
the JSON bodies its service provider would POST (``_metadata_to_json``, ``_artifacts_to_json``):
``sysmeta_<field>_<ts>.json`` and ``<attempt>_artifact_<name>.json`` in the task's ``_meta``
directory. The launcher POSTs them to the task's ``/artifact`` and ``/metadata`` endpoints (the
runtime registered the task itself, as for any task). They come from the sandbox: a body that names
another flow, run, step or task is refused whole (nothing is replayed) — a step cannot write
another task's metadata through the launcher.

Auth headers (``METAFLOW_SERVICE_HEADERS``, ``METAFLOW_SERVICE_AUTH_KEY``) travel in the task's
private request file and are used here only: never in a message, never in the sandbox.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tarfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

from .staging import TaskLocation

HEARTBEAT_S = 10  # Metaflow's heartbeat sidecar's interval when the service does not say
REQUEST_TIMEOUT_S = 30
_ARTIFACT = re.compile(r"^(\d+)_artifact_.+\.json$")


class RelayError(Exception):
    """The service refused or did not answer a relayed call (the message names the URL, never the headers)."""


def task_url(service_url: str, loc: TaskLocation) -> str:
    return f"{service_url.rstrip('/')}/flows/{loc.flow}/runs/{loc.run_id}/steps/{loc.step}/tasks/{loc.task_id}"


def post(url: str, headers: Mapping[str, str], body: Any) -> Any:
    """POST ``body`` as JSON with the service's headers; the decoded answer (None if empty)."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method="POST", headers={**headers, "Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as answer:
            text = answer.read()
    except urllib.error.HTTPError as e:
        raise RelayError(f"The metadata service answered {e.code} to POST {url}.") from None
    except (urllib.error.URLError, OSError) as e:
        raise RelayError(f"Cannot reach the metadata service at {url}: {getattr(e, 'reason', e)}.") from None
    try:
        return json.loads(text) if text.strip() else None
    except ValueError:
        return None


def bodies(files: Mapping[str, bytes], loc: TaskLocation) -> tuple[list[Any], list[Any]]:
    """(metadata, artifacts): the task's ``_meta`` files (name -> bytes) as the service's bodies;
    ``RelayError`` if any is unreadable or belongs to another task."""
    metadata: list[Any] = []
    artifacts: list[Any] = []
    wanted = {"flow_id": loc.flow, "run_number": loc.run_id, "step_name": loc.step, "task_id": loc.task_id}
    for name, data in sorted(files.items()):
        if name.startswith("sysmeta_"):
            into = metadata
        elif _ARTIFACT.match(name):
            into = artifacts
        else:
            continue  # _self.json and the like: the runtime registered the task itself
        try:
            datum = json.loads(data)
        except ValueError as e:
            raise RelayError(f"The task's metadata file {name} is not JSON ({e}).") from None
        if not isinstance(datum, dict) or any(
            key in datum and str(datum[key]) != value for key, value in wanted.items()
        ):
            raise RelayError(f"The task's metadata file {name} names another task: nothing was replayed.")
        into.append(datum)
    return metadata, artifacts


def replay(service_url: str, headers: Mapping[str, str], loc: TaskLocation, files: Mapping[str, bytes]) -> int:
    """Register the task's artifacts, then its metadata (``attempt_ok`` among them, as the task
    itself does last), with the service; returns how many entries were sent."""
    metadata, artifacts = bodies(files, loc)
    url = task_url(service_url, loc)
    if artifacts:
        post(f"{url}/artifact", headers, artifacts)
    if metadata:
        post(f"{url}/metadata", headers, metadata)
    return len(metadata) + len(artifacts)


def meta_files_in_archive(archive: str, loc: TaskLocation) -> dict[str, bytes]:
    """The ``_meta`` files of the task in an outbound archive (absolute paths stored without the
    leading ``/``) that the merge has already verified."""
    prefix = os.path.join(loc.task_dir, "_meta").lstrip("/") + "/"
    found = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.isfile() and member.name.startswith(prefix) and "/" not in member.name[len(prefix) :]:
                source = tar.extractfile(member)
                if source is not None:
                    found[member.name[len(prefix) :]] = source.read()
    return found


class Heartbeat:
    """The task's heartbeat, sent by the launcher while the task runs (Metaflow's sidecar would send
    it from the task): once at start, then every interval the service asks for. Best effort, as
    Metaflow's own: a missed beat is said once, never fails the task."""

    def __init__(self, service_url: str, headers: Mapping[str, str], loc: TaskLocation, say: Any):
        self.url = f"{task_url(service_url, loc)}/heartbeat"
        self.headers = dict(headers)
        self.say = say
        self.stopped = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._beat, name="mfsbx-heartbeat", daemon=True)

    def _beat(self) -> None:
        warned = False
        while True:  # at least one beat, however short the task
            wait = HEARTBEAT_S
            try:
                answer = post(self.url, self.headers, {})
                self.sent += 1
                if isinstance(answer, dict) and isinstance(answer.get("wait_time_in_seconds"), (int, float)):
                    wait = max(1, int(answer["wait_time_in_seconds"]))
            except RelayError as e:
                if not warned:
                    self.say(f"Heartbeat for the task failed ({e}); retrying.")
                    warned = True
            if self.stopped.wait(wait):
                return

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(REQUEST_TIMEOUT_S)


@contextlib.contextmanager
def heartbeat(service_url: str, headers: Mapping[str, str], loc: TaskLocation, say: Any) -> Iterator[None]:
    """Heartbeat for the task during the block when its metadata is relayed (``service_url`` set)."""
    if not service_url:
        yield
        return
    with Heartbeat(service_url, headers, loc, say):
        yield
