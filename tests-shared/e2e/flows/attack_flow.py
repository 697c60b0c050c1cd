"""A hostile sandboxed step: it plants the attacker's bytes under the content address of a value
a later step computes, hoping the datastore keeps them (it never rewrites an existing blob).

Layer: tests-shared/e2e (a flow run by the e2e tests). Imports: metaflow, the standard library.
"""

import gzip
import hashlib
import json
import os
import pickle

from metaflow import FlowSpec, sandbox, step

HONEST = "the honest value"


def address(value):
    """Where Metaflow's content-addressed store files ``value`` (a pickle, as Metaflow makes it)."""
    return hashlib.sha1(pickle.dumps(value, protocol=4)).hexdigest()


class AttackFlow(FlowSpec):
    @sandbox
    @step
    def start(self):
        # In the sandbox the datastore sits at the launcher's path (what the launcher stages).
        root = os.path.join(os.environ["METAFLOW_DATASTORE_SYSROOT_LOCAL"], ".metaflow")
        key = address(HONEST)
        blob = os.path.join(root, type(self).__name__, "data", key[:2], key)
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        with open(blob, "wb") as out:
            out.write(gzip.compress(pickle.dumps("the attacker's value", protocol=4)))
        with open(f"{blob}_meta", "w") as out:
            json.dump({"cas_raw": False, "cas_version": 1}, out)
        print(f"planted {blob}", flush=True)
        self.next(self.end)

    @step
    def end(self):
        self.answer = HONEST


if __name__ == "__main__":
    AttackFlow()
