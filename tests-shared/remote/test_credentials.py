"""Which credentials a sandbox gets, minted against a real STS peer (moto): never the user's static
secret unless forwarded on opt-in; an assumed role's session when a role is configured; the
user's own temporary credentials passed as they are.

Layer: tests-shared/remote. Imports: pytest, boto3, metaflow, plugins, ``sandbox_testing``.
(moto does not enforce session policies: the policy document is unit-tested in
``test_datastores.py``.)
"""

from __future__ import annotations

import metaflow  # noqa: F401 - Metaflow loads this extension first; importing its modules alone would not
import pytest

from metaflow_extensions.sandbox.plugins import datastores
from sandbox_testing.moto import REGION, STATIC_KEY_ID, STATIC_SECRET, create_role

PREFIXES = ["s3://mfsbx-e2e/creds/CredFlow"]


@pytest.fixture
def aws(s3, monkeypatch):
    for name, value in s3.env(prefix="creds").items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(datastores.ROLE_ARN_ENV, raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    return s3


def test_static_keys_become_a_temporary_session(aws):
    env = datastores.mint("temporary", PREFIXES, "u").env
    assert env["AWS_SESSION_TOKEN"]
    assert env["AWS_SECRET_ACCESS_KEY"] != STATIC_SECRET and env["AWS_ACCESS_KEY_ID"] != STATIC_KEY_ID


def test_a_configured_role_is_assumed_with_the_flows_policy(aws, monkeypatch):
    import boto3

    role = create_role(aws, "mfsbx-task")
    monkeypatch.setenv(datastores.ROLE_ARN_ENV, role)
    minted = datastores.mint("temporary", PREFIXES, "u")
    assert role in minted.kind and minted.expires_at is not None
    assert minted.env["AWS_SESSION_TOKEN"] and minted.env["AWS_SECRET_ACCESS_KEY"] != STATIC_SECRET
    # The session is the role's: STS says so to whoever holds it.
    who = boto3.client(
        "sts", endpoint_url=aws.url, region_name=REGION,
        aws_access_key_id=minted.env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=minted.env["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=minted.env["AWS_SESSION_TOKEN"],
    ).get_caller_identity()  # fmt: skip
    assert ":assumed-role/mfsbx-task/metaflow-sandbox-u" in who["Arn"]


def test_temporary_credentials_pass_as_they_are_and_static_ones_only_on_opt_in(aws, monkeypatch):
    assert datastores.mint("forward", PREFIXES, "u").env == {
        "AWS_ACCESS_KEY_ID": STATIC_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": STATIC_SECRET,
    }
    monkeypatch.setenv("AWS_SESSION_TOKEN", "already-temporary")
    assert datastores.mint("temporary", PREFIXES, "u").env["AWS_SESSION_TOKEN"] == "already-temporary"


def test_no_credentials_at_all_is_refused_naming_the_fix(aws, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(datastores.SandboxException, match=r"No AWS credentials found.*AWS_ACCESS_KEY_ID"):
        datastores.mint("temporary", PREFIXES, "u")
