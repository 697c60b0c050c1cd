"""Print the names of a step's files on the S3 datastore, one per line, through Metaflow's own S3
client (what a reader of the datastore sees, whatever the metadata says).

Layer: tests-shared/remote (run in the flow's directory by the remote-datastore tests). Imports:
metaflow.

Usage: ``python inspect_s3.py FlowName run_id step`` (other ``--`` options are ignored).
"""

import sys

from metaflow import S3
from metaflow.metaflow_config import DATASTORE_SYSROOT_S3


def main():
    flow, run_id, step = [a for a in sys.argv[1:] if not a.startswith("--")][:3]
    with S3(s3root=f"{DATASTORE_SYSROOT_S3.rstrip('/')}/{flow}/{run_id}/{step}") as s3:
        for obj in s3.list_recursive([""]):
            print(obj.key)


if __name__ == "__main__":
    main()
