"""Throughput of run_batches against the emulator over loopback.

Pushes ROWS rows (default 10,000) through an emulator running in its own process, with
max_concurrency=8, several times, and appends rows/s and wall time to RESULTS.md.

    python benchmarks/bench_submit.py [--rows 10000] [--runs 5] [--latency 0]
"""

from __future__ import annotations

import argparse
import sys
import time

import httpx
import numpy as np
import pandas as pd
from _common import append_results, emulator_process, spread

from runflow_frames import run_batches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency", type=float, default=0.0, help="emulator service time per POST")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "prompt": [f"a photo of item {i}" for i in range(args.rows)],
            "seed": rng.integers(0, 2**31, args.rows),
            "strength": rng.random(args.rows),
        }
    )
    rates, walls = [], []
    with emulator_process("--latency", str(args.latency)) as url:
        for _ in range(args.runs):
            started = time.perf_counter()
            out = run_batches(
                df, "acme", "echo", base_url=url, api_key="bench", max_concurrency=args.concurrency
            )
            wall = time.perf_counter() - started
            assert out["runflow_run_id"].notna().all()
            rates.append(args.rows / wall)
            walls.append(wall)
        seen = httpx.get(url + "/_emulator/accounting").json()
    duplicates = sum(1 for n in seen["runs_by_client_ref"].values() if n != args.runs)
    append_results(
        f"Submit {args.rows:,} rows, max_concurrency={args.concurrency}, latency {args.latency * 1000:g} ms",
        "python " + " ".join(sys.argv),
        [
            f"rows/s: {spread(rates)}",
            f"wall time (ms): {spread([w * 1000 for w in walls])}",
            f"every row once per run (server accounting): {duplicates == 0}",
        ],
    )


if __name__ == "__main__":
    main()
