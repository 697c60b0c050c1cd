"""A flow for the metadata service: a parameter, output, foreach + join, and in every step a probe
of what the step sees of the service (its auth header's presence, never its value).

Layer: tests-shared/remote (a flow run by the metadata-service tests). Imports: metaflow.
"""

import hashlib
import json
import os

from metaflow import FlowSpec, Parameter, step

# The SHA-256 of sandbox_testing.metadata_service.API_KEY: the key itself is in no file the run saves.
KEY_SHA = "c2d3c939fb74aba90fa48c85251fce4c51ef9126733402cc60b0ebe835c30548"


def _sha(value):
    return hashlib.sha256(str(value).encode()).hexdigest()


def probe():
    """Whether the service's auth key is in this step's environment (the variable, or a value of
    the headers Metaflow reads as JSON), never the key itself."""
    headers = json.loads(os.environ.get("METAFLOW_SERVICE_HEADERS") or "{}")
    values = [os.environ.get("METAFLOW_SERVICE_AUTH_KEY", ""), *headers.values()]
    return {
        "in_sandbox": bool(os.environ.get("METAFLOW_SANDBOX_ID")),
        "auth_in_env": any(_sha(v) == KEY_SHA for v in values),
    }


class ServiceFlow(FlowSpec):
    alpha = Parameter("alpha", default=1, type=int)

    @step
    def start(self):
        self.seen = probe()
        print(f"start says alpha={self.alpha}")
        self.items = [1, 2]
        self.next(self.fan, foreach="items")

    @step
    def fan(self):
        self.seen = probe()
        self.value = self.input * 10 + self.alpha
        self.next(self.join)

    @step
    def join(self, inputs):
        self.seen = probe()
        self.values = sorted(i.value for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        self.seen = probe()


if __name__ == "__main__":
    ServiceFlow()
