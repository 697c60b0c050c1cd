"""A flow of a uv project (``--environment=uv``) whose steps import a package only the project has;
a foreach in the middle, so that the run's later tasks can reuse the environment an earlier built.

Layer: tests-shared/e2e flows. Imports: metaflow (the step imports the project's package).
"""

import os

from metaflow import FlowSpec, sandbox, step

# Offline: uv finds the packages it installs next to the flow (shipped with --package-suffixes).
OFFLINE = {"UV_OFFLINE": "1", "UV_FIND_LINKS": "wheels"}


class UvFlow(FlowSpec):
    @sandbox(env=OFFLINE)
    @step
    def start(self):
        import mfsbx_uvdep  # only in the uv project's environment, not the launcher's

        self.value = mfsbx_uvdep.VALUE
        self.sandboxed = bool(os.environ.get("METAFLOW_SANDBOX_ID"))
        self.items = [1, 2, 3]
        self.next(self.work, foreach="items")

    @sandbox(env=OFFLINE)
    @step
    def work(self):
        import mfsbx_uvdep

        self.item_value = f"{mfsbx_uvdep.VALUE}-{self.input}"
        self.next(self.join)

    @sandbox(env=OFFLINE)
    @step
    def join(self, inputs):
        self.item_values = sorted(i.item_value for i in inputs)
        self.next(self.end)

    @sandbox(env=OFFLINE)
    @step
    def end(self):
        import sys

        import mfsbx_uvdep

        self.end_value = mfsbx_uvdep.VALUE
        self.end_sandboxed = bool(os.environ.get("METAFLOW_SANDBOX_ID"))
        self.end_python = sys.executable


if __name__ == "__main__":
    UvFlow()
