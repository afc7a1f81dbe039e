"""Crash soak: the crash test, longer. A checkpointed job in a subprocess is SIGKILLed at many
random moments and resumed until it finishes; the emulator (its own process) counts the runs.

    python benchmarks/soak_crash.py [--rows 20000] [--kills 100] [--seed 1]

Appends to RESULTS.md: kill points tried, duplicate runs found (must be 0), rows whose final
handle differs from the server's record (must be 0), and the wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from _common import append_results
from _figures import record

from tests.crash_harness import soak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=10)
    parser.add_argument("--segment-rows", type=int, default=200, help="mid-run segment size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = soak(
            Path(tmp),
            rows=args.rows,
            kills=args.kills,
            seed=args.seed,
            latency=args.latency,
            concurrency=args.concurrency,
            max_delay=0.25,
            chunk_size=args.chunk_size,
            segment_rows=args.segment_rows,
            max_attempts=args.kills * 3,
        )
    assert result.result is not None
    delays = result.kill_delays
    record(
        "crash_duplicates",
        len(result.duplicates) + args.rows - len(result.runs_by_ref),
        f"{len(result.duplicates)} duplicate runs, {args.rows - len(result.runs_by_ref)} rows "
        f"lost ({len(delays)} kills)",
        "python " + " ".join(["benchmarks/soak_crash.py", *sys.argv[1:]]),
    )
    append_results(
        "Crash soak: SIGKILL at random moments, resume until done",
        "python " + " ".join(sys.argv),
        [
            f"{args.rows:,} rows, emulator latency {args.latency * 1000:g} ms per POST, "
            f"max_concurrency {args.concurrency}, chunks of {args.chunk_size} rows, a segment "
            f"written every {args.segment_rows:,} answered rows",
            f"kill points tried: {len(delays)} (delay after start-up: median "
            f"{statistics.median(delays) * 1000:.0f} ms, min {min(delays) * 1000:.0f}, "
            f"max {max(delays) * 1000:.0f}); runs of the job: {result.attempts}",
            f"duplicate runs found: {len(result.duplicates)} (must be 0)",
            f"rows created by the server: {len(result.runs_by_ref):,} of {args.rows:,}; "
            f"rows whose final handle differs from the server's record: "
            f"{len(result.mismatches())} (must be 0)",
            f"wall time: {result.wall:.0f} s",
        ],
    )


if __name__ == "__main__":
    main()
