"""Failures and recovery: a user exception, a non-zero exit, a long sleep (to destroy the sandbox
mid-step or interrupt the run), and a failure switched by the launcher's environment (for resume).

Layer: tests-shared/e2e (a flow run by the e2e tests). Imports: metaflow.
"""

import os
import time
import uuid

from metaflow import FlowSpec, Parameter, current, environment, retry, sandbox, step


class FailingFlow(FlowSpec):
    mode = Parameter("mode", default="ok", help="ok, exception, exit or sleep")

    @sandbox
    @step
    def start(self):
        self.token = uuid.uuid4().hex
        self.next(self.work)

    # Evaluated on the launcher when the flow is loaded: resume without SBX_FAIL succeeds.
    @environment(vars={"SBX_FAIL": os.environ.get("SBX_FAIL", "")})
    @retry(times=1, minutes_between_retries=0)
    @sandbox
    @step
    def work(self):
        if self.mode == "exception" or os.environ.get("SBX_FAIL"):
            raise ValueError("boom-user-error")
        if self.mode == "exit":
            print("exiting with 7", flush=True)
            os._exit(7)
        if self.mode == "sleep" and current.retry_count == 0:
            print("sleeping-now", flush=True)
            time.sleep(600)
        self.attempt = current.retry_count
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    FailingFlow()
