"""A flow for remote datastores: parameters, an IncludeFile, output on both streams, a card, a
nested foreach + joins, a large artifact sized by @environment, a failure switched by the
launcher's environment (for resume), and in every step a probe of the AWS credentials the step
sees (never the secret itself).

Layer: tests-shared/remote (a flow run by the remote-datastore tests). Imports: metaflow.
"""

import hashlib
import os
import sys

from metaflow import FlowSpec, IncludeFile, Parameter, card, current, environment, step

MIB = 1024 * 1024


def probe():
    """Which credentials this step got: a session token or not, and a digest of the secret key
    (compared by the test with the user's static one; the secret is never printed)."""
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    return {
        "session_token": bool(os.environ.get("AWS_SESSION_TOKEN")),
        "secret_sha": hashlib.sha256(secret.encode()).hexdigest(),
        "in_sandbox": bool(os.environ.get("METAFLOW_SANDBOX_ID")),
    }


class S3Flow(FlowSpec):
    alpha = Parameter("alpha", default=1, type=int)
    # Uploaded by the runtime to the datatools root on S3, read back by the task in the sandbox.
    data = IncludeFile("data", default=None)

    @card(type="blank")
    @step
    def start(self):
        from metaflow.cards import Markdown

        current.card.append(Markdown("# card-from-s3"))
        self.creds = probe()
        self.data_text = self.data
        print(f"start says alpha={self.alpha}")
        print("start warns", file=sys.stderr)
        self.items = list(range(2))
        self.next(self.fan, foreach="items")

    @step
    def fan(self):
        self.creds = probe()
        self.value = self.input * 10 + self.alpha
        print(f"fan value {self.value}")
        self.parts = [0, 1]
        self.next(self.inner, foreach="parts")

    @step
    def inner(self):
        self.creds = probe()
        self.part_value = self.value + self.input
        self.next(self.inner_join)

    @step
    def inner_join(self, inputs):
        self.creds = probe()
        self.value = inputs[0].value
        self.part_sum = sum(i.part_value for i in inputs)
        self.next(self.join)

    @step
    def join(self, inputs):
        self.creds = probe()
        self.values = sorted(i.value for i in inputs)
        self.part_sums = sorted(i.part_sum for i in inputs)
        self.next(self.large)

    # Evaluated on the launcher when the flow is loaded: the size reaches the sandbox through it.
    @environment(vars={"BIG_MB": os.environ.get("BIG_MB", "1")})
    @step
    def large(self):
        self.creds = probe()
        self.big = os.urandom(int(os.environ["BIG_MB"]) * MIB)
        self.big_sha = hashlib.sha256(self.big).hexdigest()
        self.next(self.check)

    # Evaluated on the launcher: a resume without SBX_FAIL succeeds.
    @environment(vars={"SBX_FAIL": os.environ.get("SBX_FAIL", "")})
    @step
    def check(self):
        self.creds = probe()
        if os.environ.get("SBX_FAIL"):
            raise ValueError("boom-s3-check")
        self.big_ok = hashlib.sha256(self.big).hexdigest() == self.big_sha
        self.big_mb = len(self.big) // MIB
        self.next(self.end)

    @step
    def end(self):
        self.creds = probe()


if __name__ == "__main__":
    S3Flow()
