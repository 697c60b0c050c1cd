"""Print a run as JSON, through the Client API (run in the flow's directory by the e2e tests).

Layer: tests-shared/e2e. Imports: metaflow, the standard library.

Usage: ``python inspect_run.py FlowName [run_id]``. Artifacts of JSON types are dumped; bytes
artifacts as their length; anything else as its ``repr``.
"""

import base64
import json
import re
import sys

from metaflow import Flow, Run, namespace


def value(obj):
    if isinstance(obj, (bytes, bytearray)):
        return {"bytes": len(obj)}
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return repr(obj)


def card_text(html):
    """A card's data (cards embed it base64-encoded in their HTML), or the HTML if none."""
    found = re.findall(r'__MF_DATA__\[[^\]]*\]\s*=\s*"([A-Za-z0-9+/=]+)"', html)
    return " ".join(base64.b64decode(data).decode("utf-8", "replace") for data in found) or html[:2000]


def task_info(task):
    from metaflow.cards import get_cards

    try:
        cards = [card_text(card.get()) for card in get_cards(task)]
    except Exception as e:  # no card, or no card support: say so instead of failing the dump
        cards = [f"no cards: {e}"]
    meta = task.metadata_dict
    return {
        "pathspec": task.pathspec,
        "successful": task.successful,
        "stdout": task.stdout,
        "stderr": task.stderr,
        "artifacts": {a.id: value(a.data) for a in task if a.id not in ("big",)},
        "sandbox": {k: v for k, v in meta.items() if k.startswith("sandbox-")},
        "attempt": int(meta.get("attempt", 0)),
        "cards": cards,
    }


def main():
    namespace(None)
    flow = sys.argv[1]
    run = Run(f"{flow}/{sys.argv[2]}") if len(sys.argv) > 2 else Flow(flow).latest_run
    out = {
        "id": run.id,
        "successful": run.successful,
        "finished": run.finished,
        "tags": sorted(run.tags),
        "steps": {s.id: [task_info(t) for t in s] for s in run},
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
