"""The environment built once per run: what its cache key covers, the shell that unpacks or packs
it, and which ``@pypi``/``@conda`` steps are refused before the run.

Layer: tests of metaflow-sandbox. Imports: pytest, the standard library, ``plugins.environments``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from metaflow_extensions.sandbox.plugins import environments

BASE = {"package_digest": "abc", "backend": "local", "options": {}, "image": None}
BOOTSTRAP = ["python -m metaflow.plugins.uv.bootstrap local"]


@pytest.mark.parametrize(
    "change", [{"package_digest": "abd"}, {"backend": "daytona"}, {"options": {"isolation": "process"}}, {"image": "x"}]
)
def test_the_key_changes_with_what_the_environment_depends_on(change):
    same = environments.cache_entry("uv", BOOTSTRAP, **BASE)
    assert same == environments.cache_entry("uv", BOOTSTRAP, **BASE)
    assert same != environments.cache_entry("uv", BOOTSTRAP, **{**BASE, **change})
    assert same != environments.cache_entry("uv", [*BOOTSTRAP, "true"], **BASE)


def test_only_environments_built_into_the_code_directory_are_kept():
    assert environments.cache_entry("uv", [], **BASE) == ""
    assert environments.cache_entry("conda", BOOTSTRAP, **BASE) == ""


def test_a_built_environment_is_packed_only_after_a_successful_step_and_unpacked_by_the_next(tmp_path: Path):
    dirs = environments.BUILT_DIRS["uv"]
    _, pack = environments.shell("entry", False, dirs)
    unpack, _ = environments.shell("entry", True, dirs)
    built, reused = tmp_path / "built", tmp_path / "reused"
    for root in (built, reused):
        (root / "code").mkdir(parents=True)
        (root / "mfsbx").mkdir()
    (built / "code" / ".venv" / "bin").mkdir(parents=True)
    (built / "code" / ".venv" / "bin" / "python").write_text("venv")
    subprocess.run(["bash", "-c", f"c=1; {pack}"], cwd=built / "code", check=True)
    assert not (built / "mfsbx" / "env-out.tar").exists(), "a failed step's environment is not kept"
    subprocess.run(["bash", "-c", f"c=0; {pack}"], cwd=built / "code", check=True)
    (built / "mfsbx" / "env-out.tar").rename(reused / "mfsbx" / "env.tar")
    out = subprocess.run(["bash", "-c", unpack], cwd=reused / "code", check=True, capture_output=True, text=True)
    assert (reused / "code" / ".venv" / "bin" / "python").read_text() == "venv"
    assert out.stdout == f"{environments.REUSED} (.venv, uv_install).\n"
    assert not (reused / "mfsbx" / "env.tar").exists()


def _deco(name: str, disabled: bool = False) -> SimpleNamespace:
    return SimpleNamespace(name=name, attributes={"disabled": disabled})


def test_pypi_and_conda_steps_are_refused_where_their_bootstrap_cannot_work():
    pypi = [_deco("pypi")]
    assert "needs a remote datastore" in environments.refusal("pypi", pypi, "local", network=True)
    assert "network=False" in environments.refusal("conda", [_deco("conda")], "s3", network=False)
    assert environments.refusal("pypi", pypi, "s3", network=True) == ""
    assert environments.refusal("pypi", [_deco("pypi", disabled=True)], "local", network=True) == ""
    assert environments.refusal("uv", [], "local", network=False) == ""
