"""One sandboxed step that takes a while, retried once: for lifetimes and provider faults.

Layer: tests-shared/e2e (a flow run by the e2e tests). Imports: metaflow.
"""

import time

from metaflow import FlowSpec, Parameter, current, retry, sandbox, step


class LongFlow(FlowSpec):
    seconds = Parameter("seconds", default=0.0, help="how long the sandboxed step sleeps")

    @retry(times=1, minutes_between_retries=0)
    @sandbox
    @step
    def start(self):
        print(f"long-step-started attempt={current.retry_count}", flush=True)
        time.sleep(float(self.seconds))
        self.attempt = current.retry_count
        self.waited = float(self.seconds)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    LongFlow()
