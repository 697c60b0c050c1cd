"""Exceptions built the way SDKs raise them, for the tests of error translation.

Layer: tests-shared (test helpers). Imports: the standard library.
"""

from __future__ import annotations


def raised_from(outer: Exception, inner: Exception) -> Exception:
    """``outer`` as really raised from ``inner`` (``raise outer from inner``), with both tracebacks:
    translation reads the cause chain, which only a raise sets up."""
    try:
        try:
            raise inner
        except Exception as e:
            raise outer from e
    except Exception as e:
        return e
