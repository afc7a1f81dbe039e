"""runflow_frames.dask on a LocalCluster of 2 worker processes against a rate-limited server.

The emulator (its own process) accepts R create requests per second (a token bucket that starts
full, no Retry-After) and answers 429 beyond. We submit ROWS rows in PARTITIONS partitions:

1. runflow_frames.dask.run_batches: one throttle on the scheduler for the whole cluster.
2. What a user would write without it: ddf.map_partitions(runflow_frames.run_batches, ...),
   each partition with its own checkpoint and its own throttle.

Reported: creates/s achieved as a fraction of what the server allowed (R x wall + R; target
>= 0.90), the 429s per create (target: rare), rows/s. Median of several runs.

    python benchmarks/bench_dask.py [--rate 50] [--rows 100000] [--partitions 8] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dask.dataframe as dd
import distributed
import httpx
import pandas as pd
from _common import append_results, emulator_process, spread
from _figures import record

import runflow_frames
from runflow_frames import dask as rfd

KEY = "bench"


def per_partition(pdf: pd.DataFrame, url: str, root: str, partition_info: Any = None) -> Any:
    """The peer: the pandas run_batches on each partition, each with its own throttle."""
    number = 0 if partition_info is None else partition_info["number"]
    return runflow_frames.run_batches(
        pdf,
        "acme",
        "echo",
        base_url=url,
        api_key=KEY,
        checkpoint=Path(root) / f"p{number}",
        max_concurrency=8,
        progress=False,
    )


def one_run(ddf: dd.DataFrame, rate: float, how: str) -> tuple[float, float, float]:
    with (
        emulator_process("--faults", f"rate_limit={rate:g},routes=create") as url,
        tempfile.TemporaryDirectory() as root,
    ):
        started = time.perf_counter()
        if how == "cluster":
            out = rfd.run_batches(
                ddf, "acme", "echo", checkpoint=root, max_concurrency=8, api_key=KEY, base_url=url
            ).compute()
        else:
            meta = rfd.run_batches(ddf, "acme", "echo", checkpoint=root)._meta
            out = ddf.map_partitions(per_partition, url, root, meta=meta).compute()
        wall = time.perf_counter() - started
        seen = httpx.get(url + "/_emulator/accounting").json()
    assert out["runflow_run_id"].notna().all()
    assert all(n == 1 for n in seen["runs_by_client_ref"].values())
    created = seen["batches_created"]
    return (
        created / (rate * wall + rate),
        seen["faults"].get("limited", 0) / created,
        len(out) / wall,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=50.0, help="server limit, creates/s")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    df = pd.DataFrame(
        {"prompt": [f"item {i}" for i in range(args.rows)]},
        index=pd.Index([f"row-{i:08d}" for i in range(args.rows)]),
    )
    ddf = dd.from_pandas(df, npartitions=args.partitions)
    lines = []
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
    ):
        for how, label in (
            ("cluster", "runflow_frames.dask (one throttle on the scheduler)"),
            ("partition", "map_partitions(run_batches) (a throttle per partition)"),
        ):
            results = [one_run(ddf, args.rate, how) for _ in range(args.runs)]
            fractions, limited, rates = (list(x) for x in zip(*results, strict=True))
            lines.append(
                f"LocalCluster 2 workers x 2 threads, server limit {args.rate:g} creates/s, "
                f"{args.rows:,} rows in {args.partitions} partitions, {label}: achieved/allowed "
                f"{spread(fractions, '.3f')} (target >= 0.90); 429s per create "
                f"{spread(limited, '.3f')}; rows/s {spread(rates)}"
            )
            print(lines[-1], flush=True)
            if how == "cluster":
                record(
                    "dask_rate_limit",
                    statistics.median(fractions),
                    f"{statistics.median(fractions):.3f} (median of {args.runs})",
                    "python " + " ".join(["benchmarks/bench_dask.py", *sys.argv[1:]]),
                )
    append_results(
        "Dask: a cluster against a server rate limit", "python " + " ".join(sys.argv), lines
    )


if __name__ == "__main__":
    main()
