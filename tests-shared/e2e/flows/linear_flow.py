"""A linear flow: parameters, IncludeFile, tags, artifacts across sandboxed and local steps,
stdout/stderr, the decorator's env, @environment and @resources.

Layer: tests-shared/e2e (a flow run by the e2e tests). Imports: metaflow.
"""

import os
import sys

from metaflow import FlowSpec, IncludeFile, Parameter, environment, resources, sandbox, step


class LinearFlow(FlowSpec):
    alpha = Parameter("alpha", default=3, type=int)
    data = IncludeFile("data", default=None, is_text=True)

    @sandbox(env={"SBX_GREETING": "hello-from-env"})
    @step
    def start(self):
        self.x = self.alpha * 2
        self.greeting = os.environ.get("SBX_GREETING")
        self.leaked = os.environ.get("SBX_LAUNCHER_ONLY")
        self.data_text = self.data
        print("start says hi")
        print("start warns", file=sys.stderr)
        self.next(self.middle)

    @environment(vars={"SBX_ENVDECO": "from-environment"})
    @resources(cpu=1, memory=256)
    @sandbox(memory=128)
    @step
    def middle(self):
        self.y = self.x + 1
        self.envdeco = os.environ.get("SBX_ENVDECO")
        self.next(self.end)

    @step
    def end(self):
        self.in_sandbox_at_end = bool(os.environ.get("METAFLOW_SANDBOX_ID"))
        print(f"end sees y={self.y}")


if __name__ == "__main__":
    LinearFlow()
