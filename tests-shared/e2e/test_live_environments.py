"""``@pypi`` in a sandbox for real: Metaflow's bootstrap downloads micromamba and reads the
packages the run cached in a real S3 datastore (``-m live``: this needs the network and a bucket).
What can be checked offline (the refusals before the run, the bootstrap's order in the step's
command) is in ``test_flows.py`` and the unit tests of ``reroute``.

Layer: tests-shared/e2e. Imports: pytest, the standard library, ``sandbox_testing``.

Set ``MFSBX_LIVE_S3_ROOT`` (``s3://bucket/prefix``) and AWS credentials in the environment.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from sandbox_testing.flows import task

S3_ROOT = os.environ.get("MFSBX_LIVE_S3_ROOT", "")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.live,
    pytest.mark.skipif(not S3_ROOT, reason="MFSBX_LIVE_S3_ROOT is not set: no real S3 datastore to test against"),
]


def test_a_pypi_step_bootstraps_its_environment_in_the_sandbox(flowdir):
    assert importlib.util.find_spec("tomli_w") is None, "the launcher's environment must lack the package"
    # The run and the Client API that reads it back both use the S3 datastore.
    flowdir.env = {**flowdir.env, "METAFLOW_DEFAULT_DATASTORE": "s3", "METAFLOW_DATASTORE_SYSROOT_S3": S3_ROOT}
    flowdir.run("pypi_flow.py", "--environment=pypi", "run")
    run = flowdir.inspect("PypiFlow")
    assert run["successful"], run
    start = task(run, "start")
    assert start["artifacts"]["dumped"] == "a = 1\n" and start["artifacts"]["sandboxed"]
    assert "Bootstrapping virtual environment..." in start["stdout"]
    assert flowdir.live_sandboxes("pypi_flow.py") == []
