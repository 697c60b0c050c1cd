"""Fixtures for testing against the E2B wire emulator (``emulators/e2b_emulator.py``).

Layer: tests-shared. Imports: pytest, the standard library and ``sandbox_testing.emulators``.

``e2b_emulator`` (session scope, so one per xdist worker) yields the emulator's URL; the
``emulator_env`` mapping is what a subprocess (e.g. a Metaflow flow) needs to reach it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .emulators import emulator_state, set_faults, start_emulator

EMULATOR_API_KEY = "e2b_" + "0" * 40
# E2B's default 300 s sandbox lifetime, scaled down for e2e runs (``--max-lifetime`` of the emulator).
E2B_E2E_LIFETIME_S = 10


def emulator_env(url: str) -> dict[str, str]:
    """Environment variables that point the E2B SDK (and so the e2b backend) at the emulator."""
    return {"E2B_API_URL": url, "E2B_SANDBOX_URL": url, "E2B_API_KEY": EMULATOR_API_KEY}


@pytest.fixture(scope="session")
def e2b_emulator() -> Iterator[str]:
    """A running E2B emulator (default settings) for this test session (one per xdist worker)."""
    with start_emulator("e2b") as url:
        yield url


__all__ = [
    "E2B_E2E_LIFETIME_S",
    "EMULATOR_API_KEY",
    "e2b_emulator",
    "emulator_env",
    "emulator_state",
    "set_faults",
    "start_emulator",
]
