"""Moving a task's local-datastore inputs into a sandbox and its outputs back: one archive each way.

Layer: plugins (bottom: used by the executor). Imports: the standard library and
``plugins.code_cache``; it knows the local datastore's layout, not Metaflow's classes, so it is
testable on plain directories.

In: the code package, the ``_meta/_self.json`` files of flow/run/step/task, and per input path the
parent's latest DONE attempt (``attempt.json``, ``DONE.lock``, ``data.json``) plus each blob its
``data.json`` lists (each blob once). Paths keep their absolute location: the task runs against a
datastore root at the launcher's path, so recorded paths stay valid afterwards.

Out: the task directory, the blobs created in the sandbox (not those staged in), and the task's
cards. ``merge_outputs`` checks every member against the directories the task may write,
extracts to temporary files, then renames them into place, ``DONE.lock`` last: a failure before
the renames leaves nothing behind, and no reader ever sees a task marked done without its data.
"""

from __future__ import annotations

import contextlib
import filecmp
import gzip
import hashlib
import importlib.util
import io
import json
import marshal
import os
import re
import shlex
import shutil
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import code_cache

PACKAGE_MEMBER = "mfsbx/job.tar"
ROOT_PREFIX = "root"
CODE_PREFIX = "code"
"""Archive members under ``root/`` are absolute paths (the leading ``/`` dropped)."""
IN_ARCHIVE = "mfsbx/in.tar"
LOCAL_ROOT = ".metaflow"  # metaflow_config.DATASTORE_LOCAL_DIR
OUT_ARCHIVE = "mfsbx/out.tar"
DONE = re.compile(r"^(\d+)\.DONE\.lock$")
# Files of one attempt in a task directory: ``<attempt>.data.json``, ``_meta/<attempt>_artifact_*``.
_ATTEMPT_FILE = re.compile(r"^(\d+)[._]")
META = "_meta"
# A blob in the content-addressed store: ``<sha1[:2]>/<sha1>``, and its ``_meta`` file.
_BLOB = re.compile(r"([0-9a-f]{2})/(?=\1)([0-9a-f]{40})(?:_meta)?")


class StagingError(Exception):
    """The archive is unusable or holds paths the task may not write (an infrastructure failure)."""


class UntrustedOutput(StagingError):
    """The sandbox returned outputs the task could not have made honestly (see ``merge_outputs``):
    refused whole, and never retried (the same code would do it again)."""


@dataclass(frozen=True)
class TaskLocation:
    """Where one task attempt lives in the local datastore."""

    root: str  # the datastore root, absolute (…/.metaflow)
    flow: str
    run_id: str
    step: str
    task_id: str
    card_root: str | None = None  # the local card root (…/.metaflow/mf.cards), absolute

    @property
    def task_dir(self) -> str:
        return os.path.join(self.root, self.flow, self.run_id, self.step, self.task_id)

    @property
    def blob_dir(self) -> str:
        return os.path.join(self.root, self.flow, "data")

    @property
    def card_dir(self) -> str | None:
        if not self.card_root:
            return None
        return os.path.join(self.card_root, self.flow, "runs", self.run_id, "steps", self.step, "tasks", self.task_id)

    def writable(self) -> list[str]:
        """Directories whose files a task may create."""
        return [d for d in (self.task_dir, self.blob_dir, self.card_dir) if d]


@dataclass
class Staged:
    """What went into the sandbox."""

    files: list[str] = field(default_factory=list)
    blobs: set[str] = field(default_factory=set)
    bytes: int = 0


def latest_done_attempt(task_dir: str) -> int | None:
    """The highest attempt of a task that has a ``DONE.lock``; a later attempt without one (in
    flight, or failed) is never staged."""
    try:
        names = os.listdir(task_dir)
    except FileNotFoundError:
        return None
    done = [int(m.group(1)) for m in map(DONE.match, names) if m]
    return max(done) if done else None


def input_files(loc: TaskLocation, input_paths: Iterable[str], extra: Iterable[str] = ()) -> tuple[list[str], set[str]]:
    """Absolute paths of every file the task reads, and the blob keys among them."""
    files: list[str] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        if path not in seen and os.path.isfile(path):
            seen.add(path)
            files.append(path)

    flow_dir = os.path.join(loc.root, loc.flow)
    for parts in ((), (loc.run_id,), (loc.run_id, loc.step), (loc.run_id, loc.step, loc.task_id)):
        add(os.path.join(flow_dir, *parts, "_meta", "_self.json"))
    blobs: set[str] = set()
    for pathspec in input_paths:
        run_id, step, task_id = pathspec.split("/")[-3:]
        parent = os.path.join(flow_dir, run_id, step, task_id)
        attempt = latest_done_attempt(parent)
        if attempt is None:
            raise StagingError(f"The input task {pathspec} has no completed attempt in {parent}.")
        for suffix in ("attempt.json", "DONE.lock", "data.json"):
            add(os.path.join(parent, f"{attempt}.{suffix}"))
        add(os.path.join(flow_dir, run_id, step, "_meta", "_self.json"))
        with open(os.path.join(parent, f"{attempt}.data.json")) as f:
            blobs.update(json.load(f).get("objects", {}).values())
    for key in sorted(blobs):
        blob = os.path.join(loc.blob_dir, key[:2], key)
        add(blob)
        add(f"{blob}_meta")
    for path in extra:
        if os.path.isdir(path):
            for dirpath, _dirs, names in os.walk(path):
                for name in sorted(names):
                    add(os.path.join(dirpath, name))
        else:
            add(path)
    return files, blobs


def _code_members(package: bytes, *, bytecode: bool) -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
    """The code package's files and directories, named ``code/<path>``, each with its content
    (None for a directory), and with ``bytecode`` each module's ``.pyc`` after it."""
    with tarfile.open(fileobj=io.BytesIO(package), mode="r:*") as code:
        for member in code:
            if not (member.isfile() or member.isdir()) or ".." in Path(member.name).parts:
                continue
            source = code.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            name = f"{CODE_PREFIX}/{member.name.removeprefix('./')}"
            member.name = name
            yield member, source
            compiled = _bytecode(source, name) if bytecode and source is not None else None
            if compiled is not None:
                folder, module = os.path.split(name)
                pyc = tarfile.TarInfo(f"{folder}/__pycache__/{module[:-3]}.{sys.implementation.cache_tag}.pyc")
                pyc.size, pyc.mtime, pyc.mode = len(compiled), member.mtime, 0o644
                yield pyc, compiled


def code_archive(package: bytes, path: str, *, bytecode: bool = False) -> str:
    """Write the code package's files under ``code/`` as a plain tar at ``path`` (atomically) and
    return ``path``. Built once per package and reused by every task: the sandbox then unpacks
    code and data in one pass, without decompressing. The archive stops before tar's
    end-of-archive blocks, so each task appends its inputs where the code ends (``build_inputs``)
    instead of re-reading ~1,000 member headers to find the end (~20 ms per task).

    ``bytecode``: also ship each module compiled for this interpreter (only useful when the
    sandbox runs this same interpreter). The package carries Metaflow itself, which the task
    imports from the unpacked code: without bytecode every task compiles it again (~0.3 s)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".code-", suffix=".tar", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as out, tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for member, content in _code_members(package, bytecode=bytecode):
                tar.addfile(member, io.BytesIO(content) if content is not None else None)
            end = tar.offset  # where the members end and the end-of-archive blocks begin
            tar.close()
            out.truncate(end)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def code_directory(package: bytes, path: str, *, bytecode: bool = False) -> str:
    """Unpack the code package's files into the directory ``path`` (which appears whole or not
    at all) and return it: what a backend sharing this machine's directories mounts read-only
    as the code of every sandbox (``SandboxSpec.read_only_dirs``). ``bytecode`` as in
    ``code_archive``: a read-only code directory could not take the ``.pyc`` files otherwise."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".code-", suffix=".d", dir=parent)
    try:
        for member, content in _code_members(package, bytecode=bytecode):
            target = os.path.join(tmp, member.name.removeprefix(f"{CODE_PREFIX}/"))
            if content is None:
                os.makedirs(target, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as out:
                out.write(content)
            os.chmod(target, 0o755 if member.mode & 0o111 else 0o644)
        # Where Metaflow looks for its local root (cards, before 2.13 only in the working
        # directory): the sandbox links `../.metaflow` to its datastore root (``task_script``).
        with contextlib.suppress(FileExistsError):  # the package's own wins
            os.symlink(f"../{LOCAL_ROOT}", os.path.join(tmp, LOCAL_ROOT))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide it from a sandbox's own uid
        os.rename(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(path):  # another process built it first: the same files
            return path
        raise e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _bytecode(source: bytes, name: str) -> bytes | None:
    """``source`` as an unchecked-hash ``.pyc`` (PEP 552: valid whatever the file's mtime after
    unpacking); None for non-modules and for files this interpreter cannot compile."""
    if not name.endswith(".py"):
        return None
    try:
        code = compile(source, name, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return None  # importing it fails the same way in the sandbox, with the real message
    flags = (1).to_bytes(4, "little")  # hash-based, not checked against the source
    return importlib.util.MAGIC_NUMBER + flags + importlib.util.source_hash(source) + marshal.dumps(code)


def _flavour(bytecode: bool) -> str:
    return f"-{sys.implementation.cache_tag}" if bytecode else ""


def cached_code_archive(package_sha: str, load: Callable[[], bytes], cache_dir: str, *, bytecode: bool = False) -> str:
    """The code archive of ``package_sha`` from ``cache_dir``, built with ``load()`` on first use."""
    # "open": without end-of-archive blocks (see code_archive); older cached archives had them.
    path = os.path.join(cache_dir, f"{package_sha}{_flavour(bytecode)}.open.tar")
    return code_cache.cached(path, lambda: code_archive(load(), path, bytecode=bytecode))


def cached_code_directory(
    package_sha: str, load: Callable[[], bytes], cache_dir: str, *, bytecode: bool = False
) -> str:
    """The unpacked code of ``package_sha`` from ``cache_dir``, unpacked with ``load()`` on first use."""
    path = os.path.join(cache_dir, f"{package_sha}{_flavour(bytecode)}.d")
    return code_cache.cached(path, lambda: code_directory(load(), path, bytecode=bytecode))


def cached_package(package_sha: str, load: Callable[[], bytes], cache_dir: str) -> str:
    """The code package of ``package_sha`` as Metaflow made it, as a file in ``cache_dir``."""
    path = os.path.join(cache_dir, f"{package_sha}.pkg")

    def write() -> None:
        os.makedirs(cache_dir, exist_ok=True)
        _write_atomically(path, load())

    return code_cache.cached(path, write)


def build_inputs(
    archive: str,
    files: Iterable[str],
    *,
    package: str = "",
    code_tar: str | None = None,
    named: Mapping[str, str] | None = None,
) -> Staged:
    """Write the inbound archive: the code, then each file at ``root/<absolute path>``, then each
    file of ``named`` (archive member name -> path) under its own name.

    ``code_tar`` (from ``code_archive``) is the code as files under ``code/``; without it the
    ``package`` file travels as ``mfsbx/job.tar`` for Metaflow's own extract commands; with
    neither, the sandbox has its code already (a shared ``code_directory``).
    """
    staged = Staged()
    with open(archive, "wb") as out:
        if code_tar:
            with open(code_tar, "rb") as code:
                shutil.copyfileobj(code, out)
        # Members are written from the current position on: after the code, or from the start.
        with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
            if not code_tar and package:
                info = tar.gettarinfo(package, arcname=PACKAGE_MEMBER)
                info.mode = 0o644
                with open(package, "rb") as data:
                    tar.addfile(info, data)
            for path in files:
                # Regular files only: directories are created as needed and keep the sandbox's modes.
                tar.add(path, arcname=f"{ROOT_PREFIX}/{path.lstrip('/')}", recursive=False)
                staged.files.append(path)
                staged.bytes += os.path.getsize(path)
            for arcname, path in (named or {}).items():
                tar.add(path, arcname=arcname, recursive=False)
                staged.files.append(path)
                staged.bytes += os.path.getsize(path)
    return staged


def unpack_command(archive: str = IN_ARCHIVE, *, inline_code: bool = False) -> str:
    """Shell: unpack the inbound archive inside the sandbox. Files that already exist are kept
    (a backend without a private root shares the launcher's datastore; never rewrite it)."""
    if inline_code:
        # One pass: root/<path> goes to /<path>, code/<path> to ./code/<path> (as an absolute path).
        return (
            f"tar -x -f {archive} -C / --skip-old-files --no-same-owner --warning=no-timestamp "
            f'--transform "s|^{ROOT_PREFIX}/||;s|^{CODE_PREFIX}/|${{PWD#/}}/{CODE_PREFIX}/|"'
        )
    return (
        f"tar -x -f {archive} --occurrence=1 {PACKAGE_MEMBER} && "
        f"tar -x -f {archive} -C / --strip-components=1 --skip-old-files --wildcards '{ROOT_PREFIX}/*'"
    )


def pack_command(loc: TaskLocation, marker: str, attempt: int, archive: str = OUT_ARCHIVE) -> str:
    """Shell: pack the outputs of the task's ``attempt`` (its directory's files but other attempts'
    numbered ones, blobs newer than ``marker``, its cards).

    A backend without a private root (the local backend's process mode) shares the launcher's
    datastore, where the task directory also holds earlier attempts' files (the runtime's
    ``0.runtime_stdout.log`` of a killed attempt): they are not this attempt's outputs, and
    ``merge_outputs`` would refuse them. Filtered by name, as the merge checks them (no clock).
    """
    task_dir, blob_dir = shlex.quote(loc.task_dir), shlex.quote(loc.blob_dir)
    cards = f'd={shlex.quote(loc.card_dir)}; [ -d "$d" ] && find "$d" -type f; ' if loc.card_dir else ""
    list_file = f"{archive}.list"
    numbered = "[0-9]+[._]"  # a file of some attempt, by its base name (``_ATTEMPT_FILE``)
    return (
        f"{{ if [ -d {task_dir} ]; then find {task_dir} -type f | grep -Ev '/{numbered}[^/]*$'; "
        f"find {task_dir} -type f \\( -name '{attempt}.*' -o -name '{attempt}_*' \\); fi; {cards}"
        f"[ -d {blob_dir} ] && find {blob_dir} -type f -newer {marker}; }} | sed 's|^/||' > {list_file}; "
        f"tar -c -f {archive} -C / -T {list_file}"
    )


def _allowed(path: str, loc: TaskLocation) -> bool:
    real = os.path.normpath(path)
    return any(real.startswith(d.rstrip("/") + "/") for d in loc.writable())


def blob_digest(blob: str, meta: str) -> str:
    """The content address of the blob file ``blob`` as Metaflow's content-addressed store reads
    it with its ``_meta`` file ``meta``: the SHA-1 of the bytes it decodes to (gzip unless
    ``cas_raw``). Raises ``UntrustedOutput`` when the pair is not a blob Metaflow would read."""
    try:
        with open(meta, "rb") as f:
            info = json.load(f)
        raw = info["cas_raw"]
        if info.get("cas_version") != 1 or not isinstance(raw, bool):
            raise ValueError(f"unknown encoding {info!r}")
        digest = hashlib.sha1()  # Metaflow's content address (not a security hash: the check is equality)
        with open(blob, "rb") as f, contextlib.nullcontext(f) if raw else gzip.GzipFile(fileobj=f) as data:
            while chunk := data.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()
    except (OSError, ValueError, KeyError, TypeError, EOFError, zlib.error) as e:
        raise UntrustedOutput(f"The blob {os.path.basename(blob)} returned by the sandbox is unreadable ({e}).") from e


def merge_outputs(
    archive: str,
    loc: TaskLocation,
    known_blobs: set[str] = frozenset(),  # type: ignore[assignment]
    *,
    attempt: int = 0,
) -> list[str]:
    """Merge the outbound archive into the local datastore, atomically per task (see module doc).

    Nothing the sandbox returns is trusted (the step's code may be hostile): every member must lie
    in this task's own directories (``TaskLocation.writable``); attempt-numbered files must be
    this ``attempt``'s; any other file that exists already (an earlier attempt's) is never replaced; each
    new blob must come with its ``_meta`` and hash to the address it is filed under, so a step can
    never plant content under the address of a value a later step or run will compute. Any
    violation refuses the whole archive (``UntrustedOutput``). Blobs the launcher already has are
    skipped. Returns the paths written.
    """
    pending: dict[str, str] = {}  # final path -> temporary file
    present: dict[str, bool] = {}  # blob key -> the datastore has it already
    own: set[str] = set()  # this attempt's files, which it may rewrite
    blob_prefix = loc.blob_dir + "/"
    try:
        with tarfile.open(archive, "r:") as tar:
            for member in tar:
                if member.isdir():
                    continue
                path = "/" + member.name.lstrip("/")
                if not member.isfile() or ".." in Path(member.name).parts or not _allowed(path, loc):
                    raise UntrustedOutput(f"The sandbox returned {member.name!r}, outside the task's own outputs.")
                if path.startswith(blob_prefix):
                    match = _BLOB.fullmatch(path[len(blob_prefix) :])
                    if not match:
                        raise UntrustedOutput(f"The sandbox returned {member.name!r}, which is not a blob's path.")
                    key = match.group(2)
                    # Decided once per blob for its two files: a sibling task merging the same
                    # content concurrently must not make us keep one half of the pair and skip the other.
                    if key not in present:
                        present[key] = key in known_blobs or os.path.exists(os.path.join(loc.blob_dir, key[:2], key))
                    if present[key]:
                        continue  # content-addressed: the datastore has these bytes already
                else:
                    numbered = _ATTEMPT_FILE.match(os.path.basename(path))
                    if numbered and path.startswith(loc.task_dir + "/"):
                        if int(numbered.group(1)) != attempt:
                            raise UntrustedOutput(
                                f"The sandbox returned {member.name!r}, a file of another attempt than {attempt}."
                            )
                        own.add(path)  # this attempt's (the runtime may have begun it: attempt.json)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
                pending[path] = tmp
                source = tar.extractfile(member)
                assert source is not None
                with os.fdopen(fd, "wb") as out:
                    while chunk := source.read(1 << 20):
                        out.write(chunk)
        _check_untrusted(pending, blob_prefix, own)
    except BaseException:
        for tmp in pending.values():
            Path(tmp).unlink(missing_ok=True)
        raise

    # Blobs first (each ``_meta`` before its blob, so a blob that exists has its ``_meta``), then
    # task files, DONE.lock last: a reader that sees DONE sees everything.
    def rank(path: str) -> tuple[bool, bool, bool]:
        is_blob = path.startswith(blob_prefix)
        return not is_blob, is_blob and not path.endswith(META), bool(DONE.match(os.path.basename(path)))

    order = sorted(pending.items(), key=lambda item: rank(item[0]))
    for path, tmp in order:
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    return [path for path, _ in order]


def _check_untrusted(pending: dict[str, str], blob_prefix: str, own: set[str]) -> None:
    """The checks of ``merge_outputs`` that need a member's content (see there); identical copies
    of existing files that are not this attempt's ``own`` are dropped from ``pending``."""
    for path in [p for p in pending if p.startswith(blob_prefix) and not p.endswith(META)]:
        meta = pending.get(path + META)
        if meta is None:
            raise UntrustedOutput(f"The sandbox returned the blob {path} without its {META} file.")
        key = os.path.basename(path)
        if blob_digest(pending[path], meta) != key:
            raise UntrustedOutput(f"The sandbox returned content under the address {key} that does not hash to it.")
    for path in [p for p in pending if p.startswith(blob_prefix) and p.endswith(META)]:
        if path.removesuffix(META) not in pending:
            raise UntrustedOutput(f"The sandbox returned {path} without the blob it describes.")
    for path in [p for p in pending if not p.startswith(blob_prefix) and p not in own and os.path.exists(p)]:
        if not filecmp.cmp(path, pending[path], shallow=False):
            raise UntrustedOutput(f"The sandbox tried to replace {path}, which an earlier attempt wrote.")
        Path(pending.pop(path)).unlink()


def save_task_logs(loc: TaskLocation, attempt: int, logs: dict[str, bytes], source: str = "task") -> None:
    """Save an attempt's captured logs where Metaflow's local datastore keeps them
    (``TaskDataStore.save_logs``: ``<task dir>/<attempt>.<source>_<stream>.log``, plain bytes), so
    ``flow.py logs`` and ``Task.stdout`` read them."""
    os.makedirs(loc.task_dir, exist_ok=True)
    for stream, data in logs.items():
        _write_atomically(os.path.join(loc.task_dir, f"{attempt}.{source}_{stream}.log"), data, mode=0o644)


def _write_atomically(path: str, data: bytes, mode: int = 0o600) -> None:
    """``path`` appears whole with ``data`` or not at all (a temporary file, renamed into place)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
