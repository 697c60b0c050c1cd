"""Conformance of the ``modal`` backend, through the real ``modal`` SDK, against the Modal wire
emulator; plus what is specific to Modal: the spec's mapping on the wire and a refused token.

Layer: tests-shared. Imports: pytest, the standard library, core and ``sandbox_testing``.
"""

from __future__ import annotations

import os

import pytest

from metaflow_extensions.sandbox.core import OWNER_LABEL, AuthenticationError, Resources, SandboxSpec, get_backend
from metaflow_extensions.sandbox.core.conformance import BackendConformance
from sandbox_testing.modal import (
    EMULATOR_TOKEN_ID,
    EMULATOR_TOKEN_SECRET,
    emulated_sandboxes,
    emulator_state,
    modal_emulator,
    set_faults,
    use_emulator,
)

__all__ = ["modal_emulator", "use_emulator"]  # fixtures, imported so pytest finds them


def emulated(**options: object) -> object:
    return get_backend("modal", token_id=EMULATOR_TOKEN_ID, token_secret=EMULATOR_TOKEN_SECRET, **options)


class TestModalEmulated(BackendConformance):
    @pytest.fixture
    def backend(self, use_emulator):
        return emulated()

    @pytest.fixture
    def foreign_sandbox(self, use_emulator, labels):
        import modal

        app = modal.App.lookup("metaflow-sandbox", create_if_missing=True)
        made = modal.Sandbox.create(app=app, tags=labels, timeout=60)
        yield made.object_id
        made.terminate()


def test_a_refused_token_is_a_final_authentication_error(use_emulator):
    backend = get_backend("modal", token_id="ak-wrong", token_secret="as-wrong")
    with pytest.raises(AuthenticationError, match="MODAL_TOKEN_ID") as info:
        backend.create(SandboxSpec())
    assert not info.value.transient


def test_the_spec_reaches_the_wire_as_modal_settings(use_emulator, monkeypatch):
    monkeypatch.setenv("METAFLOW_SANDBOX_LEASE_S", "120")
    spec = SandboxSpec(
        labels={"flow": "F"}, env={"E": "x y"}, network=False, lifetime_s=900,
        resources=Resources(cpu=2, memory_mb=2048),
    )  # fmt: skip
    with emulated().create(spec) as sbx:
        (seen,) = [s for s in emulated_sandboxes(use_emulator) if s["id"] == sbx.id]
        assert sbx.run('printf %s "$E"; ls /proc/net/dev >/dev/null; pwd').stdout == "x y/root\n"
    assert seen["tags"].items() >= {"flow": "F", OWNER_LABEL[0]: OWNER_LABEL[1]}.items()
    assert (seen["timeout_s"], seen["idle_timeout_s"]) == (900, 120)  # lifetime, and the lease
    assert (seen["cpu"], seen["memory_mb"], seen["block_network"]) == (2.0, 2048, True)
    assert seen["env"] == {"E": "x y"} and seen["workdir"] == "/root"


def test_rate_limits_at_create_are_retried_without_a_second_sandbox(use_emulator):
    before, refused = emulator_state(use_emulator), set_faults(use_emulator)["refused"]
    set_faults(use_emulator, rate_429=0.3)  # spread evenly: never two refusals in a row
    with emulated().create(SandboxSpec()) as sbx:
        assert sbx.run("echo ok").stdout == "ok\n"
    after = emulator_state(use_emulator)
    assert (after["created"] - before["created"], after["live"]) == (1, 0)
    assert set_faults(use_emulator)["refused"] > refused


def _live_configured() -> bool:
    token = os.environ.get("MODAL_TOKEN_ID", "")
    return bool(token) and token != EMULATOR_TOKEN_ID and "127.0.0.1" not in os.environ.get("MODAL_SERVER_URL", "")


@pytest.mark.live
@pytest.mark.skipif(not _live_configured(), reason="MODAL_TOKEN_ID is not set: no real Modal to test against")
class TestModalLive(BackendConformance):
    @pytest.fixture
    def backend(self):
        return get_backend("modal")
