"""Benchmark: a sandbox's fixed cost, create → first command → destroy, per backend.

Layer: tests-shared/bench (a script). Imports: the standard library, core, ``sandbox_testing``.

    python tests-shared/bench/bench_backend_overhead.py [--repeat 20] [--latency-ms 0]

Times the core API only (no Metaflow): ``create(SandboxSpec())``, the first ``run("true")``, a
second ``run("true")`` and ``destroy()``, for ``local`` (bubblewrap) and for ``daytona`` against its
wire emulator (started here, with the given latency). Prints medians and p90s in milliseconds,
plus the one-off cost of the first Daytona client. No assertions: numbers only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metaflow_extensions.sandbox.core import SandboxSpec, get_backend
from sandbox_testing.emulators import start_emulator

PHASES = ("create", "first run", "second run", "destroy", "total")


def measure(backend, repeat: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for _ in range(repeat):
        t0 = time.perf_counter()
        sbx = backend.create(SandboxSpec())
        t1 = time.perf_counter()
        sbx.run("true")
        t2 = time.perf_counter()
        sbx.run("true")
        t3 = time.perf_counter()
        sbx.destroy()
        t4 = time.perf_counter()
        for phase, value in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0 - (t3 - t2)), strict=True):
            times[phase].append(value * 1000)
    return times


def report(name: str, times: dict[str, list[float]]) -> None:
    cells = []
    for phase in PHASES:
        values = sorted(times[phase])
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        cells.append(f"{phase} {statistics.median(values):7.1f} / {p90:7.1f}")
    print(f"{name:28s} " + " | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--latency-ms", type=float, default=0)
    args = parser.parse_args()
    print("median / p90 in ms; total = create + first run + destroy")
    with tempfile.TemporaryDirectory() as root:
        local = get_backend("local", isolation="bwrap", root=root)
        measure(local, 2)  # warm-up
        report("local (bwrap)", measure(local, args.repeat))
    with start_emulator("daytona", "--latency-ms", str(args.latency_ms)) as url:
        t0 = time.perf_counter()
        backend = get_backend("daytona", api_url=f"{url}/api", api_key="bench")
        _ = backend.client
        print(f"daytona: first client (SDK import + Daytona()) {1000 * (time.perf_counter() - t0):.1f} ms")
        measure(backend, 2)
        report(f"daytona emulator ({args.latency_ms:g} ms)", measure(backend, args.repeat))


if __name__ == "__main__":
    main()
