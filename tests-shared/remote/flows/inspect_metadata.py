"""Print what the metadata provider holds for a run, as JSON, through the Client API: per task its
metadata field names, attempt, and artifact names (``inspect_run.py`` gives values and logs).

Layer: tests-shared/remote (run in the flow's directory by the metadata-service tests). Imports:
metaflow, the standard library.

Usage: ``python inspect_metadata.py FlowName run_id`` (other ``--`` options are ignored).
"""

import json
import sys

from metaflow import Run, namespace


def main():
    namespace(None)
    flow, run_id = [a for a in sys.argv[1:] if not a.startswith("--")][:2]
    run = Run(f"{flow}/{run_id}")
    out = {}
    for step in run:
        for task in step:
            meta = task.metadata_dict
            out[task.pathspec.split("/", 2)[2]] = {
                "fields": sorted(meta),
                "attempt": meta.get("attempt"),
                "ds_type": meta.get("ds-type"),
                "artifacts": sorted(a.id for a in task),
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
