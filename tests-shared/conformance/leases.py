"""The lease check shared by the provider conformance tests: an orphan dies, a live owner's lives.

Layer: tests-shared. Imports: the standard library and the core API.
"""

from __future__ import annotations

import subprocess
import sys
import time

from metaflow_extensions.sandbox.core import SandboxBackend, SandboxSpec

LABELS = {"lease": "test"}
ORPHAN = """
import json, sys, time
from metaflow_extensions.sandbox.core import get_backend, SandboxSpec
backend = get_backend(sys.argv[1], **json.loads(sys.argv[2]))
print(backend.create(SandboxSpec(labels={"lease": "test"})).id, flush=True)
time.sleep(600)
"""


def orphan_dies_while_the_live_owner_keeps_its_sandbox(backend: SandboxBackend, options_json: str) -> None:
    """With a short ``METAFLOW_SANDBOX_LEASE_S`` set: a sandbox whose owner is SIGKILLed disappears
    at the provider, while one made *earlier* by this live process is still there and usable.

    The emulators expire idle sandboxes oldest first, so once the orphan is gone, ours would be
    gone too had its lease not been renewed.
    """
    with backend.create(SandboxSpec(labels=LABELS)) as kept:
        owner = subprocess.Popen(
            [sys.executable, "-c", ORPHAN, backend.name, options_json], stdout=subprocess.PIPE, text=True
        )
        assert owner.stdout is not None
        orphan = owner.stdout.readline().strip()
        owner.kill()  # SIGKILL: no clean-up of any kind, only the lease
        owner.wait(60)
        listed = {orphan}
        for _ in range(600):  # a bound, not a timing: the orphan goes when its lease runs out
            listed = {i.id for i in backend.list(labels=LABELS)}
            if orphan not in listed:
                break
            time.sleep(0.1)
        assert orphan not in listed and kept.id in listed
        assert kept.run("echo alive").stdout == "alive\n"
