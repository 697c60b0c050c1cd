"""Every graph shape and the task decorators in one flow: nested foreach, joins, split-and, a
large artifact, @card, @retry, @timeout caught by @catch in the sandbox, and a crash whose @catch
fallback attempt runs locally.

Layer: tests-shared/e2e (a flow run by the e2e tests). Imports: metaflow.
"""

import hashlib
import os
import time

from metaflow import FlowSpec, Parameter, card, catch, current, retry, sandbox, step, timeout


def digest(data):
    return hashlib.sha256(data).hexdigest()


class BranchingFlow(FlowSpec):
    width = Parameter("width", default=3, type=int)
    big_mb = Parameter("big_mb", default=24, type=int)

    @card(type="blank")
    @sandbox
    @step
    def start(self):
        from metaflow.cards import Markdown

        current.card.append(Markdown("# card-from-sandbox"))
        self.items = list(range(self.width))
        self.big = os.urandom(self.big_mb * 1024 * 1024)
        self.big_sha = digest(self.big)
        self.next(self.fan, foreach="items")

    @sandbox
    @step
    def fan(self):
        self.outer = self.input
        self.pairs = [(self.input, j) for j in range(2)]
        self.next(self.inner, foreach="pairs")

    @sandbox
    @step
    def inner(self):
        self.value = self.input[0] * 10 + self.input[1]
        print(f"inner value {self.value}")
        self.next(self.inner_join)

    @sandbox
    @step
    def inner_join(self, inputs):
        self.values = sorted(i.value for i in inputs)
        self.merge_artifacts(inputs, include=["big", "big_sha"])
        self.next(self.outer_join)

    @sandbox
    @step
    def outer_join(self, inputs):
        self.all_values = sorted(v for i in inputs for v in i.values)
        self.merge_artifacts(inputs, include=["big", "big_sha"])
        self.next(self.split)

    @sandbox
    @step
    def split(self):
        self.big_ok_in_sandbox = digest(self.big) == self.big_sha
        self.next(self.flaky, self.guarded, self.crashy)

    @retry(times=2, minutes_between_retries=0)
    @sandbox
    @step
    def flaky(self):
        if current.retry_count == 0:
            raise RuntimeError("flaky-first-attempt")
        self.flaky_attempt = current.retry_count
        self.next(self.and_join)

    @catch(var="timeout_error")
    @timeout(seconds=3)
    @sandbox
    @step
    def guarded(self):
        print("guarded starts sleeping")
        time.sleep(120)
        self.next(self.and_join)

    @catch(var="crash_error")
    @sandbox
    @step
    def crashy(self):
        print("crashy dies", flush=True)
        os._exit(3)
        self.next(self.and_join)

    @sandbox
    @step
    def and_join(self, inputs):
        self.flaky_attempt = inputs.flaky.flaky_attempt
        self.caught = str(inputs.guarded.timeout_error)
        self.crash_caught = inputs.crashy.crash_error is not None
        self.merge_artifacts(inputs, include=["big", "big_sha", "all_values"])
        self.next(self.end)

    @step
    def end(self):
        self.big_ok_locally = digest(self.big) == self.big_sha


if __name__ == "__main__":
    BranchingFlow()
