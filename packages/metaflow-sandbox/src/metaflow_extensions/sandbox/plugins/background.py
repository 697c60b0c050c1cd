"""``Background``: a call running in a daemon thread whose result or exception the caller collects.

Layer: plugins (bottom: used by ``executor``). Imports: the standard library only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class Background:
    """A call running in a daemon thread; ``result()`` returns its value or raises its exception."""

    def __init__(self, call: Callable[[], Any]):
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self._value = call()
        except BaseException as e:  # handed to the caller of result()
            self._error = e

    def wait(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value
