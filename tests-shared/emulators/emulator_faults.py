"""Fault injection shared by the wire emulators: what to break, and how often.

Layer: tests-shared/emulators. Imports: the standard library.

Each emulator subclasses ``Faults`` with the faults only it has, sets it from its flags, and lets
``POST /_emulator/faults`` change it at run time through ``Faults.update``.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from typing import Any

FAULT_LOCK = threading.Lock()
_TYPES = {"float": float, "int": int, "str": str}


@dataclasses.dataclass
class Faults:
    latency_ms: float = 0.0  # added to every request
    rate_429: float = 0.0  # fraction of control-plane requests answered 429
    rate_503: float = 0.0  # ... and 503
    die_next: int = 0  # the next N matching commands' sandboxes die after die_after_s
    die_after_s: float = 0.5
    stall_next: int = 0  # the next N matching commands' output streams stall
    match: str = ""  # only commands containing this string are hit

    def __post_init__(self) -> None:
        # Flags and JSON give ints for floats (``0``); coerce by the declared type, not the value's.
        self.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def take(self, kind: str, command: str) -> bool:
        """Consume one ``<kind>_next`` fault if one is pending for ``command``."""
        with FAULT_LOCK:
            left = getattr(self, f"{kind}_next")
            if left > 0 and self.match in command:
                setattr(self, f"{kind}_next", left - 1)
                return True
        return False

    def update(self, changes: Mapping[str, Any]) -> str | None:
        """Apply ``changes`` (JSON values, coerced to each field's type); the error, if any."""
        types = {f.name: _TYPES[str(f.type)] for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - set(types))
        if unknown:
            return f"unknown fault {unknown[0]!r}"
        with FAULT_LOCK:
            for key, value in changes.items():
                setattr(self, key, types[key](value))
        return None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
