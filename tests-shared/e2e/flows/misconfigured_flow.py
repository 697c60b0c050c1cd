"""A flow whose sandboxed step is misconfigured in the way ``SBX_MISCONFIG`` names (conflicting
decorators, values too large for any environment...): what ``--with`` cannot express. Every case
must be refused before "Workflow starting".

Layer: tests-shared/e2e (a flow run by the e2e tests). Imports: metaflow.
"""

import os

from metaflow import FlowSpec, batch, daytona, environment, kubernetes, pypi, sandbox, step

CASES = {
    "none": lambda f: f,
    "batch": lambda f: batch(sandbox(f)),
    "kubernetes": lambda f: kubernetes(sandbox(f)),
    "two-decorators": lambda f: daytona(sandbox(f)),
    "alias-backend": daytona(backend="e2b"),
    "large-env-value": sandbox(env={"BIG": "x" * 200_000}),
    "large-env": sandbox(env={f"V{i}": "x" * 100_000 for i in range(12)}),
    "environment-path": lambda f: environment(vars={"PATH": "/opt/tools"})(sandbox(f)),
    "timeout-fraction": sandbox(timeout=1.5),
    "image-not-text": sandbox(image=3),
    "env-not-text": sandbox(env=["A=1"]),
    "pypi": lambda f: pypi(packages={"six": "1.16.0"})(sandbox(f)),
    "pypi-no-network": lambda f: pypi(packages={"six": "1.16.0"})(sandbox(network=False)(f)),
}


class MisconfiguredFlow(FlowSpec):
    @CASES[os.environ.get("SBX_MISCONFIG", "none")]
    @step
    def start(self):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    MisconfiguredFlow()
