"""The metaflow-sandbox demo: a flow whose steps run in local sandboxes, no setup needed.

Layer: docs/examples (a runnable example). Imports: metaflow (with metaflow-sandbox installed).

    pip install metaflow metaflow-sandbox
    python demo_flow.py run

Each ``@sandbox`` step runs in its own sandbox (bubblewrap on Linux: a private root filesystem,
your home directory invisible); artifacts, logs and cards come back to the local datastore as in
a plain run. ``python demo_flow.py run --with sandbox`` sandboxes every step.
"""

import os
import platform

from metaflow import FlowSpec, Parameter, card, current, sandbox, step


class SandboxDemoFlow(FlowSpec):
    count = Parameter("count", default=3, type=int, help="How many sandboxed foreach tasks")

    @sandbox(env={"DEMO_GREETING": "hello from a sandbox"})
    @step
    def start(self):
        self.greeting = os.environ["DEMO_GREETING"]
        self.items = list(range(self.count))
        print(f"{self.greeting}: sandbox {os.environ.get('METAFLOW_SANDBOX_ID')} on {platform.node()}")
        self.next(self.square, foreach="items")

    @sandbox(cpu=1, memory=512)
    @step
    def square(self):
        self.value = self.input**2
        home_visible = os.path.exists(os.path.expanduser("~/.bashrc"))
        print(f"{self.input}^2 = {self.value} (HOME={os.environ['HOME']}, launcher home visible: {home_visible})")
        self.next(self.join)

    @card(type="blank")
    @sandbox
    @step
    def join(self, inputs):
        from metaflow.cards import Markdown

        self.total = sum(i.value for i in inputs)
        current.card.append(Markdown(f"# Sum of squares: {self.total}"))
        self.next(self.end)

    @step
    def end(self):
        print(f"Sum of squares of 0..{self.count - 1}: {self.total} (this step ran without a sandbox)")


if __name__ == "__main__":
    SandboxDemoFlow()
