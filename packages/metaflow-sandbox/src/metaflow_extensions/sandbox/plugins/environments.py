"""An environment built once per run: the first sandboxed task that bootstraps it (``uv sync`` for
``--environment=uv``) sends it back, and later tasks of the run get it with their inputs, so their
bootstrap finds it in sync instead of building it again.

Layer: plugins (used by ``reroute`` in the runtime and by ``executor``/``task_script`` in the
launcher). Imports: the core API, ``plugins.code_cache`` and the standard library — never
metaflow, which the launcher process does not load.

The built environment is the directories the bootstrap leaves in the code directory (``.venv``,
and ``uv_install`` where Metaflow's bootstrap had to download uv), as a tar in the code cache
(``code_cache``: bounded, least recently used out first, never evicted while a run uses it). Its
key is everything the build depends on: the code package (which holds ``uv.lock`` and
``pyproject.toml``), the bootstrap commands, the backend with its options and image (the sandbox's
system and paths), and the launcher's Python (which the local backend's sandboxes run). Only a task
that exits 0 sends its environment back: a failed step may have left it half built. Tasks that
start before the first one is back (a foreach's first wave) build their own, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from metaflow_extensions.sandbox.core import Sandbox, SandboxFileNotFound

from . import code_cache

# Environments whose bootstrap builds into the code directory, and what it leaves there.
BUILT_DIRS = {"uv": (".venv", "uv_install")}
IN_FILE = "mfsbx/env.tar"  # a built environment, uploaded next to the inputs
OUT_FILE = "mfsbx/env-out.tar"  # the environment this task built, for the launcher to keep
REUSED = "Reusing the environment an earlier task of this run built"


def cache_entry(
    environment: str,
    bootstrap: Sequence[str],
    *,
    package_digest: str,
    backend: str,
    options: Mapping[str, Any],
    image: str | None,
) -> str:
    """Where the built environment of these inputs lives in the code cache ("" when this
    environment builds nothing reusable into the code directory)."""
    if environment not in BUILT_DIRS or not bootstrap:
        return ""
    key = json.dumps(
        [environment, package_digest, list(bootstrap), backend, dict(options), image, sys.executable, sys.version],
        sort_keys=True,
    )
    return os.path.join(code_cache.cache_dir(), f"{hashlib.sha1(key.encode()).hexdigest()}.env.tar")


def upload_built(sbx: Sandbox, entry: str) -> bool:
    """Upload the environment an earlier task built, if there is one (it stays in the cache while
    this process lives); True when the sandbox got it."""
    if not entry or not code_cache.use(entry):
        return False
    sbx.upload(entry, IN_FILE)
    return True


def keep_built(sbx: Sandbox, entry: str) -> None:
    """Bring the environment this task built back into the cache, unless another task was first."""
    if os.path.exists(entry):
        return
    folder = os.path.dirname(entry)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".env-{uuid.uuid4().hex[:12]}.tar")  # a dot: a dead builder's, swept
    try:
        sbx.download(OUT_FILE, tmp)
    except SandboxFileNotFound:
        return  # nothing built here (the bootstrap found uv elsewhere, or the task failed)
    try:
        code_cache.publish(tmp, entry)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def shell(environment_entry: str, reused: bool, dirs: Sequence[str]) -> tuple[str, str]:
    """(shell run in the code directory before the step, shell run after it with the step's exit
    code in ``$c``): unpack the environment an earlier task built, or pack the one this task built."""
    if not environment_entry:
        return "", ""
    if reused:
        return f'tar -x -f ../{IN_FILE} && rm -f ../{IN_FILE} && echo "{REUSED} ({", ".join(dirs)})."', ""
    names = " ".join(dirs)
    pack = (
        f'if [ "$c" -eq 0 ]; then e=$(for d in {names}; do [ -d "$d" ] && echo "$d"; done); '
        f'[ -n "$e" ] && tar -c -f ../{OUT_FILE} $e 2>/dev/null || rm -f ../{OUT_FILE}; fi'
    )
    return "", pack


def refusal(environment: str, decos: Sequence[Any], datastore: str, network: bool) -> str:
    """Why a step's ``@pypi``/``@conda`` environment cannot be bootstrapped in a sandbox, naming
    the fix ("" when it can). Metaflow's bootstrap (as under ``@batch``) downloads micromamba
    from the network and reads the environment's packages from the datastore, where the runtime
    caches them before the run: only a remote datastore has them."""
    active = [d.name for d in decos if d.name in ("pypi", "conda") and not d.attributes.get("disabled")]
    if environment not in ("conda", "pypi") or not active:
        return ""
    if datastore == "local":
        return (
            f"@{active[0]} needs a remote datastore in a sandbox: Metaflow's bootstrap there reads the "
            "environment's packages from the datastore, where the run caches them only when it is remote "
            "(as with @batch). Run with --datastore=s3, or use --environment=uv (it works on the local "
            "datastore), or put the dependencies in the image or in the Python you launch the flow with "
            "(the local backend's sandboxes use it)."
        )
    if not network:
        return (
            f"@{active[0]} with network=False: Metaflow's bootstrap in the sandbox downloads micromamba "
            "and reads the packages from the datastore over the network. Allow the network "
            "(network=True), or put the dependencies in the image."
        )
    return ""
