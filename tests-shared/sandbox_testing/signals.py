"""Child processes that take Ctrl-C as a program started from a terminal does.

Layer: tests-shared (test helpers). Imports: the standard library.
"""

from __future__ import annotations

import signal


def ctrl_c_default() -> None:
    """A ``preexec_fn``: SIGINT back to its default disposition in the child.

    A shell that runs a job in the background without job control (as CI scripts and runners may)
    starts it with SIGINT ignored; children inherit that, and Python then never raises
    ``KeyboardInterrupt``, so a test sending Ctrl-C would test nothing and hang.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
