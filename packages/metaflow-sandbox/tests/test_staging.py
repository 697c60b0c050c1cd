"""Staging in and out of a sandbox, on a hand-made local datastore (no Metaflow run needed).

Layer: tests of metaflow-sandbox. Imports: pytest, the standard library, ``plugins.staging``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from metaflow_extensions.sandbox.plugins import staging


def write(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def loc(tmp_path: Path) -> staging.TaskLocation:
    root = tmp_path / ".metaflow"
    cards = str(root / "mf.cards")
    return staging.TaskLocation(root=str(root), flow="F", run_id="1", step="b", task_id="7", card_root=cards)


def parent_task(root: Path, attempts: dict[int, bool], blobs: list[str]) -> Path:
    """A parent task ``1/a/3`` with the given attempts (attempt -> has DONE) listing ``blobs``."""
    task = root / "F" / "1" / "a" / "3"
    for attempt, done in attempts.items():
        write(task / f"{attempt}.attempt.json", "{}")
        write(task / f"{attempt}.data.json", json.dumps({"objects": {f"o{i}": b for i, b in enumerate(blobs)}}))
        if done:
            write(task / f"{attempt}.DONE.lock")
    for blob in blobs:
        write(root / "F" / "data" / blob[:2] / blob, blob)
        write(root / "F" / "data" / blob[:2] / f"{blob}_meta", "{}")
    return task


def test_the_latest_done_attempt_is_staged_never_a_later_unfinished_one(loc):
    root = Path(loc.root)
    task = parent_task(root, {0: True, 1: True, 2: False}, ["ab12", "cd34", "ab12"])
    write(root / "F" / "_meta" / "_self.json")
    assert staging.latest_done_attempt(str(task)) == 1
    files, blobs = staging.input_files(loc, ["1/a/3"])
    names = {Path(f).relative_to(root).as_posix() for f in files}
    assert {"F/1/a/3/1.attempt.json", "F/1/a/3/1.DONE.lock", "F/1/a/3/1.data.json"} <= names
    assert not any(n.startswith("F/1/a/3/2.") or n.startswith("F/1/a/3/0.") for n in names)
    assert blobs == {"ab12", "cd34"}
    assert sum(n.startswith("F/data/ab/ab12") for n in names) == 2  # the blob and its _meta, once
    assert "F/_meta/_self.json" in names


def test_an_input_without_a_completed_attempt_is_an_error(loc):
    parent_task(Path(loc.root), {0: False}, [])
    with pytest.raises(staging.StagingError, match="no completed attempt"):
        staging.input_files(loc, ["1/a/3"])


def test_the_inbound_archive_holds_the_package_and_absolute_paths(loc, tmp_path):
    parent_task(Path(loc.root), {0: True}, ["ab12"])
    files, _ = staging.input_files(loc, ["1/a/3"])
    archive = tmp_path / "in.tar"
    package = tmp_path / "package.tgz"
    package.write_bytes(b"package-bytes")
    staged = staging.build_inputs(str(archive), files, package=str(package))
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert tar.extractfile(staging.PACKAGE_MEMBER).read() == b"package-bytes"
    assert names[0] == staging.PACKAGE_MEMBER
    assert all(n.startswith(f"{staging.ROOT_PREFIX}/") for n in names[1:])
    assert staged.bytes > 0 and len(staged.files) == len(files)


def test_the_code_archive_is_built_once_per_package_and_ships_files_under_code(loc, tmp_path):
    package = io.BytesIO()
    with tarfile.open(fileobj=package, mode="w:gz") as tar:
        for name in ("./flow.py", ".mf_code/metaflow/__init__.py"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    loads = []

    def load():
        loads.append(1)
        return package.getvalue()

    cache = str(tmp_path / "cache")
    first = staging.cached_code_archive("sha1", load, cache)
    assert staging.cached_code_archive("sha1", load, cache) == first and len(loads) == 1
    parent_task(Path(loc.root), {0: True}, ["ab12"])
    files, _ = staging.input_files(loc, ["1/a/3"])
    archive = tmp_path / "in.tar"
    staging.build_inputs(str(archive), files, code_tar=first)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert names[:2] == ["code/flow.py", "code/.mf_code/metaflow/__init__.py"]
    assert any(n.startswith("root/") and n.endswith("ab12") for n in names)


def test_bytecode_in_the_code_archive_is_what_python_imports(tmp_path):
    package = io.BytesIO()
    with tarfile.open(fileobj=package, mode="w:gz") as tar:
        for name, text in (("pkgx/__init__.py", b"VALUE = 'compiled'\n"), ("pkgx/broken.py", b"def (:\n")):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    archive = staging.cached_code_archive("sha2", package.getvalue, str(tmp_path / "cache"), bytecode=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "out")
        names = tar.getnames()
    # A file this interpreter cannot compile ships as source only.
    assert not any("broken" in n and n.endswith(".pyc") for n in names)
    # Unchecked-hash bytecode is used as shipped, whatever the source's mtime after unpacking:
    # change the source, and the import still runs the shipped bytecode.
    (tmp_path / "out/code/pkgx/__init__.py").write_text("VALUE = 'recompiled'\n")
    probe = "import pkgx, sys; print(pkgx.VALUE, pkgx.__cached__ is not None)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "out/code"), "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["compiled", "True"]


def out_archive(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name.lstrip("/"))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink.lstrip("/"))
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return path


def blob(data: bytes, *, raw: bool = False) -> tuple[str, bytes, bytes]:
    """(address, file bytes, _meta bytes) of ``data`` as Metaflow's content-addressed store files it."""
    body = data if raw else gzip.compress(data, compresslevel=3)
    return hashlib.sha1(data).hexdigest(), body, json.dumps({"cas_raw": raw, "cas_version": 1}).encode()


def blob_members(blob_dir: Path, data: bytes, *, raw: bool = False) -> dict[str, bytes]:
    key, body, meta = blob(data, raw=raw)
    return {f"{blob_dir}/{key[:2]}/{key}": body, f"{blob_dir}/{key[:2]}/{key}_meta": meta}


def test_outputs_merge_into_the_datastore_and_known_blobs_are_skipped(loc, tmp_path):
    task_dir, blob_dir = Path(loc.task_dir), Path(loc.blob_dir)
    known, _, _ = blob(b"already here")
    write(blob_dir / known[:2] / known, "already here")
    new, _, _ = blob(b"new blob")
    raw, _, _ = blob(b"raw blob", raw=True)
    archive = out_archive(
        tmp_path / "out.tar",
        {
            f"{task_dir}/0.data.json": b"{}",
            f"{task_dir}/0.DONE.lock": b"",
            **blob_members(blob_dir, b"new blob"),
            **blob_members(blob_dir, b"raw blob", raw=True),
            # An existing address is skipped whatever the sandbox sends for it.
            f"{blob_dir}/{known[:2]}/{known}": b"different bytes, same name",
            f"{loc.card_dir}/cards/c.html": b"<html/>",
        },
    )
    written = staging.merge_outputs(str(archive), loc)
    assert (task_dir / "0.DONE.lock").exists()
    assert gzip.decompress((blob_dir / new[:2] / new).read_bytes()) == b"new blob"
    assert (blob_dir / raw[:2] / raw).read_bytes() == b"raw blob"
    assert (blob_dir / known[:2] / known).read_text() == "already here"
    assert Path(written[-1]).name == "0.DONE.lock", "DONE.lock must be the last file to appear"
    assert (Path(loc.card_dir) / "cards" / "c.html").exists()


def _poisoned(blob_dir: Path, task_dir: Path) -> dict[str, dict[str, bytes]]:
    """Archives a hostile step could return, each next to an honest task's files."""
    honest, _, meta = blob(b"the honest value a later step computes")
    _, evil_body, _ = blob(b"the attacker's value")
    address = f"{blob_dir}/{honest[:2]}/{honest}"
    return {
        "content-under-another-address": {address: evil_body, f"{address}_meta": meta},
        "raw-content-under-another-address": {
            address: b"the attacker's value",
            f"{address}_meta": json.dumps({"cas_raw": True, "cas_version": 1}).encode(),
        },
        "blob-without-meta": {address: blob(b"the honest value a later step computes")[1]},
        "meta-without-blob": {f"{address}_meta": meta},
        "unknown-encoding": {address: evil_body, f"{address}_meta": b'{"cas_raw": false, "cas_version": 9}'},
        "not-gzip": {address: b"garbage", f"{address}_meta": meta},
        "misfiled-prefix": {f"{blob_dir}/00/{honest}": evil_body, f"{blob_dir}/00/{honest}_meta": meta},
        "not-a-blob-name": {f"{blob_dir}/ab/evil.py": b"x"},
        "another-attempts-file": {f"{task_dir}/0.data.json": b'{"objects": {}}'},
        "another-attempts-metadata": {f"{task_dir}/_meta/0_artifact_x.json": b"{}"},
    }


@pytest.mark.parametrize("attack", list(_poisoned(Path("b"), Path("t"))))
def test_outputs_a_step_could_not_have_made_honestly_are_refused_whole(loc, tmp_path, attack):
    task_dir, blob_dir = Path(loc.task_dir), Path(loc.blob_dir)
    members = {
        f"{task_dir}/1.data.json": b"{}",
        f"{task_dir}/1.DONE.lock": b"",
        **blob_members(blob_dir, b"an honest artifact"),
        **_poisoned(blob_dir, task_dir)[attack],
    }
    archive = out_archive(tmp_path / "out.tar", members)
    with pytest.raises(staging.UntrustedOutput):
        staging.merge_outputs(str(archive), loc, attempt=1)
    leftovers = [p for p in Path(loc.root).rglob("*") if p.is_file()]
    assert leftovers == [], "a refused archive must leave nothing in the datastore"


def test_a_previous_attempts_files_are_never_replaced(loc, tmp_path):
    task_dir = Path(loc.task_dir)
    write(task_dir / "_meta" / "_self.json", '{"task": 7}')
    write(task_dir / "_meta" / "sysmeta_attempt_1.json", "attempt 0 wrote this")
    same = {f"{task_dir}/_meta/_self.json": b'{"task": 7}', f"{task_dir}/1.DONE.lock": b""}
    staging.merge_outputs(str(out_archive(tmp_path / "ok.tar", same)), loc, attempt=1)
    assert (task_dir / "1.DONE.lock").exists(), "an identical copy of an existing file is fine"
    changed = {f"{task_dir}/_meta/sysmeta_attempt_1.json": b"rewritten", f"{task_dir}/1.data.json": b"{}"}
    with pytest.raises(staging.UntrustedOutput, match="earlier attempt"):
        staging.merge_outputs(str(out_archive(tmp_path / "bad.tar", changed)), loc, attempt=1)
    assert (task_dir / "_meta" / "sysmeta_attempt_1.json").read_text() == "attempt 0 wrote this"
    assert not (task_dir / "1.data.json").exists()


@pytest.mark.parametrize(
    "bad",
    ["/etc/evil", "{root}/F/1/other_step/7/0.data.json", "{task}/../../../../escape"],
    ids=["outside", "another-task", "dotdot"],
)
def test_a_path_outside_the_task_outputs_is_refused_and_nothing_is_merged(loc, tmp_path, bad):
    bad = bad.format(root=loc.root, task=loc.task_dir)
    archive = out_archive(tmp_path / "out.tar", {f"{loc.task_dir}/0.data.json": b"{}", bad: b"x"})
    with pytest.raises(staging.StagingError):
        staging.merge_outputs(str(archive), loc)
    assert not Path(loc.task_dir).exists() or not any(Path(loc.task_dir).iterdir())


def test_links_are_refused(loc, tmp_path):
    archive = out_archive(tmp_path / "out.tar", {}, symlink=f"{loc.task_dir}/0.data.json")
    with pytest.raises(staging.StagingError):
        staging.merge_outputs(str(archive), loc)


def test_this_attempts_own_files_may_be_rewritten(loc, tmp_path):
    # The runtime begins an attempt on the launcher side (N.attempt.json) before the task writes it.
    task_dir = Path(loc.task_dir)
    write(task_dir / "1.attempt.json", '{"time": 1}')
    archive = out_archive(tmp_path / "out.tar", {f"{task_dir}/1.attempt.json": b'{"time": 2}'})
    staging.merge_outputs(str(archive), loc, attempt=1)
    assert (task_dir / "1.attempt.json").read_text() == '{"time": 2}'


def test_a_sibling_merging_the_same_blob_meanwhile_does_not_split_the_pair(loc, tmp_path, monkeypatch):
    # Foreach siblings often compute equal values: while this merge reads the blob, a sibling's
    # merge lands the same blob and its _meta. This merge must keep or skip the pair whole.
    sibling = staging.TaskLocation(
        root=loc.root, flow=loc.flow, run_id=loc.run_id, step=loc.step, task_id="8", card_root=loc.card_root
    )
    blob_dir = Path(loc.blob_dir)
    shared = blob_members(blob_dir, b"a value both siblings computed")
    ours = out_archive(tmp_path / "ours.tar", {f"{loc.task_dir}/0.DONE.lock": b"", **shared})
    theirs = out_archive(tmp_path / "theirs.tar", {f"{sibling.task_dir}/0.DONE.lock": b"", **shared})
    extract = tarfile.TarFile.extractfile
    interleaved = []

    def sibling_lands_meanwhile(self, member):
        if not interleaved and member.name.lstrip("/").startswith(str(blob_dir).lstrip("/")):
            interleaved.append(theirs)  # before the sibling's merge, which reads through this hook too
            staging.merge_outputs(str(theirs), sibling)
        return extract(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", sibling_lands_meanwhile)
    staging.merge_outputs(str(ours), loc)
    assert interleaved and (Path(loc.task_dir) / "0.DONE.lock").exists()
    key = Path(next(iter(shared))).name
    assert (blob_dir / key[:2] / f"{key}_meta").exists() and (blob_dir / key[:2] / key).exists()


def test_packing_leaves_out_other_attempts_files_of_a_shared_task_directory(loc, tmp_path):
    """Without a private root (the local backend's process mode) the sandbox packs from the
    launcher's datastore, where a killed attempt 0 left files (the runtime's log among them): the
    retry's archive holds only attempt 1's files and the others, and it merges."""
    task_dir = Path(loc.task_dir)
    for name in ("0.runtime_stdout.log", "0.attempt.json", "_meta/0_artifact_x.json", "_meta/_self.json"):
        write(task_dir / name, "attempt 0 or the runtime")
    for name in ("1.attempt.json", "1.data.json", "_meta/1_artifact_x.json", "1.DONE.lock", "12.not-mine"):
        write(task_dir / name, "attempt 1")
    write(Path(loc.card_dir) / "cards" / "c.html", "<html/>")
    write(tmp_path / "work" / "mfsbx" / "marker")
    subprocess.run(["bash", "-c", staging.pack_command(loc, "mfsbx/marker", 1)], cwd=tmp_path / "work", check=True)
    with tarfile.open(tmp_path / "work" / staging.OUT_ARCHIVE) as tar:
        packed = sorted(os.path.relpath("/" + name, loc.task_dir) for name in tar.getnames())
    assert packed == sorted(
        [
            "1.attempt.json", "1.data.json", "_meta/1_artifact_x.json", "1.DONE.lock", "_meta/_self.json",
            os.path.relpath(os.path.join(loc.card_dir, "cards", "c.html"), loc.task_dir),
        ]
    )  # fmt: skip
    staging.merge_outputs(str(tmp_path / "work" / staging.OUT_ARCHIVE), loc, attempt=1)
