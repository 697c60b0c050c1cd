"""Every difference between the Metaflow releases we support (2.12.x to 2.19.x), in one place.

Layer: plugins (bottom of the integration). Imports: metaflow, lazily where the import is heavy.

Each shim names the versions it serves, so it can be deleted when the oldest supported release
moves past them. What needs no shim, on purpose:

- ``Decorator.init()`` is absent up to 2.12.36 and, from 2.16, only called when defined on the class
  itself: the decorators here do all their work in ``step_init`` and define no ``init``.
- StepDecorator hook signatures are identical from 2.12.0 to 2.19.x; the ``*_ctx`` hook variants
  (2.19.23+) are not used.
"""

from __future__ import annotations

import json
from typing import Any


def metadatum(field: str, value: str, type_: str, tags: list[str]) -> Any:
    """A ``MetaDatum``: ``metaflow.metadata`` was renamed ``metaflow.metadata_provider`` at 2.12.29."""
    try:
        from metaflow.metadata_provider import MetaDatum  # 2.12.29+
    except ImportError:  # 2.12.0 - 2.12.28
        from metaflow.metadata import MetaDatum  # type: ignore[no-redef,unused-ignore]
    return MetaDatum(field=field, value=value, type=type_, tags=tags)


def sync_local_metadata_to_datastore(metadata_local_dir: str, task_datastore: Any) -> None:
    """Metaflow's own upload of a task's local metadata (what ``@batch`` calls in its container):
    ``metaflow.metadata.util`` became ``metaflow.metadata_provider.util`` at 2.12.29."""
    try:
        from metaflow.metadata_provider.util import sync_local_metadata_to_datastore as sync  # 2.12.29+
    except ImportError:  # 2.12.0 - 2.12.28
        from metaflow.metadata.util import sync_local_metadata_to_datastore as sync  # type: ignore[no-redef,unused-ignore]
    sync(metadata_local_dir, task_datastore)


def package_metadata(package: Any) -> str:
    """The code package's format description: ``package.package_metadata`` exists from 2.16; up to
    2.15 the package is a flat tarball and there is none (empty string)."""
    return getattr(package, "package_metadata", None) or ""


def package_blob(package: Any) -> bytes:
    """The code package bytes: a ``bytearray`` up to 2.15, a property that waits for the
    asynchronous packaging thread from 2.16."""
    blob = package.blob
    return blob.getvalue() if hasattr(blob, "getvalue") else bytes(blob)


def extract_commands(pkg_metadata: str, archive: str) -> tuple[list[str], dict[str, str]]:
    """Shell commands that unpack the code package ``archive`` into the current directory, and the
    environment variables the unpacked code needs (a path value may contain ``$PWD``).

    Up to 2.15 (no metadata) the package is a flat tarball with ``metaflow/`` at its top; from 2.16
    it has ``.mf_code/`` + ``.mf_meta/`` and Metaflow tells how to extract it and set PYTHONPATH.
    """
    if not pkg_metadata:  # 2.12 - 2.15
        return [f"TAR_OPTIONS=--warning=no-timestamp tar xf {archive}"], {}
    from metaflow.package import MetaflowPackage  # 2.16+

    cmds = MetaflowPackage.get_extract_commands(pkg_metadata, archive, dest_dir=".")
    env: dict[str, str] = {}
    for key, value in MetaflowPackage.get_post_extract_env_vars(pkg_metadata, dest_dir="$PWD").items():
        # A trailing ':' on the key means "replace", otherwise "prepend to the existing value".
        env[key.rstrip(":")] = value if key.endswith(":") else f"{value}:${{{key}:-}}"
    return list(cmds), env


def package_is_tar(pkg_metadata: str) -> bool:
    """Whether the code package is a (gzipped) tarball whose files can be shipped directly: always
    up to 2.15; from 2.16 when its ``archive_format`` is ``tgz`` (the default packaging backend)."""
    if not pkg_metadata:  # 2.12 - 2.15
        return True
    return bool(json.loads(pkg_metadata).get("archive_format", "tgz") == "tgz")
