"""Streaming file jobs: rows/s and peak RSS for Parquet files of 1,000,000 and 5,000,000 rows.

Each job runs in its own process (its peak RSS is its own: VmHWM, see ``_common.PEAK_KB``) against the emulator in another
process. Target: peak RSS for 5M at most 1.2 times that for 1M (memory bounded by the block,
not the file).

With ``--object-store``, the same job runs twice per repetition, once on local files and once
with its source, checkpoint and output in a bucket of an S3 server on loopback (moto's, in its
own process): rows/s and peak RSS side by side, and the object store's requests per 1,000 rows
as the job issued them (targets: throughput within 15% and peak RSS within 1.2x of the local
job; at most one PUT per 64 chunks for intents, plus segments).

    python benchmarks/bench_files.py [--sizes 1000000 5000000] [--block-rows 100000]
    python benchmarks/bench_files.py --object-store [--sizes 1000000] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _common import PEAK_KB, append_results, emulator_process, spread
from _figures import record

COMMAND = "python " + " ".join(["benchmarks/bench_files.py", *sys.argv[1:]])
JOB = (
    PEAK_KB
    + """
import collections, json, sys, time
from runflow_frames import _objectstore, run_batches_file
source, url, out, ckpt, block = sys.argv[1:6]
requests = collections.Counter()
for method in ("create", "put", "read", "names", "delete", "open"):
    def counted(self, *args, _method=method, _original=getattr(_objectstore.ObjectStore, method)):
        name = args[0] if args and isinstance(args[0], str) else ""
        kind = "log" if name.startswith("log/") else name.split("-")[0].split(".")[0]
        if kind == "log" and _method == "create":  # intents in it, or only answers
            kind = "log (intents)" if b'"t":"i"' in bytes(args[1]) else "log (answers only)"
        requests[f"{_method} {kind}".strip()] += 1
        return _original(self, *args)
    setattr(_objectstore.ObjectStore, method, counted)
t = time.perf_counter()
counts = run_batches_file(source, "acme", "echo", output=out, checkpoint=ckpt, key="id",
                          block_rows=int(block), base_url=url, api_key="bench", progress=False)
wall = time.perf_counter() - t
print(counts["rows"], wall, peak_kb())
print(json.dumps(requests))
"""
)


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
    parser.add_argument("--object-store", action="store_true")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.object_store:
        object_store(args.sizes[0], args.block_rows, args.runs)
        return
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
            done, wall, peak_kb = out.stdout.splitlines()[0].split()
            rss[rows] = int(peak_kb) / 1024
            lines.append(
                f"{rows:,} rows (Parquet, {source.stat().st_size / 1e6:.0f} MB), block_rows "
                f"{args.block_rows:,}: {int(done) / float(wall):,.0f} rows/s, {float(wall):.0f} s, "
                f"peak RSS {rss[rows]:,.0f} MB"
            )
    if len(rss) >= 2:
        small, large = min(rss), max(rss)
        ratio = rss[large] / rss[small]
        lines.append(f"peak RSS {large:,} rows / {small:,} rows = {ratio:.2f} (target <= 1.2)")
        shown = f"{ratio:.2f} ({rss[large]:.0f} / {rss[small]:.0f} MB, each job's own VmHWM)"
        record("file_rss_ratio", ratio, shown, COMMAND)
    append_results("Streaming file jobs: rows/s and peak RSS", COMMAND, lines)


def run_job(
    source: str, url: str, out: str, ckpt: str, block_rows: int
) -> tuple[float, float, dict[str, int]]:
    """rows/s, peak RSS (MB) and object-store requests of one job in its own process."""
    done = subprocess.run(
        [sys.executable, "-c", JOB, source, url, out, ckpt, str(block_rows)],
        capture_output=True,
        text=True,
        check=True,
    )
    first, requests = done.stdout.splitlines()[:2]
    rows, wall, peak_kb = first.split()
    return int(rows) / float(wall), int(peak_kb) / 1024, json.loads(requests)


SERVERS: dict[str, int] = {}  # an S3 server's URL -> its process id


def cpu_seconds(pid: int) -> float:
    """User and system CPU a process used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server in its own process; the AWS variables point this process and its
    children at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    SERVERS[url] = proc.pid
    os.environ.update(
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def object_store(rows: int, block_rows: int, runs: int) -> None:
    import boto3
    import s3fs

    lines = []
    local_rates, remote_rates, local_rss, remote_rss, server_cpu = [], [], [], [], []
    requests: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp, s3_server() as endpoint:
        source = Path(tmp) / "in.parquet"
        write(source, rows)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        s3fs.S3FileSystem().put_file(str(source), "bench/in.parquet")
        with emulator_process() as url:
            for run in range(runs):
                rate, rss, _ = run_job(
                    str(source), url, f"{tmp}/out-{run}.parquet", f"{tmp}/ck-{run}", block_rows
                )
                local_rates.append(rate)
                local_rss.append(rss)
                before = cpu_seconds(SERVERS[endpoint])
                rate, rss, requests = run_job(
                    "s3://bench/in.parquet",
                    url,
                    f"s3://bench/out-{run}.parquet",
                    f"s3://bench/ck-{run}",
                    block_rows,
                )
                server_cpu.append(cpu_seconds(SERVERS[endpoint]) - before)
                remote_rates.append(rate)
                remote_rss.append(rss)
    chunks = rows / 100
    intents = requests.get("create log (intents)", 0)
    per_thousand = {k: round(v * 1000 / rows, 2) for k, v in sorted(requests.items())}
    ratio = statistics.median(remote_rates) / statistics.median(local_rates)
    memory = statistics.median(remote_rss) / statistics.median(local_rss)
    lines += [
        f"{rows:,} rows (Parquet), block_rows {block_rows:,}, emulator at 0 ms latency",
        f"local files: rows/s {spread(local_rates)}; peak RSS MB {spread(local_rss)}",
        f"bucket (source, checkpoint, output on S3): rows/s {spread(remote_rates)}; "
        f"peak RSS MB {spread(remote_rss)}; the S3 server's own CPU per job s "
        f"{spread(server_cpu, '.1f')} (on the same 2 cores as the job and the emulator)",
        f"throughput bucket/local = {ratio:.2f} (target >= 0.85); peak RSS bucket/local = "
        f"{memory:.2f} (target <= 1.2)",
        f"object-store requests per 1,000 rows (last run): {per_thousand}",
        f"intent PUTs (log objects with intents): {intents} for {chunks:,.0f} chunks = one per "
        f"{chunks / max(1, intents):.0f} chunks (target: one per 64 or fewer); log objects with "
        f"answers only (a block's last answers, at its close): "
        f"{requests.get('create log (answers only)', 0)}",
    ]
    runs = f"median of {len(local_rates)} run{'s' if len(local_rates) != 1 else ''} each"
    record("object_store_throughput", ratio, f"{ratio:.2f} ({runs})", COMMAND)
    shown = f"{memory:.2f} ({statistics.median(remote_rss):.0f} / {statistics.median(local_rss):.0f} MB; {runs})"
    record("object_store_rss", memory, shown, COMMAND)
    append_results("Streaming file jobs on object storage: bucket vs local files", COMMAND, lines)


if __name__ == "__main__":
    main()
