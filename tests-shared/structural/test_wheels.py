"""The built wheels are what Metaflow and pip expect: ``top_level.txt``, implicit namespace,
typed, backends registered by entry point, and Metaflow names each as an extension distribution.

Layer: tests-shared. Imports: pytest and the standard library.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WHEELHOUSE = os.environ.get("MFSBX_WHEELHOUSE")
WHEELS = sorted(Path(WHEELHOUSE).glob("*.whl")) if WHEELHOUSE else []
pytestmark = pytest.mark.skipif(not WHEELHOUSE, reason="run through `nox -s structural`, which builds the wheels")


def test_every_distribution_was_built():
    built = {w.name.split("-")[0] for w in WHEELS}
    sources = {p.name.replace("-", "_") for p in Path(__file__).resolve().parents[2].glob("packages/*")}
    assert built == sources


@pytest.mark.parametrize("wheel", WHEELS, ids=[w.name for w in WHEELS])
def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert zipfile.ZipFile(wheel).read(f"{dist_info}/top_level.txt").decode().split() == ["metaflow_extensions"]
    assert "metaflow_extensions/__init__.py" not in names
    assert "metaflow_extensions/sandbox/__init__.py" not in names
    assert any(n.endswith("/py.typed") for n in names), "ship py.typed"


def test_backends_are_registered_by_entry_point():
    from metaflow_extensions.sandbox.core import available_backends

    built = {w.name.split("-")[0].removeprefix("metaflow_sandbox_") for w in WHEELS}
    expected = {"local"} | built & {"daytona", "e2b", "modal"}
    assert set(available_backends()) == expected


def test_metaflow_loads_every_distribution_by_name():
    pytest.importorskip("metaflow")
    out = subprocess.run(
        [sys.executable, "-c", "import metaflow"],
        capture_output=True, text=True, check=True, env={**os.environ, "METAFLOW_DEBUG_EXT": "1"},
    )  # fmt: skip
    for wheel in WHEELS:
        dist = wheel.name.split("-")[0].replace("_", "-")
        assert dist in out.stdout + out.stderr, f"Metaflow did not list {dist} as an extension distribution"


def test_every_distribution_has_one_version_and_pins_the_others_to_it():
    # Released together: a core from one release under a backend of another is never tested.
    versions = {w.name.split("-")[0]: w.name.split("-")[1] for w in WHEELS}
    assert len(set(versions.values())) == 1, versions
    (version,) = set(versions.values())
    for wheel in WHEELS:
        with zipfile.ZipFile(wheel) as zf:
            metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        for line in metadata.splitlines():
            if line.startswith("Requires-Dist: metaflow-sandbox"):
                assert f"=={version}" in line, f"{wheel.name}: {line} (every sibling is pinned to {version})"


@pytest.mark.parametrize("backend", ["local", "daytona", "e2b", "modal"])
def test_the_docs_option_tables_are_the_declarations(backend):
    from metaflow_extensions.sandbox.core import backend_class
    from metaflow_extensions.sandbox.core.options import markdown_table

    docs = (ROOT / "docs" / "configuration.md").read_text()
    match = re.search(rf"<!-- options:{backend} [^\n]*-->\n(.*?)\n<!-- /options:{backend} -->", docs, re.S)
    assert match, f"docs/configuration.md has no generated option table for {backend}"
    expected = markdown_table(backend, backend_class(backend).options)
    assert match.group(1) == expected, f"regenerate the {backend} table in docs/configuration.md:\n{expected}"
