"""Shared test helpers: emulator launchers and fixtures, flow runners (layer: tests-shared)."""
