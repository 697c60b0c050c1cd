"""Fault injection shared by the wire emulators: what to break, and how often.

Layer: tests-shared/emulators. Imports: the standard library.

Each emulator subclasses ``Faults`` with the faults only it has; ``add_flags``/``from_flags`` give
every field a command-line flag (``--rate-429``, ``--fault-match``...), and ``POST /_emulator/faults``
changes them at run time through ``Faults.update``.
"""

from __future__ import annotations

import argparse
import dataclasses
import threading
from collections.abc import Mapping
from typing import Any

FAULT_LOCK = threading.Lock()
_TYPES = {"float": float, "int": int, "str": str}


@dataclasses.dataclass
class Faults:
    latency_ms: float = dataclasses.field(default=0.0, metadata={"help": "added to every request"})
    rate_429: float = dataclasses.field(default=0.0, metadata={"help": "fraction of requests answered 429"})
    rate_503: float = dataclasses.field(default=0.0, metadata={"help": "fraction of requests answered 503"})
    die_next: int = dataclasses.field(default=0, metadata={"help": "the next N matching commands' sandboxes die"})
    die_after_s: float = dataclasses.field(default=0.5, metadata={"help": "... this long after the command starts"})
    stall_next: int = dataclasses.field(default=0, metadata={"help": "the next N matching output streams stall"})
    match: str = dataclasses.field(default="", metadata={"help": "faults hit only commands containing this"})

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per fault: ``--<field-name>`` (``--fault-match`` for ``match``)."""
        for f in dataclasses.fields(cls):
            flag = "--fault-match" if f.name == "match" else f"--{f.name.replace('_', '-')}"
            parser.add_argument(flag, dest=f.name, type=_TYPES[str(f.type)], default=f.default, help=f.metadata["help"])

    @classmethod
    def from_flags(cls, args: argparse.Namespace) -> Faults:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

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
