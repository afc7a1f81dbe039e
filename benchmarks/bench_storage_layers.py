"""fsspec (s3fs) or obstore beneath object storage: the same work through each, side by side.

Against one S3 server on loopback (moto's, in its own process), each layer in its own process
(so that its imports and peak RSS are its own), repeated ``--runs`` times:

- read: a Parquet file of ``--rows`` rows streamed in 100,000-row batches (what a file job
  does with its source);
- write: the same table uploaded as one Parquet object (a file job's output);
- create: ``--creates`` small objects created exclusively (``If-None-Match: *``), one after
  another (what an object-storage checkpoint does before each group of POSTs).

    python benchmarks/bench_storage_layers.py [--rows 1000000] [--runs 3] [--creates 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import PEAK_KB, append_results, spread
from bench_files import s3_server, write

LAYER = (
    PEAK_KB
    + """
import json, sys, time
import pyarrow.parquet as pq
layer, rows, creates = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
if layer == "fsspec":
    import s3fs
    fs = s3fs.S3FileSystem()
    reader = lambda: fs.open("bench/in.parquet", "rb")
    writer = lambda name: fs.open(f"bench/{name}", "wb")
    def create(name, data):
        with fs.open(f"bench/{name}", "xb") as f:
            f.write(data)
else:  # obstore's Rust client, through its fsspec adapter (pyarrow reads file objects)
    import obstore
    from obstore.fsspec import FsspecStore
    from obstore.store import S3Store
    fs = FsspecStore("s3", client_options={"allow_http": True})
    store = S3Store.from_url("s3://bench", client_options={"allow_http": True})
    reader = lambda: fs.open("bench/in.parquet", "rb")
    writer = lambda name: fs.open(f"bench/{name}", "wb")
    create = lambda name, data: obstore.put(store, name, data, mode="create")
imported = time.perf_counter() - t0
t = time.perf_counter()
with reader() as f:
    table = None
    n = 0
    for batch in pq.ParquetFile(f).iter_batches(batch_size=100_000):
        n += batch.num_rows
read = time.perf_counter() - t
assert n == rows, n
with reader() as f:
    table = pq.read_table(f)
t = time.perf_counter()
with writer(f"out-{layer}-{time.time_ns()}.parquet") as f:
    pq.write_table(table, f)
wrote = time.perf_counter() - t
t = time.perf_counter()
for i in range(creates):
    create(f"c-{layer}-{time.time_ns()}-{i}", b'{"r": []}')
created = time.perf_counter() - t
print(json.dumps({"import": imported, "read": read, "write": wrote,
                  "create_ms": created * 1000 / max(1, creates),
                  "rss": peak_kb() / 1024}))
"""
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--creates", type=int, default=200)
    args = parser.parse_args()
    import boto3
    import s3fs

    results: dict[str, list[dict[str, float]]] = {"fsspec": [], "obstore": []}
    with tempfile.TemporaryDirectory() as tmp, s3_server() as endpoint:
        source = Path(tmp) / "in.parquet"
        write(source, args.rows)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        s3fs.S3FileSystem().put_file(str(source), "bench/in.parquet")
        for _ in range(args.runs):
            for layer in results:
                done = subprocess.run(
                    [sys.executable, "-c", LAYER, layer, str(args.rows), str(args.creates)],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if done.returncode:
                    raise RuntimeError(f"{layer}: {done.stderr}")
                results[layer].append(json.loads(done.stdout))
    lines = [f"{args.rows:,}-row Parquet file (read in 100,000-row batches, then uploaded)"]
    for layer, runs in results.items():
        figures = {k: [r[k] for r in runs] for k in runs[0]}
        lines.append(
            f"{layer}: import s {spread(figures['import'], '.2f')}; read s "
            f"{spread(figures['read'], '.2f')}; write s {spread(figures['write'], '.2f')}; "
            f"exclusive create ms {spread(figures['create_ms'], '.1f')}; peak RSS MB "
            f"{spread(figures['rss'])}"
        )
    for key in ("read", "write", "create_ms", "rss"):
        ratio = statistics.median(r[key] for r in results["obstore"]) / statistics.median(
            r[key] for r in results["fsspec"]
        )
        lines.append(f"obstore/fsspec {key}: {ratio:.2f}")
    append_results(
        "Object storage layers: fsspec (s3fs) or obstore", "python " + " ".join(sys.argv), lines
    )


if __name__ == "__main__":
    main()
