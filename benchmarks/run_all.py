"""The benchmark suite, one command: figures into RESULTS.md, charts into benchmarks/*.png.

1. Throughput against the physical limit. The emulator answers each create after a fixed service
   latency L; with C requests in flight the ceiling is C x 100 / L rows/s (Little's law). We plot
   achieved / ceiling for C in 1..64 and L in {20, 100, 500} ms.
2. Against the peer a user would write: asyncio + httpx + a semaphore, sending chunks in waves
   with gather, under lognormal latency jitter; throughput ratio, side by side in one run.
3. Client CPU per row (encode, join, checkpoint) at 100,000 and 1,000,000 rows, against the
   naive ``df.to_dict("records")`` + ``json.dumps`` path.

4. Memory, resume and requests per 1,000 rows, resilience, a Dask cluster against a rate limit
   and the crash soak: the scripts of the earlier issues, run in turn (``--core-only`` skips
   them).

Each figure is the median of several runs, with the spread. ``--quick`` runs a small version in
seconds (CI runs it as a smoke test, writing to a scratch file instead of RESULTS.md).

    python benchmarks/run_all.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
from _common import RESULTS, append_results, emulator_process
from _figures import CHART, FIGURES, record, render

from runflow_frames import run_batches

HERE = Path(__file__).parent
KEY = "bench"
# Part 4: memory, resume, requests per 1,000 rows, resilience, crash soak (their own scripts).
ONE_COMMAND = [
    ("bench_submit.py",),
    ("bench_requests.py",),
    ("bench_checkpoint.py",),
    ("bench_files.py",),
    ("bench_resilience.py",),
    ("bench_dask.py",),
    ("soak_crash.py", "--rows", "20000", "--kills", "60"),
]


def frame(rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "prompt": [f"a photo of item {i}" for i in range(rows)],
            "seed": rng.integers(0, 2**31, rows),
            "strength": rng.random(rows),
        }
    )


def capacity(quick: bool) -> float:
    """What the emulator itself can serve (rows/s, no latency, many in flight): where it, not
    the client, is the bottleneck."""
    df = frame(5_000 if quick else 50_000)
    with emulator_process() as url:
        started = time.perf_counter()
        run_batches(
            df, "acme", "echo", base_url=url, api_key=KEY, max_concurrency=16, progress=False
        )
        return len(df) / (time.perf_counter() - started)


async def _bare_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A create answered with the least work: echo one handle per submitted client_ref."""
    import orjson

    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        body = orjson.loads(await reader.readexactly(length))
        items = [
            {
                "id": f"i{n}",
                "run_id": f"r{n}",
                "sequence_index": n,
                "client_ref": item["client_ref"],
            }
            for n, item in enumerate(body["input"])
        ]
        answer = orjson.dumps({"id": "b", "items": items})
        writer.write(
            b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer)
        )
        await writer.drain()


def _bare_server(port: Any) -> None:
    async def main() -> None:
        server = await asyncio.start_server(_bare_handler, "127.0.0.1", 0)
        port.value = server.sockets[0].getsockname()[1]
        await server.serve_forever()

    asyncio.run(main())


def bare_round_trip(quick: bool) -> float:
    """Seconds per create, one at a time, against a bare asyncio server (its own process) that
    only echoes handles: the client's own share of every round trip."""
    import multiprocessing

    port = multiprocessing.Value("i", 0)
    server = multiprocessing.Process(target=_bare_server, args=(port,), daemon=True)
    server.start()
    try:
        while not port.value:
            time.sleep(0.01)
        return _seconds_per_create(f"http://127.0.0.1:{port.value}", quick)
    finally:
        server.kill()


def emulator_processing(quick: bool) -> float:
    """Seconds of the emulator's own work per 100-row create, called in-process (no HTTP)."""
    from runflow_frames._rows import body_suffix, chunk_body, client_refs, encode_rows, item_columns
    from runflow_frames.emulator import Emulator

    df = frame(5_000 if quick else 50_000)
    refs = client_refs(df, None)
    items = encode_rows(df, refs, item_columns(df, None, None))
    suffix = body_suffix(None, None)
    bodies = [chunk_body(items[i : i + 100], suffix) for i in range(0, len(items), 100)]
    emulator = Emulator()
    started = time.perf_counter()
    for n, body in enumerate(bodies):
        answer = emulator.create_batch(KEY, "acme/echo", body, f"k{n}")
        assert answer.status == 201
    return (time.perf_counter() - started) / len(bodies)


def round_trip(quick: bool) -> float:
    """Seconds per create with no service latency, one at a time: what the client's and the
    emulator's HTTP stacks and the emulator's own processing add to every request."""
    with emulator_process() as url:
        return _seconds_per_create(url, quick)


def _seconds_per_create(url: str, quick: bool) -> float:
    """A job of 100-row creates sent one at a time to ``url``: seconds per create."""
    requests = 50 if quick else 300
    df = frame(requests * 100)
    started = time.perf_counter()
    run_batches(df, "acme", "echo", base_url=url, api_key=KEY, max_concurrency=1, progress=False)
    return (time.perf_counter() - started) / requests


Ratios = dict[float, dict[int, list[float]]]


def ceiling(quick: bool, runs: int) -> tuple[list[str], Ratios, set[tuple[float, int]]]:
    served = capacity(quick)
    trip = round_trip(quick)
    bare = bare_round_trip(quick)
    share = max(trip - bare, 0.0)  # the emulator's time per create, one at a time
    processing = emulator_processing(quick)
    latencies = [0.02, 0.1] if quick else [0.02, 0.1, 0.5]
    concurrencies = [1, 4, 16] if quick else [1, 2, 4, 8, 16, 32, 64]
    ratios: Ratios = {}
    bound: set[tuple[float, int]] = set()
    lines = [
        f"the emulator alone (no latency, C=16) serves {served:,.0f} rows/s",
        f"round trip with no service latency, C=1: {trip * 1000:.2f} ms per create: the "
        f"client's own {bare * 1000:.2f} ms (the same job against a bare asyncio server, in its "
        f"own process, that only echoes handles) and the emulator's {share * 1000:.2f} ms (its "
        f"processing {processing * 1000:.2f} ms, measured in-process, which hides inside L "
        "once L is longer; its HTTP stack, uvicorn and Starlette, the rest)",
        "a point is marked [emulator-bound] when its ceiling is above what the emulator serves, "
        "or when a round of C creates arriving together waits for more than a tenth of L on "
        f"the emulator's one event loop (C x {share * 1000:.2f} ms > L / 10)",
    ]
    for latency in latencies:
        ratios[latency] = {}
        with emulator_process("--latency", str(latency)) as url:
            for c in concurrencies:
                # At least 10 rounds of C requests and 2 s at the ceiling, so that start-up
                # (encoding, connecting) is a small part of the run; at most 200,000 rows.
                rounds = max(10, math.ceil(2.0 / latency))
                requests = max(2 * c, 8) if quick else min(rounds * c, 2_000)
                df = frame(requests * 100)
                limit = c * 100 / latency
                got = []
                for _ in range(runs):
                    started = time.perf_counter()
                    run_batches(
                        df,
                        "acme",
                        "echo",
                        base_url=url,
                        api_key=KEY,
                        max_concurrency=c,
                        progress=False,
                    )
                    got.append(len(df) / (time.perf_counter() - started) / limit)
                ratios[latency][c] = got
                if limit > served or c * share > latency / 10:
                    bound.add((latency, c))
                lines.append(
                    f"L={latency * 1000:g} ms, C={c}: achieved/ceiling median "
                    f"{statistics.median(got):.3f} (min {min(got):.3f}, max {max(got):.3f}), "
                    f"ceiling {limit:,.0f} rows/s"
                    + (" [emulator-bound]" if (latency, c) in bound else "")
                )
    free = [(lat, c) for lat in ratios for c in ratios[lat] if (lat, c) not in bound]
    misses = [
        f"L={lat * 1000:g} ms C={c} {statistics.median(ratios[lat][c]):.3f}"
        for lat, c in free
        if statistics.median(ratios[lat][c]) < 0.9
    ]
    lines.append(
        f"target >= 0.9 of the ceiling where the emulator is not the bottleneck: met at "
        f"{len(free) - len(misses)} of {len(free)} such points"
        + (f"; missed at {', '.join(misses)}" if misses else "")
    )
    return lines, ratios, bound


async def waves(df: pd.DataFrame, url: str, concurrency: int) -> None:
    """The peer: chunks in waves of ``concurrency``, each wave waiting for its slowest."""
    records = df.to_dict("records")
    chunks = [records[i : i + 100] for i in range(0, len(records), 100)]
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as client:

        async def send(chunk: list[dict[str, Any]]) -> None:
            async with sem:
                body = json.dumps({"input": chunk})
                r = await client.post(
                    "/v1/models/acme/echo/batches",
                    content=body,
                    headers={"Content-Type": "application/json"},
                )
                r.raise_for_status()

        for start in range(0, len(chunks), concurrency):
            await asyncio.gather(*(send(c) for c in chunks[start : start + concurrency]))


def peer(quick: bool, runs: int) -> tuple[list[str], dict[str, list[float]]]:
    rows = 4_000 if quick else 40_000
    c, latency, sigma = 8, 0.1, 0.5
    df = frame(rows)
    rates: dict[str, list[float]] = {"runflow-frames": [], "waves (gather)": []}
    with emulator_process("--latency", str(latency), "--jitter", str(sigma)) as url:
        for _ in range(runs):
            started = time.perf_counter()
            run_batches(
                df, "acme", "echo", base_url=url, api_key=KEY, max_concurrency=c, progress=False
            )
            rates["runflow-frames"].append(rows / (time.perf_counter() - started))
            started = time.perf_counter()
            asyncio.run(waves(df, url, c))
            rates["waves (gather)"].append(rows / (time.perf_counter() - started))
    ours, theirs = (statistics.median(rates[k]) for k in rates)
    return [
        f"lognormal latency (median {latency * 1000:g} ms, sigma {sigma}), C={c}, {rows:,} rows: "
        f"runflow-frames {ours:,.0f} rows/s (min {min(rates['runflow-frames']):,.0f}, max "
        f"{max(rates['runflow-frames']):,.0f}); waves with gather {theirs:,.0f} rows/s (min "
        f"{min(rates['waves (gather)']):,.0f}, max {max(rates['waves (gather)']):,.0f}); "
        f"ratio {ours / theirs:.2f}"
    ], rates


def cpu(quick: bool, runs: int) -> tuple[list[str], dict[int, float]]:
    from runflow_frames._handles import Handles, HandleTable, join_handles
    from runflow_frames._items import Items
    from runflow_frames._job import ENCODE_AHEAD
    from runflow_frames._rows import body_suffix, chunk_body, client_refs, item_columns

    lines, ratios = [], {}
    for rows in [20_000] if quick else [100_000, 1_000_000]:
        df = frame(rows)
        ours, naive = [], []
        for _ in range(runs):
            started = time.process_time()
            # What a job with a checkpoint does per row: keys, value hashes, items, bodies and
            # digests per chunk, handles, the join.
            refs = client_refs(df, None)
            items = Items(df, refs, item_columns(df, None, None), "omit")
            for i in range(0, rows, ENCODE_AHEAD):  # as a job encodes: a block at a time
                items.encode(range(i, min(i + ENCODE_AHEAD, rows)))
            suffix = body_suffix(None, None)
            bodies, digests = [], []
            for i in range(0, rows, 100):
                chunk = range(i, min(i + 100, rows))
                bodies.append(chunk_body(items.take(chunk), suffix))
                digests.append(items.digests(chunk))  # what a checkpoint adds
            table = HandleTable()
            for i in range(0, rows, 100):
                n = len(refs[i : i + 100])
                ids = [f"{j}" for j in range(i, i + n)]
                table.add(refs[i : i + 100], Handles("b", ids, ids, list(range(n)), ["queued"] * n))
            join_handles(df, refs, table.to_arrow())
            ours.append((time.process_time() - started) / rows * 1e6)
            del bodies, digests
            started = time.process_time()
            records = df.to_dict("records")
            for i in range(0, rows, 100):
                json.dumps(
                    {
                        "input": [
                            {"client_ref": str(i + j), **r}
                            for j, r in enumerate(records[i : i + 100])
                        ]
                    }
                )
            naive.append((time.process_time() - started) / rows * 1e6)
        lines.append(
            f"client CPU per row, {rows:,} rows: runflow-frames (keys, value hashes, encode, "
            "bodies, digests, join) "
            f"median {statistics.median(ours):.2f} us (min {min(ours):.2f}, max {max(ours):.2f}); "
            f"naive to_dict + json.dumps {statistics.median(naive):.2f} us (encode only)"
        )
        ratios[rows] = statistics.median(ours) / statistics.median(naive)
    return lines, ratios


def chart(
    ratios: Ratios, bound: set[tuple[float, int]], rates: dict[str, list[float]], out: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for latency, by_c in ratios.items():
        cs = sorted(by_c)
        med = [statistics.median(by_c[c]) for c in cs]
        low = [med[i] - min(by_c[c]) for i, c in enumerate(cs)]
        high = [max(by_c[c]) - med[i] for i, c in enumerate(cs)]
        line = left.errorbar(
            cs, med, yerr=[low, high], marker="o", capsize=3, label=f"L = {latency * 1000:g} ms"
        )
        hollow = [i for i, c in enumerate(cs) if (latency, c) in bound]
        left.scatter(
            [cs[i] for i in hollow],
            [med[i] for i in hollow],
            s=90,
            facecolors="white",
            edgecolors=line.lines[0].get_color(),
            zorder=3,
            label="emulator-bound" if latency == max(ratios) else None,
        )
    left.axhline(0.9, color="grey", linestyle="--", linewidth=1, label="target 0.9")
    left.set_xscale("log", base=2)
    left.set_ylim(0, 1.1)
    left.set_xlabel("max_concurrency C")
    left.set_ylabel("achieved / ceiling (C x 100 / L)")
    left.set_title("Throughput against Little's law")
    left.legend()
    names = list(rates)
    right.bar(
        names,
        [statistics.median(rates[n]) for n in names],
        yerr=[
            [statistics.median(rates[n]) - min(rates[n]) for n in names],
            [max(rates[n]) - statistics.median(rates[n]) for n in names],
        ],
        capsize=4,
    )
    right.set_ylabel("rows/s")
    right.set_title("Lognormal latency: pipeline vs waves")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--quick", action="store_true", help="a small, fast version (CI smoke test)"
    )
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--core-only", action="store_true", help="skip the scripts of part 4")
    args = parser.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    lines, ratios, bound = ceiling(args.quick, runs)
    peer_lines, rates = peer(args.quick, runs)
    # CPU time on this VM swings by a third between runs: five of each, side by side.
    cpu_lines, per_row = cpu(args.quick, runs if args.quick else max(runs, 5))
    lines += peer_lines + cpu_lines
    # A quick run records and renders into scratch copies: the smoke test runs every step.
    scratch = Path(tempfile.mkdtemp()) if args.quick else HERE
    if args.quick:
        shutil.copy(FIGURES, scratch / FIGURES.name)
        shutil.copy(RESULTS, scratch / RESULTS.name)
    command = "python " + " ".join(["benchmarks/run_all.py", *sys.argv[1:]])
    record_figures(ratios, bound, runs, per_row, command, scratch / FIGURES.name)
    chart(ratios, bound, rates, scratch / "suite.png")
    if args.quick:
        render(scratch / FIGURES.name, scratch / RESULTS.name, scratch / CHART.name)
        print("\n".join(lines))
        print(f"quick run: charts and RESULTS.md in {scratch}; {RESULTS} untouched")
        return
    append_results(
        "Benchmark suite (benchmarks/run_all.py); chart: benchmarks/suite.png",
        "python " + " ".join(sys.argv),
        lines,
    )
    if not args.core_only:
        # 4. The figures of the earlier issues, each script appending its own section.
        for script, *script_args in ONE_COMMAND:
            subprocess.run([sys.executable, str(HERE / script), *script_args], check=True)
    render()


def record_figures(
    ratios: Ratios,
    bound: set[tuple[float, int]],
    runs: int,
    per_row: dict[int, float],
    command: str,
    path: Path,
) -> None:
    """The suite's goals into figures.json: L=20 ms C=1, L=100 ms C<=16 and every point the
    emulator does not bound (median of ``runs`` each), and CPU per row."""

    def worst(points: list[tuple[float, int]]) -> tuple[float, str]:
        value, lat, c = min((statistics.median(ratios[lat][c]), lat, c) for lat, c in points)
        return value, f"{value:.3f} (L={lat * 1000:g} ms C={c}; median of {runs})"

    free = [(lat, c) for lat in ratios for c in ratios[lat] if (lat, c) not in bound]
    if (0.02, 1) in free:
        record("suite_l20_c1", *worst([(0.02, 1)]), command, path=path)
    l100 = [(lat, c) for lat, c in free if lat == 0.1 and c <= 16]
    if l100:
        record("suite_l100", *worst(l100), command, path=path)
    record("suite_free", *worst(free), command, path=path)
    shown = ", ".join(f"{ratio:.2f} at {rows:,} rows" for rows, ratio in per_row.items())
    record("cpu_per_row_ratio", max(per_row.values()), shown, command, path=path)


if __name__ == "__main__":
    main()
