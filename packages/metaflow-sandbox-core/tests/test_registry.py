"""The registry finds backends by entry point and names the fix when it cannot.

Layer: core tests. Imports: pytest, the standard library and core.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from metaflow_extensions.sandbox.core import BackendNotFound, ConfigurationError, available_backends, get_backend


def test_local_is_registered_like_any_backend():
    assert "local" in available_backends()
    assert get_backend("local", isolation="process").name == "local"


def test_unknown_name_lists_installed_backends():
    with pytest.raises(BackendNotFound) as info:
        get_backend("nosuch")
    assert "installed backends: " in str(info.value) and "local" in str(info.value)


def test_known_but_missing_backend_names_the_install_command(monkeypatch):
    from metaflow_extensions.sandbox.core import registry

    monkeypatch.setattr(registry, "_entry_points", lambda: {})
    with pytest.raises(BackendNotFound, match="pip install metaflow-sandbox-e2b"):
        get_backend("e2b")


def test_bad_option_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="local"):
        get_backend("local", colour="blue")


def test_third_party_backend_plugs_in_by_entry_point(tmp_path):
    # A real distribution on sys.path, found through importlib.metadata like any pip install.
    (tmp_path / "thirdparty_sbx.py").write_text(
        textwrap.dedent("""
            from metaflow_extensions.sandbox.core.local import LocalBackend
            class Mine(LocalBackend):
                name = "mine"
        """)
    )
    dist = tmp_path / "thirdparty_sbx-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-sbx\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[metaflow_sandbox.backends]\nmine = thirdparty_sbx:Mine\nbroken = nosuchmod:X\n"
    )
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(tmp_path)!r})
        from metaflow_extensions.sandbox.core import get_backend, available_backends, ConfigurationError
        print(available_backends())
        print(type(get_backend("mine", isolation="process")).__name__)
        try:
            get_backend("broken")
        except ConfigurationError as e:
            print("broken:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert "'mine'" in out[0] and "'local'" in out[0]
    assert out[1] == "Mine"
    assert out[2].startswith("broken:") and "failed to import" in out[2] and "pip install" in out[2]
