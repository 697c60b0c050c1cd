"""A real S3 (and STS) peer for tests: ``moto_server`` from PyPI (``moto[server]``) on loopback.

Layer: tests-shared. Imports: the standard library; boto3 inside functions (it comes with Metaflow
in the sessions that use this module).

``moto_server`` serves S3, STS and IAM on one port. Auth is off (any key works), so it shows
*which* credentials a client used but does not enforce session policies (see
``/work/shared/research/remote.md``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .emulators import free_port, stop

BUCKET = "mfsbx-e2e"
REGION = "us-east-1"
# Static test keys, the "long-lived" secrets no sandbox may see by default.
STATIC_KEY_ID = "AKIAMFSBXSTATICKEY01"
STATIC_SECRET = "mfsbx-static-secret-never-in-a-sandbox"
READY_S = 60


@dataclass(frozen=True)
class S3Server:
    url: str
    bucket: str

    def env(self, prefix: str) -> dict[str, str]:
        """What a Metaflow user sets to run on this S3, with the datastore under ``prefix``."""
        return {
            "METAFLOW_DEFAULT_DATASTORE": "s3",
            "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{self.bucket}/{prefix}",
            "METAFLOW_S3_ENDPOINT_URL": self.url,
            "AWS_ENDPOINT_URL_STS": self.url,
            "AWS_ACCESS_KEY_ID": STATIC_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": STATIC_SECRET,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=STATIC_KEY_ID,
            aws_secret_access_key=STATIC_SECRET,
        )


def create_role(server: S3Server, name: str) -> str:
    """A role anyone may assume, on ``server``'s IAM; returns its ARN."""
    import boto3

    iam = boto3.client(
        "iam", endpoint_url=server.url, region_name=REGION,
        aws_access_key_id=STATIC_KEY_ID, aws_secret_access_key=STATIC_SECRET,
    )  # fmt: skip
    anyone = {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}
    trust = json.dumps({"Version": "2012-10-17", "Statement": [anyone]})
    return str(iam.create_role(RoleName=name, AssumeRolePolicyDocument=trust)["Role"]["Arn"])


def _moto_server() -> str:
    """The ``moto_server`` script of this interpreter's environment."""
    beside = Path(sys.executable).parent / "moto_server"
    found = str(beside) if beside.exists() else shutil.which("moto_server")
    if not found:
        raise RuntimeError("moto_server is not installed: pip install 'moto[server]'")
    return found


@contextlib.contextmanager
def start_moto(bucket: str = BUCKET) -> Iterator[S3Server]:
    """Run ``moto_server`` on a free loopback port until the block ends, with ``bucket`` created."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen(
        [_moto_server(), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + READY_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {url} (exit code {proc.poll()})") from None
                time.sleep(0.2)
        server = S3Server(url, bucket)
        server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        stop(proc)
