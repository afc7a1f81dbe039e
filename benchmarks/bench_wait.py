"""How soon ``wait=True`` hands the outcomes back once the last run is over (issue 20).

A 100,000-row job against the emulator in its own process (runs queued 0.5 s, running 3 s),
``max_concurrency=8``, ``wait=True``: the seconds from the end of the job's last run (the
latest ``runflow_completed_at``) to ``run_batches`` returning, median of ``--runs``. Goal: at
most 2 s.

    python benchmarks/bench_wait.py [--rows 100000] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import pandas as pd
from _common import append_results, emulator_process, spread
from _figures import record

from runflow_frames import run_batches


def once(url: str, rows: int) -> tuple[float, float]:
    """(seconds from the last run's end to the return, seconds the whole call took)."""
    df = pd.DataFrame(
        {"text": [f"t{i}" for i in range(rows)]}, index=[f"r{i}" for i in range(rows)]
    )
    started = time.time()
    out = run_batches(df, "acme/echo", wait=True, api_key="bench", base_url=url, progress=False)
    returned = time.time()
    assert (out["runflow_status"] == "succeeded").all()
    last = pd.to_datetime(out["runflow_completed_at"], utc=True).max().timestamp()
    return returned - last, returned - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    gaps, walls = [], []
    with emulator_process("--queued", "0.5", "--running", "3") as url:
        for _ in range(args.runs):
            gap, wall = once(url, args.rows)
            gaps.append(gap)
            walls.append(wall)
            print(f"last run over -> returned: {gap:.2f} s (whole call {wall:.1f} s)", flush=True)
    record(
        "wait_gap_s",
        statistics.median(gaps),
        f"{statistics.median(gaps):.2f} s (median of {len(gaps)}; min {min(gaps):.2f}, max "
        f"{max(gaps):.2f})",
        "python " + " ".join(["benchmarks/bench_wait.py", *sys.argv[1:]]),
    )
    append_results(
        "wait=True: from the last run's end to the outcomes in hand",
        "python " + " ".join(sys.argv),
        [
            f"{args.rows:,} rows, max_concurrency 8, runs queued 0.5 s and running 3 s",
            f"seconds from the last run's end to run_batches returning: {spread(gaps, '.2f')} "
            "(goal <= 2 s)",
            f"whole call, s: {spread(walls, '.1f')}",
            f"median gap {statistics.median(gaps):.2f} s",
        ],
    )


if __name__ == "__main__":
    main()
