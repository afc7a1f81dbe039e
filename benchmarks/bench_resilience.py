"""Resilience, measured against the emulator in its own process.

1. Server rate limit: the emulator accepts R create requests per second (a token bucket) and
   answers 429 beyond it, without Retry-After (as the newest docs say). run_batches with default
   settings: requests/s achieved as a fraction of R (target >= 90%), and the 429s it received.
   Median of several runs.
2. The same faulty server (429s, 5xx, resets before and after processing, answers slower than
   the timeout) through run_batches and through what a user writes without this library:
   asyncio + httpx + a semaphore + a naive retry loop, no Idempotency-Key. Throughput, rows
   lost (no handle at the end), duplicate runs (from the server's own accounting).

    python benchmarks/bench_resilience.py [--rate 20] [--rows 20000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

import httpx
import numpy as np
import pandas as pd
from _common import append_results, emulator_process

from runflow_frames import SubmissionError, run_batches

KEY = "bench"
FAULTY = (
    "seed=7,rate_limited=0.05,server_error=0.05,reset_before=0.02,reset_after=0.03,"
    "slow=0.02,slow_seconds=3,routes=create"
)
TIMEOUT = 1.0


def frame(rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"prompt": [f"item {i}" for i in range(rows)], "seed": np.arange(rows)},
        index=pd.Index([f"row-{i:07d}" for i in range(rows)]),
    )


def accounting(url: str) -> dict[str, Any]:
    return httpx.get(url + "/_emulator/accounting").json()  # type: ignore[no-any-return]


def rate_limited(rate: float, rows: int, runs: int) -> list[str]:
    fractions, limited, walls = [], [], []
    df = frame(rows)
    for _ in range(runs):
        with emulator_process("--faults", f"rate_limit={rate},routes=create") as url:
            started = time.perf_counter()
            out = run_batches(df, "acme", "echo", base_url=url, api_key=KEY)
            wall = time.perf_counter() - started
            seen = accounting(url)
        assert out["runflow_run_id"].notna().all()
        # The bucket starts full (one second's burst): the ceiling is R per second plus R.
        ceiling = rate * wall + rate
        fractions.append(seen["batches_created"] / ceiling)
        limited.append(seen["faults"].get("limited", 0))
        walls.append(wall)
    return [
        f"server limit {rate:g} creates/s, {rows:,} rows ({rows // 100} creates), default "
        f"settings (max_concurrency=8): achieved / allowed = {statistics.median(fractions):.3f} "
        f"median (min {min(fractions):.3f}, max {max(fractions):.3f}, n={runs}; target >= 0.90), "
        f"429s received: median {statistics.median(limited):.0f} (min {min(limited)}, max "
        f"{max(limited)}), wall {statistics.median(walls):.1f} s",
    ]


async def naive(df: pd.DataFrame, url: str, concurrency: int = 8) -> dict[str, str]:
    """What a user writes without this library: a semaphore, gather, and a retry loop that
    re-POSTs on errors with no Idempotency-Key."""
    sem = asyncio.Semaphore(concurrency)
    records = [
        {"client_ref": k, **row} for k, row in zip(df.index, df.to_dict("records"), strict=True)
    ]
    chunks = [records[i : i + 100] for i in range(0, len(records), 100)]
    handles: dict[str, str] = {}
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=TIMEOUT) as client:

        async def send(chunk: list[dict[str, Any]]) -> None:
            async with sem:
                for attempt in range(5):
                    try:
                        r = await client.post("/v1/models/acme/echo/batches", json={"input": chunk})
                    except httpx.HTTPError:
                        await asyncio.sleep(0.5 * 2**attempt)
                        continue
                    if r.status_code == 201:
                        for item in r.json()["items"]:
                            handles[item["client_ref"]] = item["run_id"]
                        return
                    if r.status_code in (429, 500, 502, 503, 504):
                        await asyncio.sleep(0.5 * 2**attempt)
                        continue
                    return

        await asyncio.gather(*(send(c) for c in chunks))
    return handles


def side_by_side(rows: int) -> list[str]:
    df = frame(rows)
    lines = []
    with emulator_process("--faults", FAULTY) as url:
        started = time.perf_counter()
        try:
            out = run_batches(df, "acme", "echo", base_url=url, api_key=KEY, timeout=TIMEOUT)
        except SubmissionError as err:
            out = err.result
        wall = time.perf_counter() - started
        seen = accounting(url)
    have = int(out["runflow_run_id"].notna().sum())
    dup = sum(1 for n in seen["runs_by_client_ref"].values() if n > 1)
    lines.append(
        f"faulty server ({FAULTY}; client timeout {TIMEOUT:g} s), {rows:,} rows — runflow-frames: "
        f"{rows / wall:,.0f} rows/s, rows lost {rows - have}, duplicate runs {dup}, "
        f"faults struck {sum(seen['faults'].values())}"
    )
    with emulator_process("--faults", FAULTY) as url:
        started = time.perf_counter()
        handles = asyncio.run(naive(df, url))
        wall = time.perf_counter() - started
        seen = accounting(url)
    dup = sum(1 for n in seen["runs_by_client_ref"].values() if n > 1)
    extra = sum(n - 1 for n in seen["runs_by_client_ref"].values() if n > 1)
    lines.append(
        f"same faulty server, naive asyncio + httpx + semaphore + retry loop: {rows / wall:,.0f} "
        f"rows/s, rows lost {rows - len(handles)}, rows with duplicate runs {dup} "
        f"({extra} extra billed runs), faults struck {sum(seen['faults'].values())}"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    lines = rate_limited(args.rate, args.rows, args.runs)
    lines += side_by_side(args.rows)
    append_results(
        "Resilience: server rate limit; faulty server vs a naive client",
        "python " + " ".join(sys.argv),
        lines,
    )


if __name__ == "__main__":
    main()
