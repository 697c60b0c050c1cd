"""Two sandboxed steps without ``@retry`` that report each run of their user code outside the
datastore: for the fault table (``test_faults.py``), which counts the runs.

Layer: tests-shared/e2e (a flow run by the e2e tests). Imports: metaflow, the standard library.
"""

import time
import urllib.request

from metaflow import FlowSpec, Parameter, current, sandbox, step


def report(url):
    # An HTTP request to the test, not a file: the sandbox sees none of the launcher's files, and
    # a re-run of the user code inside the same attempt would leave no trace in the datastore.
    urllib.request.urlopen(f"{url}/{current.step_name}/{current.retry_count}", timeout=30).read()


class FaultsFlow(FlowSpec):
    record = Parameter("record", help="URL each run of a step's user code is reported to")
    seconds = Parameter("seconds", default=0.0, help="how long the work step sleeps")

    @sandbox
    @step
    def start(self):
        report(self.record)
        self.numbers = list(range(1000))
        self.next(self.work)

    @sandbox
    @step
    def work(self):
        report(self.record)
        time.sleep(float(self.seconds))
        self.total = sum(self.numbers)
        self.attempt = current.retry_count
        self.next(self.end)

    @step
    def end(self):
        assert self.total == 499500


if __name__ == "__main__":
    FaultsFlow()
