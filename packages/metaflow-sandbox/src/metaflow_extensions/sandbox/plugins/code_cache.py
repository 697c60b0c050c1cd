"""The per-user cache of code packages (as archives and unpacked), bounded in size.

Layer: plugins (bottom: used by ``staging``). Imports: the standard library and ``core.doctor``
(where the cache lives and its bound, which ``metaflow-sandbox doctor`` reports too).

Every entry (a file or a directory directly in the cache directory) is built once, atomically,
by whichever process needs it first. A process that uses an entry holds a shared ``flock`` on it
for as long as it lives: the runtime takes it when it reroutes its first sandboxed task, so its
launchers and sandboxes (which read the archive or mount the directory) are covered for the
whole run. Building a new entry evicts the least recently used others while the cache exceeds
``$METAFLOW_SANDBOX_CODE_CACHE_MB``; an entry is evicted only under an exclusive lock, which no
process using it would grant, so a running task never loses its code.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from metaflow_extensions.sandbox.core.doctor import code_cache_dir, code_cache_limit_mb

ENTRY_SUFFIXES = (".tar", ".pkg", ".d")
_STALE_TEMPORARY_S = 3600  # a half-built entry this old belongs to a builder that died
_held: dict[str, int] = {}  # entry path -> descriptor holding this process's shared lock


def cache_dir() -> str:
    return str(code_cache_dir())


def cached(path: str, build: Callable[[], object]) -> str:
    """``path`` (an entry of the cache), built with ``build()`` unless it exists; in use by this
    process from now on (it is never evicted while this process lives)."""
    for _ in range(3):  # another process may evict it between our build and our lock: rare
        if use(path):
            return path
        build()
        if use(path):
            evict(os.path.dirname(path), code_cache_limit_mb() * 2**20)
            return path
    raise OSError(f"The code cache entry {path} vanished while it was being built; is {cache_dir()} shared?")


def publish(tmp: str, path: str) -> None:
    """Make the finished file ``tmp`` (in the cache directory) the entry ``path`` unless another
    process made it first (its copy wins: same key, same content); in use by this process."""
    with contextlib.suppress(FileExistsError):
        os.link(tmp, path)  # atomic, and never over an existing entry
    if use(path):
        evict(os.path.dirname(path), code_cache_limit_mb() * 2**20)


def use(path: str) -> bool:
    """Take a shared lock on the entry at ``path`` for this process's lifetime and mark it as
    recently used; False when there is no such entry (any more)."""
    if path in _held:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits while another process evicts it
    try:
        same = os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        same = False
    if not same:  # evicted while we waited (and perhaps rebuilt: then lock the new one)
        os.close(fd)
        return False
    _held[path] = fd
    with contextlib.suppress(OSError):
        os.utime(path)  # the eviction order: least recently used first
    return True


def size_of(path: str) -> int:
    """Bytes of the files of an entry (a file or a directory)."""
    if not os.path.isdir(path) or os.path.islink(path):
        with contextlib.suppress(OSError):
            return os.lstat(path).st_size
        return 0
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def evict(directory: str, limit_bytes: int) -> list[str]:
    """Remove the least recently used entries of ``directory`` not in use by any process until
    the rest fits in ``limit_bytes``; half-built leftovers of dead builders go first. Returns
    the removed paths."""
    now = time.time()
    entries = []
    with os.scandir(directory) as scan:
        for entry in scan:
            with contextlib.suppress(OSError):
                mtime = entry.stat(follow_symlinks=False).st_mtime
                if entry.name.startswith("."):
                    if now - mtime > _STALE_TEMPORARY_S:
                        entries.append((0.0, entry.path))  # a dead builder's: first out
                elif entry.name.endswith(ENTRY_SUFFIXES):
                    entries.append((mtime, entry.path))
    sizes = {path: size_of(path) for _, path in entries}
    total = sum(sizes.values())
    removed = []
    for _, path in sorted(entries):
        if total <= limit_bytes:
            break
        if path not in _held and _remove_unused(path):
            total -= sizes[path]
            removed.append(path)
    return removed


def _remove_unused(path: str) -> bool:
    """Delete the entry at ``path`` if no process holds it; renamed away first, under the lock,
    so that no one opens a half-deleted entry."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # in use
        trash = os.path.join(os.path.dirname(path), f".evicted-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, trash)
        except OSError:
            return False
    finally:
        os.close(fd)
    if os.path.isdir(trash) and not os.path.islink(trash):
        shutil.rmtree(trash, ignore_errors=True)
    else:
        Path(trash).unlink(missing_ok=True)
    return True
