"""The code cache: unpacked once per package, bounded in size, least recently used out first, and
never an entry a live process uses.

Layer: tests of metaflow-sandbox. Imports: pytest, the standard library, ``plugins.code_cache``
and ``plugins.staging``.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from metaflow_extensions.sandbox.core import ConfigurationError
from metaflow_extensions.sandbox.plugins import code_cache, staging


def package(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def entry(cache: Path, name: str, size: int, age_s: float) -> Path:
    path = cache / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (path.stat().st_mtime - age_s, path.stat().st_mtime - age_s))
    return path


def test_the_code_directory_is_unpacked_once_per_package_with_its_bytecode(tmp_path):
    loads = []
    blob = package({"./flow.py": b"print('hi')\n", ".mf_code/metaflow/__init__.py": b"X = 1\n", "run.sh": b"true"})

    def load() -> bytes:
        loads.append(1)
        return blob

    cache = str(tmp_path / "cache")
    first = staging.cached_code_directory("sha1", load, cache, bytecode=True)
    assert staging.cached_code_directory("sha1", load, cache, bytecode=True) == first and len(loads) == 1
    files = sorted(str(p.relative_to(first)) for p in Path(first).rglob("*") if p.is_file())
    tag = sys.implementation.cache_tag
    assert files == sorted(
        [
            ".mf_code/metaflow/__init__.py",
            f".mf_code/metaflow/__pycache__/__init__.{tag}.pyc",
            "flow.py",
            f"__pycache__/flow.{tag}.pyc",
            "run.sh",
        ]
    )
    # Metaflow's local root (cards) is this sandbox's: the link leaves the shared directory.
    assert os.readlink(os.path.join(first, ".metaflow")) == "../.metaflow"
    # Nothing of a half-built entry is left behind.
    assert sorted(os.listdir(cache)) == [os.path.basename(first)]


def test_the_cache_keeps_under_its_bound_evicting_the_least_recently_used(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFLOW_SANDBOX_CODE_CACHE_MB", "1")
    cache = tmp_path / "cache"
    oldest = entry(cache, "a.open.tar", 400_000, age_s=300)
    old = entry(cache, "b.pkg", 400_000, age_s=200)
    recent = entry(cache, "c.open.tar", 100_000, age_s=100)
    dead_builder = entry(cache, ".code-xyz.tar", 10, age_s=7200)
    built = code_cache.cached(str(cache / "d.pkg"), lambda: entry(cache, "d.pkg", 400_000, age_s=0))
    assert Path(built).exists()
    # 1.3 MB would be over 1 MiB: the oldest goes, and a dead builder's leftover.
    assert not oldest.exists() and not dead_builder.exists()
    assert old.exists() and recent.exists()


def test_using_an_entry_makes_it_recent(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFLOW_SANDBOX_CODE_CACHE_MB", "1")
    cache = tmp_path / "cache"
    first = entry(cache, "a.pkg", 500_000, age_s=300)
    second = entry(cache, "b.pkg", 400_000, age_s=200)
    # Used again now, by a run that has ended since (its lock went with it).
    use = f"from metaflow_extensions.sandbox.plugins import code_cache as c; c.cached({str(first)!r}, lambda: None)"
    subprocess.run([sys.executable, "-c", use], check=True)
    code_cache.cached(str(cache / "c.pkg"), lambda: entry(cache, "c.pkg", 300_000, age_s=0))
    assert first.exists() and not second.exists()


def test_an_entry_another_process_uses_is_never_evicted(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    in_use = entry(cache, "a.d/flow.py", 600_000, age_s=0).parent
    os.utime(in_use, (0, 0))  # the least recently used of all
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from metaflow_extensions.sandbox.plugins import code_cache as c; "
            f"c.cached({str(in_use)!r}, lambda: None); print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        idle = entry(cache, "b.pkg", 100, age_s=500)
        assert code_cache.evict(str(cache), 0) == [str(idle)]
        assert (in_use / "flow.py").exists()
    finally:
        holder.communicate("")
    # Once its user is gone, it goes like any other.
    assert code_cache.evict(str(cache), 0) == [str(in_use)]
    assert os.listdir(cache) == []


def test_a_bad_bound_names_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFLOW_SANDBOX_CODE_CACHE_MB", "1GB")
    with pytest.raises(ConfigurationError, match="METAFLOW_SANDBOX_CODE_CACHE_MB must be a whole number"):
        code_cache.cached(str(tmp_path / "x.pkg"), lambda: entry(tmp_path, "x.pkg", 1, age_s=0))
