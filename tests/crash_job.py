"""A checkpointed job run as its own process, for the crash tests (and the crash soak benchmark).

    python tests/crash_job.py BASE_URL CHECKPOINT ROWS OUT_PARQUET
        [--concurrency N] [--chunk-size N] [--segment-rows N] [--lease-seconds S]

Prints READY once imports are done and the frame is built (so a test can time its kill to land
in the job, not in interpreter start-up), then DONE after writing the joined frame to OUT.
The API key comes from RUNFLOW_API_KEY. Small chunks and a low --segment-rows (how many
answered rows wait before a segment is written mid-run) make one run go through several
intent groups and segment writes, so that kills land in those too. CHECKPOINT may be a URL on
object storage; --lease-seconds then shortens its lease, so that the run after a kill need not
wait a minute for the killed run's lease to expire.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from runflow_frames import _journal, _objectstore, run_batches


def job_frame(rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"text": [f"row {i}" for i in range(rows)], "n": range(rows)},
        index=pd.Index([f"r{i:06d}" for i in range(rows)], name="key"),
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base_url")
    parser.add_argument("checkpoint")
    parser.add_argument("rows", type=int)
    parser.add_argument("out")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=100)
    parser.add_argument("--segment-rows", type=int, default=_journal.SEGMENT_ROWS)
    parser.add_argument("--lease-seconds", type=float, default=_objectstore.LEASE_SECONDS)
    args = parser.parse_args(argv)
    _journal.SEGMENT_ROWS = args.segment_rows
    _objectstore.LEASE_SECONDS = args.lease_seconds
    df = job_frame(args.rows)
    print("READY", flush=True)
    result = run_batches(
        df,
        "acme",
        "echo",
        checkpoint=args.checkpoint,
        base_url=args.base_url,
        max_concurrency=args.concurrency,
        chunk_size=args.chunk_size,
    )
    result.to_parquet(args.out)
    print("DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
