"""Pieces of the ``sandbox step`` launcher that need no flow: retry delays and long input paths.

Layer: tests of metaflow-sandbox. Imports: pytest, the standard library, metaflow, plugins.
"""

from __future__ import annotations

from types import SimpleNamespace

from metaflow_extensions.sandbox.plugins.sandbox_cli import INPUT_PATHS_CHUNK, _input_path_env, _retry_delay


def node(*decos):
    return SimpleNamespace(decorators=list(decos))


def test_minutes_between_retries_is_honoured_on_retries_only():
    retry = SimpleNamespace(name="retry", attributes={"times": "3", "minutes_between_retries": "2"})
    assert _retry_delay(node(retry), 0) == 0
    assert _retry_delay(node(retry), 1) == 120
    assert _retry_delay(node(), 1) == 0
    zero = SimpleNamespace(name="retry", attributes={"minutes_between_retries": 0})
    assert _retry_delay(node(zero), 2) == 0


def test_long_input_paths_travel_in_environment_variables():
    paths = "r/s/" + ",".join(str(i) for i in range(20000))
    kwargs = {"input_paths": paths}
    env = _input_path_env(kwargs)
    assert all(len(v) <= INPUT_PATHS_CHUNK for v in env.values()) and "".join(env.values()) == paths
    assert kwargs["input_paths"] == "".join(f"${{{k}}}" for k in env)
    assert _input_path_env({"input_paths": None}) == {}
