"""File transfers with a progress watchdog: a stalled upload or download fails instead of hanging.

Layer: e2b backend. Imports: the standard library and core.

Some SDK versions put no client-side timeout on streamed transfers (a streamed upload on 2.63 is
bounded only server-side), so the transfer runs on a worker thread that records progress on every
chunk, and the caller's thread gives up when no byte moved for ``idle_s``. A given-up worker may
still be blocked inside the SDK; it holds only its own temporary file, so a retry cannot mix with it.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar

from metaflow_extensions.sandbox.core import TransientError

T = TypeVar("T")


class Progress:
    """When the last byte moved (monotonic seconds)."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def tick(self) -> None:
        self.last = time.monotonic()


class WatchedReader(io.RawIOBase):
    """A read-only binary stream over ``source`` that reports progress on every read."""

    def __init__(self, source: IO[bytes], progress: Progress):
        self._source = source
        self._progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._source.read(len(buffer))
        self._progress.tick()
        buffer[: len(data)] = data
        return len(data)


def watched(call: Callable[[Progress], T], *, idle_s: float, what: str, sandbox_id: str) -> T:
    """Run ``call(progress)`` on a worker thread; raise ``TransientError`` after ``idle_s`` without progress."""
    progress = Progress()
    outcome: list[Any] = []

    def work() -> None:
        try:
            outcome.append((True, call(progress)))
        except BaseException as e:
            outcome.append((False, e))

    worker = threading.Thread(target=work, name=f"e2b-transfer-{sandbox_id}", daemon=True)
    worker.start()
    while True:
        worker.join(0.5)
        if outcome:
            ok, value = outcome[0]
            if ok:
                return value
            raise value
        if time.monotonic() - progress.last > idle_s:
            raise TransientError(
                f"{what} in sandbox {sandbox_id} stalled: no progress for {idle_s:.0f} s.", sandbox_id=sandbox_id
            )
