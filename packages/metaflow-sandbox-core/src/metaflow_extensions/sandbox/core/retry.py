"""Bounded exponential backoff with jitter for transient provider failures, and reconciling a
create whose answer was lost.

Layer: core (bottom). Imports: the standard library and ``core.errors``.

Backends wrap idempotent provider calls in ``with_retries`` after translating provider exceptions
to ``TransientError`` (``core.provider``); final errors pass through at once. Creating a sandbox is
not idempotent: a create that failed ambiguously (a timeout, a 5xx, a dropped connection) may have
made a sandbox all the same. ``create_with_reconcile`` asks the backend's ``find`` hook (by a label
unique to this create) before trying again, so a sandbox is never made twice.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from .errors import TransientError

T = TypeVar("T")


def backoff_delays(attempts: int, base_s: float, cap_s: float) -> list[float]:
    """Full-jitter delays between ``attempts`` tries: uniform in [0, min(cap, base * 2**i)]."""
    return [random.uniform(0, min(cap_s, base_s * 2**i)) for i in range(attempts - 1)]


def with_retries(
    call: Callable[[], T],
    *,
    attempts: int = 5,
    base_s: float = 0.25,
    cap_s: float = 8.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``call``; on ``TransientError`` retry up to ``attempts`` times in all, then re-raise."""
    for delay in backoff_delays(attempts, base_s, cap_s):
        try:
            return call()
        except TransientError:
            sleep(delay)
    return call()


def create_with_reconcile(
    create: Callable[[], T],
    find: Callable[[], T | None],
    *,
    attempts: int = 5,
    base_s: float = 0.5,
    cap_s: float = 8.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``create()``, retried on ``TransientError``; before each retry, ``find()`` looks for the
    sandbox the failed attempt may have made (by a label unique to this create) and adopts it.

    ``find`` returns the sandbox ready to use, or ``None`` (it removes one it cannot use, e.g. a
    sandbox still failing to start); a ``TransientError`` from ``find`` counts as "not found yet".
    The last failure is re-raised once ``attempts`` creates have failed.
    """
    delays = backoff_delays(attempts, base_s, cap_s)
    while True:
        try:
            return create()
        except TransientError:
            last = not delays
            if not last:
                sleep(delays.pop(0))
            try:
                found = find()
            except TransientError:
                found = None
            if found is not None:
                return found
            if last:
                raise
