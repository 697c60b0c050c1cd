"""Fixtures for testing against the Modal wire emulator (``emulators/modal_emulator.py``).

Layer: tests-shared. Imports: pytest, the standard library and ``sandbox_testing.emulators``.

``modal_emulator`` (session scope, so one per xdist worker) yields the emulator's URL; the
``emulator_env`` mapping is what a process running the ``modal`` SDK (e.g. a Metaflow flow) needs
to reach it. The SDK reads its settings from the environment when a client is made, so a test sets
them with ``monkeypatch`` (``use_emulator``) before its first ``modal`` call.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from .emulators import emulator_state, set_faults, start_emulator

# What the emulator accepts by default (``--token-id`` / ``--token-secret``); any other is refused.
EMULATOR_TOKEN_ID, EMULATOR_TOKEN_SECRET = "ak-emulator", "as-emulator"
NO_FAULTS: dict[str, Any] = {
    **{"latency_ms": 0, "rate_429": 0, "rate_503": 0, "create_latency_ms": 0},
    **{"fail_next": 0, "fail_rpc": "", "fail_status": "UNAVAILABLE"},
    **{"die_next": 0, "cut_next": 0, "match": ""},
}


def emulator_env(url: str) -> dict[str, str]:
    """Environment variables that point the ``modal`` SDK at the emulator."""
    return {"MODAL_SERVER_URL": url, "MODAL_TOKEN_ID": EMULATOR_TOKEN_ID, "MODAL_TOKEN_SECRET": EMULATOR_TOKEN_SECRET}


def emulated_sandboxes(url: str) -> list[dict[str, Any]]:
    """``GET /_emulator/sandboxes``: what reached the wire for each sandbox (image, tags, env,
    timeouts, cpu, memory, gpu, network), finished ones included."""
    with urllib.request.urlopen(f"{url}/_emulator/sandboxes", timeout=10) as answer:
        return list(json.load(answer))


@pytest.fixture(scope="session")
def modal_emulator() -> Iterator[str]:
    """A running Modal emulator (default settings) for this test session (one per xdist worker)."""
    with start_emulator("modal") as url:
        yield url


@pytest.fixture
def use_emulator(modal_emulator: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The emulator, fault-free, with this process's ``modal`` SDK pointed at it; checked to hold no
    live sandbox after the test."""
    for name, value in emulator_env(modal_emulator).items():
        monkeypatch.setenv(name, value)
    set_faults(modal_emulator, **NO_FAULTS)
    yield modal_emulator
    set_faults(modal_emulator, **NO_FAULTS)
    assert emulator_state(modal_emulator)["live"] == 0, "a test left a sandbox behind"


__all__ = [
    "EMULATOR_TOKEN_ID",
    "EMULATOR_TOKEN_SECRET",
    "NO_FAULTS",
    "emulated_sandboxes",
    "emulator_env",
    "emulator_state",
    "modal_emulator",
    "set_faults",
    "start_emulator",
    "use_emulator",
]
