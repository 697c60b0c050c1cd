"""Wheels made without the network, for tests that give a sandboxed environment its packages offline:
a tiny wheel written from source text, and installed distributions packed back into wheels.

Layer: tests-shared. Imports: the standard library.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import re
import zipfile
from pathlib import Path


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _write_wheel(out: Path, files: dict[str, bytes], dist_info: str) -> Path:
    records = [_record_line(name, data) for name, data in files.items()]
    records.append(f"{dist_info}/RECORD,,")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist_info}/RECORD", "\n".join(records) + "\n")
    return out


def pure_wheel(directory: Path, name: str, version: str, modules: dict[str, str]) -> Path:
    """A pure-Python wheel of ``modules`` (path in the wheel -> source) in ``directory``."""
    stem = re.sub(r"[-_.]+", "_", name)
    dist_info = f"{stem}-{version}.dist-info"
    files = {path: text.encode() for path, text in modules.items()}
    files[f"{dist_info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: sandbox_testing\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    directory.mkdir(parents=True, exist_ok=True)
    return _write_wheel(directory / f"{stem}-{version}-py3-none-any.whl", files, dist_info)


def repack(directory: Path, name: str) -> Path:
    """The installed distribution ``name`` as a wheel again (its files, as RECORD lists them)."""
    dist = importlib.metadata.distribution(name)
    files: dict[str, bytes] = {}
    dist_info = ""
    for entry in dist.files or []:
        if entry.suffix == ".pyc" or entry.name == "RECORD" or entry.parts[0] == "..":
            continue  # bytecode is rebuilt at install; files outside site-packages (scripts) are left out
        if entry.parts[0].endswith(".dist-info"):
            dist_info = entry.parts[0]
        files[entry.as_posix()] = Path(dist.locate_file(entry)).read_bytes()
    wheel_meta = dist.read_text("WHEEL") or ""
    tag = next(line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:"))
    stem = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    directory.mkdir(parents=True, exist_ok=True)
    return _write_wheel(directory / f"{stem}-{dist.version}-{tag}.whl", files, dist_info)


def repack_with_requirements(directory: Path, name: str) -> list[Path]:
    """``name`` and, recursively, the installed distributions it requires (extras left out)."""
    done: dict[str, Path] = {}
    todo = [name]
    while todo:
        current = todo.pop()
        key = re.sub(r"[-_.]+", "-", current).lower()
        if key in done:
            continue
        try:
            done[key] = repack(directory, current)
        except importlib.metadata.PackageNotFoundError:
            continue  # required only under an environment marker that does not apply here
        for line in importlib.metadata.requires(current) or []:
            if "extra ==" not in line:
                todo.append(re.match(r"[A-Za-z0-9._-]+", line).group(0))
    return list(done.values())
