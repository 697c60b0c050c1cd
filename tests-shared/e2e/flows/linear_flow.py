"""A linear flow: parameters, artifacts across sandboxed and local steps, stdout/stderr, env.

Layer: tests-shared/e2e (a flow run by the e2e tests). Imports: metaflow.
"""

import os
import sys

from metaflow import FlowSpec, Parameter, environment, sandbox, step


class LinearFlow(FlowSpec):
    alpha = Parameter("alpha", default=3, type=int)

    @sandbox(env={"SBX_GREETING": "hello-from-env"})
    @step
    def start(self):
        self.x = self.alpha * 2
        self.greeting = os.environ.get("SBX_GREETING")
        self.home = os.environ.get("HOME")
        print("start says hi")
        print("start warns", file=sys.stderr)
        self.next(self.middle)

    @environment(vars={"SBX_ENVDECO": "from-environment"})
    @sandbox
    @step
    def middle(self):
        self.y = self.x + 1
        self.envdeco = os.environ.get("SBX_ENVDECO")
        self.next(self.end)

    @step
    def end(self):
        print(f"end sees y={self.y}")


if __name__ == "__main__":
    LinearFlow()
