"""A flow whose sandboxed step has its own ``@pypi`` environment (a package the launcher lacks).

Layer: tests-shared/e2e flows. Imports: metaflow (the step imports the environment's package).
"""

import os

from metaflow import FlowSpec, pypi, sandbox, step


class PypiFlow(FlowSpec):
    @sandbox
    @pypi(packages={"tomli-w": "1.0.0"})
    @step
    def start(self):
        import tomli_w  # only in the step's @pypi environment

        self.dumped = tomli_w.dumps({"a": 1})
        self.sandboxed = bool(os.environ.get("METAFLOW_SANDBOX_ID"))
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    PypiFlow()
