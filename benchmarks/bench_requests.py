"""API requests per 1,000 rows for submit plus collect, at the emulator's default timing.

    python benchmarks/bench_requests.py [--rows 10000] [--runs 3]

Counts what the emulator (its own process) received, by route. Target: at most 25 per 1,000 rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import httpx
import numpy as np
import pandas as pd
from _common import append_results, emulator_process
from _figures import record

from runflow_frames import run_batches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    df = pd.DataFrame(
        {"text": [f"row {i}" for i in range(args.rows)], "repeat": np.ones(args.rows, int)}
    )
    per_thousand, walls, routes = [], [], {}
    for _ in range(args.runs):
        with emulator_process() as url:
            started = time.perf_counter()
            out = run_batches(df, "acme", "uppercase", base_url=url, api_key="bench", wait=True)
            walls.append(time.perf_counter() - started)
            routes = httpx.get(url + "/_emulator/accounting").json()["requests_by_route"]
            routes.pop("GET /v1/health", None)  # the harness's readiness check, not the job's
        assert out["runflow_status"].eq("succeeded").all()
        per_thousand.append(sum(routes.values()) / args.rows * 1000)
    record(
        "requests_per_1000",
        statistics.median(per_thousand),
        f"{statistics.median(per_thousand):.1f} (median of {args.runs})",
        "python " + " ".join(["benchmarks/bench_requests.py", *sys.argv[1:]]),
    )
    append_results(
        "API requests per 1,000 rows, submit + collect (wait=True)",
        "python " + " ".join(sys.argv),
        [
            f"{args.rows:,} rows, emulator default timing (run 0.3 s): requests per 1,000 rows "
            f"median {statistics.median(per_thousand):.1f} (min {min(per_thousand):.1f}, max "
            f"{max(per_thousand):.1f}, n={args.runs}; target <= 25); last run by route: {routes}",
            f"wall time submit + collect: median {statistics.median(walls):.2f} s",
        ],
    )


if __name__ == "__main__":
    main()
