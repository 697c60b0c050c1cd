"""Shared test helpers: the backend conformance suite and emulator launchers (layer: tests-shared)."""
