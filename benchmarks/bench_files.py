"""Streaming file jobs: rows/s and peak RSS for Parquet files of 1,000,000 and 5,000,000 rows.

Each job runs in its own process (so its peak RSS is its own) against the emulator in another
process. Target: peak RSS for 5M at most 1.2 times that for 1M (memory bounded by the block,
not the file).

    python benchmarks/bench_files.py [--sizes 1000000 5000000] [--block-rows 100000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _common import append_results, emulator_process

JOB = """
import resource, sys, time
from runflow_frames import run_batches_file
source, url, out, ckpt, block = sys.argv[1:6]
t = time.perf_counter()
counts = run_batches_file(source, "acme", "echo", output=out, checkpoint=ckpt, key="id",
                          block_rows=int(block), base_url=url, api_key="bench", progress=False)
wall = time.perf_counter() - t
print(counts["rows"], wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write(path: Path, rows: int) -> None:
    with pq.ParquetWriter(
        path, pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64())])
    ) as w:
        for start in range(0, rows, 500_000):
            n = min(500_000, rows - start)
            ids = [f"row-{i:09d}" for i in range(start, start + n)]
            prompts = [f"a photo of item {i}" for i in range(start, start + n)]
            w.write_table(
                pa.table({"id": ids, "prompt": prompts, "seed": np.arange(start, start + n)})
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--block-rows", type=int, default=100_000)
    args = parser.parse_args()
    lines, rss = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.sizes:
            source = Path(tmp) / f"in-{rows}.parquet"
            write(source, rows)
            with emulator_process() as url:
                out = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        JOB,
                        str(source),
                        url,
                        str(Path(tmp) / f"out-{rows}.parquet"),
                        str(Path(tmp) / f"ckpt-{rows}"),
                        str(args.block_rows),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
            done, wall, peak_kb = out.stdout.split()
            rss[rows] = int(peak_kb) / 1024
            lines.append(
                f"{rows:,} rows (Parquet, {source.stat().st_size / 1e6:.0f} MB), block_rows "
                f"{args.block_rows:,}: {int(done) / float(wall):,.0f} rows/s, {float(wall):.0f} s, "
                f"peak RSS {rss[rows]:,.0f} MB"
            )
    if len(rss) >= 2:
        small, large = min(rss), max(rss)
        lines.append(
            f"peak RSS {large:,} rows / {small:,} rows = {rss[large] / rss[small]:.2f} (target <= 1.2)"
        )
    append_results(
        "Streaming file jobs: rows/s and peak RSS", "python " + " ".join(sys.argv), lines
    )


if __name__ == "__main__":
    main()
