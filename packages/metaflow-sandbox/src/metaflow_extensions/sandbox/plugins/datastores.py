"""Remote datastores, runtime side: which datastore and data path a sandboxed task uses, the checks
made before the run, and the environment and short-lived credentials of a *direct*-path task.

Layer: plugins (bottom of the integration: used by the decorator's ``step_init`` and by ``reroute``,
both in the runtime process, never inside a sandbox). Imports: ``plugins.exceptions``, metaflow's
configuration and boto3/botocore lazily (Metaflow's own S3 dependency; only S3 runs need them).

Data paths: *relay* (the launcher moves the bytes: for a remote datastore through a local mirror,
see ``relay``) and *direct* (the task in the sandbox reads and writes the datastore itself, as
``@batch`` does); ``data_path`` chooses.

Credentials for the direct path never are the user's long-lived keys unless the user opts in
(``credentials="forward"``): with ``METAFLOW_SANDBOX_S3_ROLE_ARN`` the sandbox gets an assumed
role's session limited by an inline policy to the flow's prefixes; otherwise the user's temporary
credentials as they are, or a ``get_session_token`` session minted from their static keys.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from .exceptions import SandboxException

DATA_PATHS = ("auto", "direct", "relay")
CREDENTIALS = ("temporary", "forward")
REMOTE_SUPPORTED = ("s3",)
ROLE_ARN_ENV = "METAFLOW_SANDBOX_S3_ROLE_ARN"
DURATION_ENV = "METAFLOW_SANDBOX_S3_SESSION_DURATION_S"
DEFAULT_DURATION_S = 3600
# STS refuses shorter sessions.
MIN_DURATION_S = 900
# The checks before the run must fail fast on an unreachable endpoint, not retry for minutes.
CHECK_TIMEOUT_S = 5
SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def data_path(datastore: str, requested: Any, where: str, *, backend: str = "local", network: bool = True) -> str:
    """The data path a task on ``datastore`` uses (``requested`` is the decorator's ``data_path``),
    or a SandboxException naming the fix (``where`` names the decorator and step).

    ``auto`` on a remote datastore: relay when the sandbox cannot reach the endpoint (no network,
    or a loopback endpoint seen from a backend other than ``local``, whose sandboxes share this
    machine's loopback when the network is on), direct otherwise: the same rule as the metadata
    service's (``service.metadata_path``)."""
    choice = str(requested or "auto").strip().lower()
    if choice not in DATA_PATHS:
        raise SandboxException(f"{where}: data_path={requested!r} must be one of {', '.join(DATA_PATHS)}.")
    if datastore == "local":
        if choice == "direct":
            raise SandboxException(
                f"{where}: data_path='direct' needs a remote datastore (the sandbox cannot reach the local "
                "one). Use --datastore=s3, or data_path='relay' (the default for the local datastore)."
            )
        return "relay"
    if datastore not in REMOTE_SUPPORTED:
        raise SandboxException(
            f"{where}: --datastore={datastore} is not supported by sandboxed steps yet (supported: local, "
            f"{', '.join(REMOTE_SUPPORTED)}). Run with --datastore=local or --datastore=s3 (S3 or any "
            "S3-compatible store through METAFLOW_S3_ENDPOINT_URL)."
        )
    if choice == "direct" and not network:
        raise SandboxException(
            f"{where}: data_path='direct' needs the sandbox's network, but the step has network=False. Use "
            "data_path='relay' (or 'auto'): the launcher then moves the task's data."
        )
    if choice != "auto":
        return choice
    from metaflow import metaflow_config as config

    from .service import is_loopback

    endpoint = str(getattr(config, "S3_ENDPOINT_URL", None) or "")
    if not network or (endpoint and is_loopback(endpoint) and backend != "local"):
        return "relay"
    return "direct"


def credentials_mode(requested: Any, where: str) -> str:
    choice = str(requested or "temporary").strip().lower()
    if choice not in CREDENTIALS:
        raise SandboxException(f"{where}: credentials={requested!r} must be one of {', '.join(CREDENTIALS)}.")
    return choice


@dataclass(frozen=True)
class S3Roots:
    """Where a flow's data lives on S3 (``s3://bucket/prefix`` URLs)."""

    datastore: str
    cards: str | None
    datatools: str | None
    endpoint_url: str | None

    def flow_prefixes(self, flow: str) -> list[str]:
        """The URLs a task of ``flow`` reads and writes: its data, cards and IncludeFile data."""
        roots = [r for r in (self.datastore, self.cards, self.datatools) if r]
        return sorted({f"{root.rstrip('/')}/{flow}" for root in roots})


def s3_roots(datastore_root: str) -> S3Roots:
    """The roots Metaflow's configuration gives for this run (``datastore_root`` from the runtime)."""
    from metaflow import metaflow_config as config

    return S3Roots(
        datastore=datastore_root,
        cards=getattr(config, "CARD_S3ROOT", None),
        datatools=getattr(config, "DATATOOLS_S3ROOT", None),
        endpoint_url=getattr(config, "S3_ENDPOINT_URL", None),
    )


def split_url(url: str) -> tuple[str, str]:
    """(bucket, key prefix without slashes at its ends) of ``s3://bucket/prefix``."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise SandboxException(f"{url!r} is not an S3 URL (s3://bucket/prefix): check METAFLOW_DATASTORE_SYSROOT_S3.")
    return parsed.netloc, parsed.path.strip("/")


def session_policy(prefixes: list[str]) -> dict[str, Any]:
    """The inline session policy of an assumed role: objects under ``prefixes`` (``s3://`` URLs)
    may be read and written, and listed by prefix; nothing else of the account or bucket."""
    objects: set[str] = set()
    listing: dict[str, set[str]] = {}
    for url in prefixes:
        bucket, prefix = split_url(url)
        objects.add(f"arn:aws:s3:::{bucket}/{prefix}/*" if prefix else f"arn:aws:s3:::{bucket}/*")
        listing.setdefault(bucket, set()).update([prefix, f"{prefix}/*"] if prefix else ["*"])
    statements: list[dict[str, Any]] = [
        {
            "Sid": "FlowObjects",
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"],
            "Resource": sorted(objects),
        }
    ]
    for bucket, wanted in sorted(listing.items()):
        statements.append(
            {
                "Sid": f"List{len(statements)}",
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": f"arn:aws:s3:::{bucket}",
                "Condition": {"StringLike": {"s3:prefix": sorted(wanted)}},
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}


def task_env(roots: S3Roots, region: str | None) -> dict[str, str]:
    """The configuration (no secrets) a direct-path task needs to find the datastore in the sandbox,
    whatever profile or config file the launcher's Metaflow read it from."""
    env = {"METAFLOW_DEFAULT_DATASTORE": "s3", "METAFLOW_DATASTORE_SYSROOT_S3": roots.datastore}
    optional = {
        "METAFLOW_CARD_S3ROOT": roots.cards,
        "METAFLOW_DATATOOLS_S3ROOT": roots.datatools,
        "METAFLOW_S3_ENDPOINT_URL": roots.endpoint_url,
        "AWS_DEFAULT_REGION": region,
        "AWS_REGION": region,
    }
    env.update({name: value for name, value in optional.items() if value})
    return env


def _duration_s() -> int:
    raw = os.environ.get(DURATION_ENV, str(DEFAULT_DURATION_S))
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < MIN_DURATION_S:
        raise SandboxException(f"{DURATION_ENV}={raw!r} must be a number of seconds, at least {MIN_DURATION_S}.")
    return value


def _boto_config() -> Any:
    from botocore.config import Config

    return Config(connect_timeout=CHECK_TIMEOUT_S, read_timeout=CHECK_TIMEOUT_S * 3, retries={"max_attempts": 2})


@dataclass(frozen=True)
class Minted:
    """Credentials for a sandbox: the variables, what they are (for messages), when they expire."""

    env: dict[str, str]
    kind: str
    expires_at: float | None  # epoch seconds; None: not known to expire (forwarded static keys)


def _frozen_env(frozen: Any) -> dict[str, str]:
    env = {"AWS_ACCESS_KEY_ID": frozen.access_key, "AWS_SECRET_ACCESS_KEY": frozen.secret_key}
    if frozen.token:
        env["AWS_SESSION_TOKEN"] = frozen.token
    return env


def mint(mode: str, prefixes: list[str], user: str) -> Minted:
    """Credentials for the sandboxes of this run (see the module docstring for the rules)."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    session = boto3.session.Session()
    found = session.get_credentials()
    if found is None:
        raise SandboxException(
            "No AWS credentials found for the S3 datastore: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE, or another source boto3 reads) in the environment of the run."
        )
    frozen = found.get_frozen_credentials()
    role = os.environ.get(ROLE_ARN_ENV, "").strip()
    if mode == "forward":
        return Minted(_frozen_env(frozen), "your own credentials, forwarded (credentials='forward')", None)
    if not role and frozen.token:
        # Already temporary (an assumed role, SSO, an instance profile): pass them as they are.
        return Minted(_frozen_env(frozen), "your own temporary credentials", None)
    duration = _duration_s()
    sts = session.client("sts", config=_boto_config())
    try:
        if role:
            answer = sts.assume_role(
                RoleArn=role,
                RoleSessionName=f"metaflow-sandbox-{user}"[:64],
                Policy=json.dumps(session_policy(prefixes)),
                DurationSeconds=duration,
            )
            kind = f"assumed role {role}, limited to the flow's prefixes"
        else:
            answer = sts.get_session_token(DurationSeconds=duration)
            kind = "a temporary session (sts:GetSessionToken)"
    except (BotoCoreError, ClientError) as e:
        how = f"assume {ROLE_ARN_ENV}={role}" if role else "get a session token (sts:GetSessionToken)"
        raise SandboxException(
            f"Could not {how} for the sandboxes' S3 credentials: {e}. Fix the STS access (for an S3-compatible "
            "store, point AWS_ENDPOINT_URL_STS at its STS endpoint), set "
            f"{ROLE_ARN_ENV} to a role you may assume, or opt in to forwarding your own keys with "
            "@sandbox(credentials='forward')."
        ) from e
    creds = answer["Credentials"]
    env = {
        "AWS_ACCESS_KEY_ID": creds["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": creds["SecretAccessKey"],
        "AWS_SESSION_TOKEN": creds["SessionToken"],
    }
    return Minted(env, kind, creds["Expiration"].timestamp())


_minted: dict[tuple[str, tuple[str, ...], str], Minted] = {}


def credentials_env(mode: str, prefixes: list[str], user: str) -> dict[str, str]:
    """The credential variables of a sandbox, minted once per run and again when less than half
    of their lifetime remains (a task gets at least half a session)."""
    key = (mode, tuple(prefixes), user)
    known = _minted.get(key)
    if known is None or (known.expires_at is not None and known.expires_at - time.time() < _duration_s() / 2):
        known = _minted[key] = mint(mode, prefixes, user)
    return dict(known.env)


@functools.cache  # once per run: the runtime asks for every task
def region() -> str | None:
    import boto3

    return boto3.session.Session().region_name


@functools.cache  # once per run, for all steps
def announce(logger: Any, message: str) -> None:
    """Say ``message`` once per run (``step_init`` runs for every sandboxed step)."""
    logger(message)


@functools.cache  # once per run, for all steps
def check_s3(datastore_root: str, mode: str, flow: str, user: str) -> str:
    """Before the run: the bucket exists and is reachable with the run's credentials, and the
    sandboxes' credentials can be minted and used. Returns what those credentials are (for the
    user); raises a SandboxException naming the fix."""
    check_bucket(datastore_root)
    return _check_sandbox_credentials(s3_roots(datastore_root), mode, flow, user)


@functools.cache  # once per run, for all steps
def check_bucket(datastore_root: str) -> None:
    """Before the run: the datastore's bucket exists and is reachable with the run's credentials
    (the launcher's, which move the data on the relay path); a SandboxException naming the fix."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    roots = s3_roots(datastore_root)
    bucket, _ = split_url(datastore_root)
    where = roots.endpoint_url or "AWS S3"
    client = boto3.session.Session().client("s3", endpoint_url=roots.endpoint_url, config=_boto_config())
    try:
        client.head_bucket(Bucket=bucket)
    except NoCredentialsError as e:
        raise SandboxException(
            "No AWS credentials found for the S3 datastore: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE) in the environment of the run."
        ) from e
    except EndpointConnectionError as e:
        raise SandboxException(
            f"Cannot reach the S3 endpoint {where} ({e}). Check METAFLOW_S3_ENDPOINT_URL and that the "
            "server is running and reachable from this machine."
        ) from e
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            raise SandboxException(
                f"The S3 bucket {bucket!r} of the datastore ({datastore_root}) does not exist at {where}. "
                "Create it, or point METAFLOW_DATASTORE_SYSROOT_S3 at an existing bucket."
            ) from e
        raise SandboxException(
            f"The run's AWS credentials may not access the S3 bucket {bucket!r} at {where} ({code}). "
            "Check the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE...) and the bucket's policy."
        ) from e
    except BotoCoreError as e:
        raise SandboxException(f"Cannot reach the S3 endpoint {where} ({e}). Check METAFLOW_S3_ENDPOINT_URL.") from e


def _check_sandbox_credentials(roots: S3Roots, mode: str, flow: str, user: str) -> str:
    """The sandboxes' credentials can be minted and list the flow's prefix (what an assumed
    role's session policy allows; a bucket-wide call would be refused by it)."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    prefixes = roots.flow_prefixes(flow)
    minted = credentials_env(mode, prefixes, user)
    bucket, prefix = split_url(roots.datastore)
    flow_prefix = f"{prefix}/{flow}/" if prefix else f"{flow}/"
    client = boto3.session.Session(
        aws_access_key_id=minted["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=minted["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=minted.get("AWS_SESSION_TOKEN"),
        region_name=region(),
    ).client("s3", endpoint_url=roots.endpoint_url, config=_boto_config())
    known = _minted.get((mode, tuple(prefixes), user))
    kind = known.kind if known else mode
    try:
        client.list_objects_v2(Bucket=bucket, Prefix=flow_prefix, MaxKeys=1)
    except (BotoCoreError, ClientError) as e:
        raise SandboxException(
            f"The credentials minted for the sandboxes ({kind}) may not list "
            f"s3://{bucket}/{flow_prefix} ({e}). Give the role (or your identity) access to the flow's prefix, "
            "or opt in to forwarding your own keys with @sandbox(credentials='forward')."
        ) from e
    return kind
