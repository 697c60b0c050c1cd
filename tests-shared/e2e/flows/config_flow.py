"""A flow with a ``Config`` (Metaflow 2.12.37+): its values must reach the sandboxed step.

Layer: tests-shared/e2e (a flow run by the e2e tests). Imports: metaflow.
"""

from metaflow import Config, FlowSpec, sandbox, step


class ConfigFlow(FlowSpec):
    settings = Config("settings", default_value={"rate": 1, "name": "default"})

    @sandbox
    @step
    def start(self):
        self.rate = self.settings.rate
        self.name = self.settings["name"]
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ConfigFlow()
