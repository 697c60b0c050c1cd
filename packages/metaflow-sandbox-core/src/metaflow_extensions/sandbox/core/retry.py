"""Bounded exponential backoff with jitter for transient provider failures.

Layer: core (bottom). Imports: the standard library and ``core.errors``.

Backends wrap idempotent provider calls in ``with_retries`` after translating provider exceptions
to ``TransientError``; final errors pass through at once.
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
