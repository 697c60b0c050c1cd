"""``metaflow-sandbox doctor`` on the local backend, run as the installed console script, and the
version ranges it reads from the distributions' ``Requires-Dist``.

Layer: core tests. Imports: pytest, the standard library and ``core.doctor``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from metaflow_extensions.sandbox.core.doctor import satisfies

SCRIPT = str(Path(sys.executable).parent / "metaflow-sandbox")


def doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, "doctor", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("version", "specifier", "expected"),
    [
        ("0.226.1", ">=0.150,<1", True),
        ("0.149.9", ">=0.150,<1", False),
        ("1.0", ">=0.150,<1", False),
        ("2.19.39", ">=2.12,<2.20", True),
        ("2.20.0", ">=2.12,<2.20", False),
        ("2.12", ">=2.12,<2.20", True),
        ("2.7.0rc1", ">=2.7,<3", True),  # release numbers only: a pre-release counts as its release
        ("1.4.2", "~=1.4", True),
        ("2.0", "~=1.4", False),
        ("3.1.7", "==3.1.*", True),
        ("3.2", "!=3.2", False),
        ("5", "", True),
    ],
)
def test_version_ranges(version, specifier, expected):
    assert satisfies(version, specifier) is expected


def test_local_passes_and_leaves_no_sandbox(tmp_path):
    root = tmp_path / "sandboxes"
    proc = doctor("--backend", "local", env={"METAFLOW_SANDBOX_LOCAL_ROOT": str(root)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "ok    local: installed: metaflow-sandbox-core" in out
    assert "ok    local: isolation: bubblewrap works" in out
    assert "ok    local: API: listing sandboxes took" in out
    assert "local: sandbox: sbx-" in out and "ran a command" in out
    assert "ok    local: destroyed" in out and "code cache" in out
    assert out.rstrip().endswith("All is well.")
    assert list(root.glob("sbx-*")) == [], "the doctor left its sandbox behind"


def test_broken_bubblewrap_fails_and_names_the_fix(tmp_path):
    # A bwrap that cannot create namespaces, as in a container without user namespaces.
    fake = tmp_path / "bin" / "bwrap"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {
        "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
        "METAFLOW_SANDBOX_LOCAL_ROOT": str(tmp_path / "sandboxes"),
        "METAFLOW_SANDBOX_LOCAL_ISOLATION": "auto",
    }
    proc = doctor("--backend", "local", env=env)
    assert proc.returncode == 1
    assert "FAIL  local: isolation: commands run as plain processes" in proc.stdout
    assert "No permissions to create new namespace" in proc.stdout
    assert "apparmor_restrict_unprivileged_userns=0" in proc.stdout  # the fix
    assert "1 problem found." in proc.stdout
    # Still usable: the doctor ran a command as a plain process.
    assert "ok    local: destroyed" in proc.stdout


def test_accepting_plain_processes_is_all_well(tmp_path):
    env = {"METAFLOW_SANDBOX_LOCAL_ISOLATION": "process", "METAFLOW_SANDBOX_LOCAL_ROOT": str(tmp_path)}
    proc = doctor(env=env)  # the default backend: local
    assert proc.returncode == 0, proc.stdout
    assert "local: isolation: plain processes, as METAFLOW_SANDBOX_LOCAL_ISOLATION=process asks" in proc.stdout


def test_unknown_backend_fails_listing_the_installed_ones():
    proc = doctor("--backend", "nosuch")
    assert proc.returncode == 1
    assert "FAIL  nosuch: installed: Unknown sandbox backend 'nosuch'; installed backends: " in proc.stdout
    assert "fix: Third-party backends register in the entry point group" in proc.stdout
