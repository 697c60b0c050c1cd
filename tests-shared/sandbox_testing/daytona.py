"""Fixtures for testing against the Daytona wire emulator (``emulators/daytona_emulator.py``).

Layer: tests-shared. Imports: pytest, the standard library and ``sandbox_testing.emulators``.

``daytona_emulator`` (session scope, so one per xdist worker) yields the emulator's URL; the
``emulator_env`` mapping is what a subprocess (e.g. a Metaflow flow) needs to reach it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .emulators import emulator_state, set_faults, start_emulator

EMULATOR_API_KEY = "emulator-key"  # any key works; one starting with "invalid" is rejected (401)
NO_FAULTS: dict[str, Any] = {
    **{"latency_ms": 0, "rate_429": 0, "rate_503": 0},
    **{"die_next": 0, "drop_next": 0, "stall_next": 0, "match": ""},
}


def emulator_env(url: str) -> dict[str, str]:
    """Environment variables that point the Daytona SDK (and so the daytona backend) at the emulator."""
    return {"DAYTONA_API_URL": f"{url}/api", "DAYTONA_API_KEY": EMULATOR_API_KEY}


@pytest.fixture(scope="session")
def daytona_emulator() -> Iterator[str]:
    """A running Daytona emulator (default settings) for this test session (one per xdist worker)."""
    with start_emulator("daytona") as url:
        yield url


__all__ = [
    "EMULATOR_API_KEY",
    "NO_FAULTS",
    "daytona_emulator",
    "emulator_env",
    "emulator_state",
    "set_faults",
    "start_emulator",
]
