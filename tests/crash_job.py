"""A checkpointed job run as its own process, for the crash tests (and the crash soak benchmark).

    python tests/crash_job.py BASE_URL CHECKPOINT ROWS OUT_PARQUET [MAX_CONCURRENCY [SEGMENT_ROWS]]

Prints READY once imports are done and the frame is built (so a test can time its kill to land
in the job, not in interpreter start-up), then DONE after writing the joined frame to OUT.
The API key comes from RUNFLOW_API_KEY. SEGMENT_ROWS lowers how many answered rows the job lets
wait before writing them to a segment mid-run, so that kills land in those writes too.
"""

from __future__ import annotations

import sys

import pandas as pd

from runflow_frames import _checkpoint, run_batches


def job_frame(rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"text": [f"row {i}" for i in range(rows)], "n": range(rows)},
        index=pd.Index([f"r{i:06d}" for i in range(rows)], name="key"),
    )


def main(argv: list[str]) -> None:
    base_url, checkpoint, rows, out = argv[:4]
    concurrency = int(argv[4]) if len(argv) > 4 else 4
    if len(argv) > 5:
        _checkpoint.SEGMENT_ROWS = int(argv[5])
    df = job_frame(int(rows))
    print("READY", flush=True)
    result = run_batches(
        df, "acme", "echo", checkpoint=checkpoint, base_url=base_url, max_concurrency=concurrency
    )
    result.to_parquet(out)
    print("DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
