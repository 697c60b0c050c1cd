"""Before a run starts: every backend the run's steps use is constructed with its options once
(types, credentials) and asked one cheap question (``list``), so that bad options, missing keys and
an unreachable API fail before "Workflow starting", naming the fix, instead of in every task.
Warnings a backend gives when constructed (e.g. the local backend without bubblewrap) are said
here once for the whole run; the launchers are told which ones (``TaskRequest.shown_warnings``)
and stay quiet, instead of repeating them in every task.

Layer: plugins (bottom: used by the decorator, in the runtime process only). Imports: the core
API and the standard library.
"""

from __future__ import annotations

import json
import warnings
from functools import cache
from typing import Any

from metaflow_extensions.sandbox.core import ConfigurationError, SandboxError, get_backend

# Labels no sandbox carries: the answer is empty, the call proves the API answers and accepts us.
_PROBE = {"metaflow-sandbox-preflight": "probe"}


_shown: list[str] = []  # the warnings said in this process, in order


def check_backend(backend: str, options: dict[str, Any]) -> list[str]:
    """Raise ``SandboxError`` (a ``ConfigurationError`` naming the fix) if ``backend`` cannot run
    sandboxes with ``options``; each backend and options are checked once per process. Returns
    the backend's warnings not returned before in this process (the caller says them)."""
    new = [message for message in _check(backend, json.dumps(options, sort_keys=True)) if message not in _shown]
    _shown.extend(new)
    return new


def shown_warnings() -> list[str]:
    """Every warning ``check_backend`` returned in this process: launchers need not repeat them."""
    return list(_shown)


@cache
def _check(backend: str, options_json: str) -> tuple[str, ...]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        instance = get_backend(backend, **json.loads(options_json))
    try:
        instance.list(_PROBE)
    except ConfigurationError:
        raise
    except SandboxError as e:
        raise ConfigurationError(
            f"The {backend} backend is configured but its API did not answer ({e}).",
            remedy="Check the API URL and your network, or retry when the provider is back.",
        ) from e
    return tuple(dict.fromkeys(str(warning.message) for warning in caught))
