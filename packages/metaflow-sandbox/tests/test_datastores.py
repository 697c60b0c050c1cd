"""Remote datastores without a peer: which data path a datastore gets, the inline session policy
of an assumed role, and which local metadata of a direct-path task the launcher accepts back.

Layer: tests of metaflow-sandbox. Imports: pytest, the standard library, plugins. (Credentials
against a real STS peer are tested in ``tests-shared/remote``.)
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import metaflow  # noqa: F401 - Metaflow loads this extension first; importing its modules alone would not
import pytest

from metaflow_extensions.sandbox.plugins import datastores, direct, request, staging, task_script
from metaflow_extensions.sandbox.plugins.exceptions import SandboxException

WHERE = "@sandbox on step *start*"


@pytest.mark.parametrize(
    ("datastore", "requested", "path"),
    [("local", None, "relay"), ("local", "auto", "relay"), ("local", "relay", "relay"), ("s3", "auto", "direct"),
     ("s3", "DIRECT", "direct"), ("s3", None, "direct"), ("s3", "relay", "relay")],
)  # fmt: skip
def test_each_datastore_gets_its_data_path(datastore, requested, path):
    assert datastores.data_path(datastore, requested, WHERE) == path


@pytest.mark.parametrize(
    ("endpoint", "backend", "network", "path"),
    [
        (None, "daytona", True, "direct"),  # AWS S3
        (None, "local", False, "relay"),  # no network: only the launcher reaches the bucket
        ("http://127.0.0.1:9000", "local", True, "direct"),  # a local sandbox shares the host's loopback
        ("http://localhost:9000", "daytona", True, "relay"),  # a provider's sandbox cannot reach it
        ("https://minio.example.com", "e2b", True, "direct"),
        ("https://minio.example.com", "e2b", False, "relay"),
    ],
)
def test_auto_relays_when_the_sandbox_cannot_reach_the_endpoint(monkeypatch, endpoint, backend, network, path):
    from metaflow import metaflow_config

    monkeypatch.setattr(metaflow_config, "S3_ENDPOINT_URL", endpoint)
    assert datastores.data_path("s3", "auto", WHERE, backend=backend, network=network) == path


@pytest.mark.parametrize(
    ("datastore", "requested", "message"),
    [
        ("s3", "direct", "data_path='direct' needs the sandbox's network"),
        ("local", "direct", "data_path='direct' needs a remote datastore"),
        ("azure", "auto", "--datastore=azure is not supported by sandboxed steps yet"),
        ("gs", "direct", "--datastore=gs is not supported by sandboxed steps yet"),
        ("s3", "sideways", "data_path='sideways' must be one of auto, direct, relay"),
    ],
)
def test_unsupported_combinations_are_refused_naming_the_fix(datastore, requested, message):
    with pytest.raises(SandboxException, match=r"Use|Run with|must be") as error:
        datastores.data_path(datastore, requested, WHERE, network=False)
    assert message in str(error.value) and WHERE in str(error.value)


def test_credentials_modes():
    assert datastores.credentials_mode(None, WHERE) == "temporary"
    assert datastores.credentials_mode("Forward", WHERE) == "forward"
    with pytest.raises(SandboxException, match="must be one of temporary, forward"):
        datastores.credentials_mode("static", WHERE)


def test_the_session_policy_allows_only_the_flows_prefixes():
    roots = datastores.S3Roots("s3://bkt/mf", "s3://bkt/mf/mf.cards", "s3://other/tools/", None)
    prefixes = roots.flow_prefixes("MyFlow")
    assert prefixes == ["s3://bkt/mf/MyFlow", "s3://bkt/mf/mf.cards/MyFlow", "s3://other/tools/MyFlow"]
    policy = datastores.session_policy(prefixes)
    objects, *listing = policy["Statement"]
    assert objects["Effect"] == "Allow" and objects["Resource"] == [
        "arn:aws:s3:::bkt/mf/MyFlow/*",
        "arn:aws:s3:::bkt/mf/mf.cards/MyFlow/*",
        "arn:aws:s3:::other/tools/MyFlow/*",
    ]
    assert set(objects["Action"]) == {"s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"}
    assert [s["Resource"] for s in listing] == ["arn:aws:s3:::bkt", "arn:aws:s3:::other"]
    assert all(s["Action"] == "s3:ListBucket" for s in listing)
    assert listing[0]["Condition"] == {
        "StringLike": {"s3:prefix": ["mf/MyFlow", "mf/MyFlow/*", "mf/mf.cards/MyFlow", "mf/mf.cards/MyFlow/*"]}
    }
    # Nothing is granted on the whole bucket's objects, nor any other action.
    text = str(policy)
    assert "arn:aws:s3:::bkt/*" not in text and "s3:*" not in text and "Deny" not in text


def test_urls_that_are_not_s3_are_refused():
    assert datastores.split_url("s3://bkt/a/b/") == ("bkt", "a/b")
    with pytest.raises(SandboxException, match="not an S3 URL"):
        datastores.split_url("/local/path")


def test_the_task_env_carries_configuration_but_no_secret():
    roots = datastores.S3Roots("s3://bkt/mf", None, "s3://bkt/mf/data", "http://127.0.0.1:9000")
    env = datastores.task_env(roots, "eu-west-1")
    assert env["METAFLOW_DATASTORE_SYSROOT_S3"] == "s3://bkt/mf" and env["METAFLOW_DEFAULT_DATASTORE"] == "s3"
    assert env["METAFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9000" and env["AWS_REGION"] == "eu-west-1"
    assert "METAFLOW_CARD_S3ROOT" not in env
    assert not set(env) & set(datastores.SECRET_VARIABLES)


LOC = staging.TaskLocation(root="s3://bkt/mf", flow="F", run_id="5", step="b", task_id="9")


def tarball(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_only_the_tasks_own_metadata_comes_back(tmp_path: Path):
    root = tmp_path / ".metaflow"
    (root / "F" / "5" / "_meta").mkdir(parents=True)
    (root / "F" / "5" / "_meta" / "_self.json").write_text("runtime's")
    written = direct.merge_local_metadata(
        tarball({
            ".metaflow/F/5/b/9/_meta/sysmeta_attempt_1.json": b"ok",
            ".metaflow/F/_meta/_self.json": b"flow",
            ".metaflow/F/5/_meta/_self.json": b"sandbox's",  # exists: the runtime's stays
            ".metaflow/F/5/b/8/_meta/sysmeta_attempt_1.json": b"another task",
            ".metaflow/F/5/c/_meta/_self.json": b"another step",
            ".metaflow/G/_meta/_self.json": b"another flow",
            ".metaflow/F/5/b/9/../../../../../escape": b"x",
            "elsewhere/F/5/b/9/x": b"x",
        }),
        str(root),
        LOC,
    )  # fmt: skip
    assert sorted(Path(p).relative_to(root).as_posix() for p in written) == [
        "F/5/b/9/_meta/sysmeta_attempt_1.json",
        "F/_meta/_self.json",
    ]
    assert (root / "F" / "5" / "_meta" / "_self.json").read_text() == "runtime's"
    assert not (tmp_path / "escape").exists() and not (root / "G").exists()


def test_unreadable_metadata_is_a_direct_error(tmp_path: Path):
    with pytest.raises(direct.DirectError, match="unreadable"):
        direct.merge_local_metadata(b"not a tarball", str(tmp_path), LOC)


def test_a_direct_task_neither_stages_nor_packs_data(tmp_path: Path):
    root = tmp_path / ".metaflow"
    (root / "F" / "5" / "b" / "9" / "_meta").mkdir(parents=True)
    for folder in ("F", "F/5", "F/5/b", "F/5/b/9"):
        (root / folder / "_meta" / "_self.json").parent.mkdir(parents=True, exist_ok=True)
        (root / folder / "_meta" / "_self.json").write_text("{}")
    req = request.TaskRequest(
        backend="local", backend_options={}, step_command="true", location=LOC, input_paths=["5/a/3"],
        extract_commands=[], extract_env={}, env={}, labels={}, hard_limit_s=60, data_path="direct",
        datastore="s3", secret_env={"AWS_SESSION_TOKEN": "t"}, metadata_root=str(root), code_tar="code.tar",
    )  # fmt: skip
    text = task_script.script(req)
    assert "ln -sfn" not in text and staging.OUT_ARCHIVE not in text
    assert 'METAFLOW_DATASTORE_SYSROOT_LOCAL="$PWD"' in text
    assert "AWS_SESSION_TOKEN" not in text  # credentials go in the command's environment only
    assert sorted(direct.metadata_inputs(req)) == [
        "code/.metaflow/F/5/_meta/_self.json",
        "code/.metaflow/F/5/b/9/_meta/_self.json",
        "code/.metaflow/F/5/b/_meta/_self.json",
        "code/.metaflow/F/_meta/_self.json",
    ]
    path = tmp_path / "req.json"
    req.save(str(path))
    assert request.TaskRequest.load(str(path)) == req


def test_credentials_travel_as_a_private_file_the_script_sources(tmp_path: Path):
    import subprocess

    secrets = {"AWS_SECRET_ACCESS_KEY": "s3cr'et $(rm -rf /)", "AWS_SESSION_TOKEN": "tok"}
    path = task_script.write_secrets(secrets, str(tmp_path))
    assert os.stat(path).st_mode & 0o777 == 0o600
    shown = subprocess.run(
        ["bash", "-c", f"set -a && . {path} && set +a && env -0"], capture_output=True, check=True
    ).stdout.decode()
    assert {"AWS_SECRET_ACCESS_KEY=s3cr'et $(rm -rf /)", "AWS_SESSION_TOKEN=tok"} <= set(shown.split("\0"))
