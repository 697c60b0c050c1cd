"""Bad remote-datastore input is refused before the run starts (before "Workflow starting" and any
sandbox), with a message naming the fix. (Azure and GS: Metaflow itself refuses first without their SDKs;
the refusal of ours is unit-tested in ``test_datastores.py``.)

Layer: tests-shared/remote. Imports: pytest, ``sandbox_testing``.
"""

from __future__ import annotations

import pytest

from sandbox_testing.emulators import free_port

pytestmark = pytest.mark.e2e

NO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "",
    "AWS_SECRET_ACCESS_KEY": "",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
    "AWS_CONFIG_FILE": "/nonexistent/config",
    "AWS_EC2_METADATA_DISABLED": "true",
}

CASES = {
    "missing-bucket": ([], {"METAFLOW_DATASTORE_SYSROOT_S3": "s3://mfsbx-no-such-bucket/x"}, "does not exist"),
    "unreachable-endpoint": ([], {"METAFLOW_S3_ENDPOINT_URL": "unreachable"}, "Cannot reach the S3 endpoint"),
    "missing-credentials": ([], NO_CREDENTIALS, "No AWS credentials found"),
    "direct-without-network": (
        ["--with", "sandbox:data_path=direct,network=False"],
        {},
        "data_path='direct' needs the sandbox's network",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_remote_input_is_refused_before_the_run(s3dir, case):
    args, env, message = CASES[case]
    if env.get("METAFLOW_S3_ENDPOINT_URL") == "unreachable":
        env = {"METAFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    with_sandbox = [] if "--with" in args else ["--with", "sandbox"]
    proc = s3dir.run("s3_flow.py", *with_sandbox, *args, "run", ok=False, env=env)
    output = proc.stdout + proc.stderr
    assert message in output
    assert "Workflow starting" not in output
    assert not s3dir.sandbox_root.exists() or s3dir.live_sandboxes("s3_flow.py") == []
