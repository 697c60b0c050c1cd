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
_EPSILON = 1e-9  # 0.2 added five times is 0.9999999999999999
_TYPES = {"float": float, "int": int, "str": str}


@dataclasses.dataclass
class Faults:
    latency_ms: float = dataclasses.field(default=0.0, metadata={"help": "added to every request"})
    rate_429: float = dataclasses.field(default=0.0, metadata={"help": "fraction of requests answered 429"})
    rate_503: float = dataclasses.field(default=0.0, metadata={"help": "fraction of requests answered 503"})
    # Running totals that spread the refused requests evenly instead of at random: with rates summing
    # to at most 0.5, no two requests in a row are refused, so a client that retries always gets
    # through and a fault test cannot flake, yet every few requests still meets a fault.
    _owed: float = dataclasses.field(default=0.0, repr=False, metadata={"internal": True})
    _share_429: float = dataclasses.field(default=0.0, repr=False, metadata={"internal": True})
    refused: int = dataclasses.field(default=0, metadata={"internal": True})
    die_next: int = dataclasses.field(default=0, metadata={"help": "the next N matching commands' sandboxes die"})
    die_after_s: float = dataclasses.field(default=0.5, metadata={"help": "... this long after the command starts"})
    stall_next: int = dataclasses.field(default=0, metadata={"help": "the next N matching output streams stall"})
    match: str = dataclasses.field(default="", metadata={"help": "faults hit only commands containing this"})

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per fault: ``--<field-name>`` (``--fault-match`` for ``match``)."""
        for f in _settable(cls):
            flag = "--fault-match" if f.name == "match" else f"--{f.name.replace('_', '-')}"
            parser.add_argument(flag, dest=f.name, type=_TYPES[str(f.type)], default=f.default, help=f.metadata["help"])

    @classmethod
    def from_flags(cls, args: argparse.Namespace) -> Faults:
        return cls(**{f.name: getattr(args, f.name) for f in _settable(cls)})

    def __post_init__(self) -> None:
        # Flags and JSON give ints for floats (``0``); coerce by the declared type, not the value's.
        self.update({f.name: getattr(self, f.name) for f in _settable(self)})

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
        types = {f.name: _TYPES[str(f.type)] for f in _settable(self)}
        unknown = sorted(set(changes) - set(types))
        if unknown:
            return f"unknown fault {unknown[0]!r}"
        with FAULT_LOCK:
            for key, value in changes.items():
                setattr(self, key, types[key](value))
        return None

    def refusal(self) -> int | None:
        """The status (429 or 503) to refuse this request with, or None to serve it."""
        total = self.rate_429 + self.rate_503
        with FAULT_LOCK:
            self._owed += total
            if total <= 0 or self._owed < 1 - _EPSILON:
                return None
            self._owed -= 1
            self.refused += 1
            # Alternate the two statuses in proportion to their rates.
            self._share_429 += self.rate_429 / total
            if self._share_429 >= 1 - _EPSILON:
                self._share_429 -= 1
                return 429
            return 503

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}


def _settable(faults: Any) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(faults) if not f.metadata.get("internal")]
