"""Benchmark: the same flows run plain and with ``--with sandbox:backend=local``.

Layer: tests-shared/bench (a script; ``nox -s bench`` runs it). Imports: the standard library
(Metaflow runs in subprocesses).

    python tests-shared/bench/bench_sandbox.py --out docs/benchmarks.md [--repeat 3]
    python tests-shared/bench/bench_sandbox.py --backend daytona --only linear_flow.py

Flows: a 5-step linear flow; a foreach over 64 items with ``--max-workers 16``; a 256 MiB
artifact produced by a step and read by the next. Each is timed end to end (``flow.py run``
wall time, median of ``--repeat`` runs), plain and sandboxed. The per-task overhead is
(sandboxed - plain) / tasks of the linear flow, whose tasks run one at a time; the launcher's
per-phase timings (``METAFLOW_SANDBOX_TIMINGS``) are reported too. No assertions: numbers only.

``--backend daytona|e2b`` runs the sandboxed flows on that backend against its wire emulator
(latency 0), started here: the provider backends' own per-task cost, next to the same plain runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FLOWS = {
    "linear_flow.py": """
from metaflow import FlowSpec, step

class BenchLinear(FlowSpec):
    @step
    def start(self):
        self.x = 1
        self.next(self.a)

    @step
    def a(self):
        self.x += 1
        self.next(self.b)

    @step
    def b(self):
        self.x += 1
        self.next(self.c)

    @step
    def c(self):
        self.x += 1
        self.next(self.end)

    @step
    def end(self):
        assert self.x == 4

if __name__ == "__main__":
    BenchLinear()
""",
    "foreach_flow.py": """
from metaflow import FlowSpec, step

class BenchForeach(FlowSpec):
    @step
    def start(self):
        self.items = list(range(64))
        self.next(self.work, foreach="items")

    @step
    def work(self):
        self.y = self.input * 2
        self.next(self.join)

    @step
    def join(self, inputs):
        self.total = sum(i.y for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        assert self.total == 64 * 63

if __name__ == "__main__":
    BenchForeach()
""",
    "big_flow.py": """
import os
from metaflow import FlowSpec, step

class BenchBig(FlowSpec):
    @step
    def start(self):
        self.big = os.urandom(256 * 1024 * 1024)
        self.next(self.read)

    @step
    def read(self):
        self.size = len(self.big)
        self.next(self.end)

    @step
    def end(self):
        assert self.size == 256 * 1024 * 1024

if __name__ == "__main__":
    BenchBig()
""",
}
# flow file -> (label, tasks in the run, extra run options)
CASES = [
    ("linear_flow.py", "5-step linear flow", 5, []),
    ("foreach_flow.py", "foreach x64, --max-workers 16", 67, ["--max-workers", "16"]),
    ("big_flow.py", "256 MiB artifact (3 steps)", 3, []),
]
TIMINGS = re.compile(r"sandbox timings: (.*)")
ANALYSIS = "## Reading these numbers"


@contextlib.contextmanager
def backend_env(backend: str) -> Iterator[dict[str, str]]:
    """The environment sandboxed runs need: nothing for ``local``, an emulator for the others."""
    if backend == "local":
        yield {}
        return
    from importlib import import_module

    from sandbox_testing.emulators import start_emulator

    with start_emulator(backend) as url:
        yield import_module(f"sandbox_testing.{backend}").emulator_env(url)


def run(
    workdir: Path, flow: str, extra: list[str], sandbox: list[str], env: dict[str, str]
) -> tuple[float, list[dict[str, float]]]:
    cmd = [sys.executable, flow, "--no-pylint", *sandbox, "run", *extra]
    env = {**os.environ, **env, "USERNAME": "bench", "METAFLOW_SANDBOX_TIMINGS": "1"}
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    phases = []
    for match in TIMINGS.finditer(proc.stdout + proc.stderr):
        phases.append({k: float(v.rstrip("ms")) for k, v in (p.split("=") for p in match.group(1).split(", "))})
    return elapsed, phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as Markdown here")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="flow files to run (default: all)")
    parser.add_argument("--backend", default="local", choices=["local", "daytona", "e2b"])
    args = parser.parse_args()
    sandbox = ["--with", f"sandbox:backend={args.backend}"]

    rows = []
    phases: dict[str, list[float]] = defaultdict(list)
    per_task_overheads = []
    with tempfile.TemporaryDirectory(prefix="mfsbx-bench-") as tmp, backend_env(args.backend) as env:
        workdir = Path(tmp)
        for name, text in FLOWS.items():
            (workdir / name).write_text(text)
        for flow, label, tasks, extra in CASES:
            if args.only and flow not in args.only:
                continue
            plain, sandboxed = [], []
            for _ in range(args.repeat):
                plain.append(run(workdir, flow, extra, [], {})[0])
                elapsed, task_phases = run(workdir, flow, extra, sandbox, env)
                sandboxed.append(elapsed)
                if flow == "linear_flow.py":
                    per_task_overheads.append((elapsed - plain[-1]) / tasks * 1000)
                    for entry in task_phases:
                        for key, value in entry.items():
                            phases[key].append(value)
            p, s = statistics.median(plain), statistics.median(sandboxed)
            rows.append((label, p, s, s / p))
            print(f"{label}: plain {p:.2f} s, sandboxed {s:.2f} s, ratio {s / p:.2f}", flush=True)

    overhead = statistics.median(per_task_overheads) if per_task_overheads else float("nan")
    print(f"per-task overhead (linear flow, median): {overhead:.0f} ms")
    if args.out:
        write_markdown(args.out, rows, overhead, phases, args.repeat, args.backend)


def write_markdown(  # noqa: PLR0917 - one call site
    out: Path, rows, overhead: float, phases: dict[str, list[float]], repeat: int, backend: str
) -> None:
    import metaflow

    isolation = os.environ.get("METAFLOW_SANDBOX_LOCAL_ISOLATION", "auto")
    lines = [
        f"# Benchmarks: `@sandbox` on the {backend} backend",
        "",
        "Reproduce with `nox -s bench` (or "
        "`python tests-shared/bench/bench_sandbox.py --out docs/benchmarks.md` in an environment "
        "with Metaflow and the built wheels of metaflow-sandbox-core and metaflow-sandbox).",
        "",
        f"Machine: {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}, Metaflow {metaflow.__version__}, local isolation `{isolation}`, "
        f"local datastore. Wall time of `python flow.py run`, median of {repeat} runs.",
        "",
        f"| flow | plain (s) | `--with sandbox:backend={backend}` (s) | ratio |",
        "|---|---:|---:|---:|",
        *(f"| {label} | {p:.2f} | {s:.2f} | {s / p:.2f}x |" for label, p, s, _ in rows),
        "",
        f"**Per-task overhead** (linear flow, (sandboxed - plain) / 5 tasks, median): **{overhead:.0f} ms**.",
        "",
        "Where a sandboxed task's time goes, as the launcher measures it (median per task, linear flow):",
        "",
        "| phase | ms |",
        "|---|---:|",
        *(f"| {key} | {statistics.median(values):.0f} |" for key, values in phases.items()),
        "",
        "`launcher_start` is the launcher process from its start until it creates the sandbox: "
        "Python's start-up and importing the core API (the launcher does not import Metaflow). "
        "`task` is the whole command in the sandbox: unpacking the inputs and the code, the real "
        "`flow.py step` (which a plain run also pays) and packing the outputs. The sandbox is "
        "destroyed while the outputs are merged.",
        "",
    ]
    # A hand-written reading of the numbers below the generated part survives a re-run.
    kept = out.read_text().partition(ANALYSIS)[2] if out.exists() else ""
    out.write_text("\n".join(lines) + (f"\n{ANALYSIS}{kept}" if kept else ""))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
