"""What a round trip costs the client, by what runs beneath ``_client.py``: client CPU per create
at C = 1, 8 and 64 requests in flight, each option in its own process against the same bare
asyncio server (its own process; it only echoes one handle per item), a 100-item body.

Through the project's own request path (``AsyncRunflowClient.create_batch``: headers, the
streamed and capped body read, JSON parse, error mapping), with each wire beneath it:

- ``ours``: the default, aiohttp directly (``_wire.AiohttpWire``);
- ``httpx-pool``: httpx with its default pool (httpcore), sized to C: what a given
  ``transport=`` runs on, and what the project ran on before aiohttp;
- ``httpx-aiohttp``: httpx over aiohttp (``httpx_aiohttp.AiohttpTransport``; only when
  ``pip install httpx-aiohttp`` was run, not a dependency of the project);

and, for reference, ``aiohttp-alone``: the same POSTs with aiohttp and none of our code.

    python benchmarks/bench_http.py [--requests 2000] [--runs 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import statistics
import subprocess
import sys
import time

import orjson
from _common import append_results
from _figures import record
from run_all import _bare_server

OPTIONS = ("ours", "httpx-pool", "httpx-aiohttp", "aiohttp-alone")
CLIENT = """
import asyncio, json, sys, time
import httpx, orjson
from runflow_frames._client import AsyncRunflowClient
from runflow_frames._config import Connection

option, url, requests, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
body = orjson.dumps({"input": [{"text": f"item {n} " * 8, "client_ref": f"r{n}"} for n in range(100)]})


def transport():
    if option == "ours":
        return None
    if option == "httpx-pool":
        return httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=concurrency))
    from httpx_aiohttp import AiohttpTransport
    return AiohttpTransport(limits=httpx.Limits(max_connections=concurrency))


async def ours():
    connection = Connection.resolve(api_key="bench", base_url=url, transport=transport())
    async with AsyncRunflowClient(connection=connection) as client:
        async def worker(n):
            for i in range(n):
                await client.create_batch("acme/echo", body, idempotency_key=f"k{i}")
        await worker(20)  # warm up: connections, imports
        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
        return time.perf_counter() - start, time.process_time() - cpu


async def alone():
    import aiohttp
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector) as session:
        async def worker(n):
            for i in range(n):
                async with session.post(
                    "/v1/models/acme/echo/batches", data=body,
                    headers={"Content-Type": "application/json", "Idempotency-Key": f"k{i}"},
                ) as response:
                    orjson.loads(await response.read())
        await worker(20)
        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
        return time.perf_counter() - start, time.process_time() - cpu


wall, cpu = asyncio.run(alone() if option == "aiohttp-alone" else ours())
print(json.dumps({"wall": wall, "cpu": cpu}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    args = parser.parse_args()
    port = multiprocessing.Value("i", 0)
    server = multiprocessing.Process(target=_bare_server, args=(port,), daemon=True)
    server.start()
    cpu_ms: dict[tuple[str, int], list[float]] = {}
    options = [
        o for o in OPTIONS if o != "httpx-aiohttp" or importlib.util.find_spec("httpx_aiohttp")
    ]
    try:
        while not port.value:
            time.sleep(0.01)
        url = f"http://127.0.0.1:{port.value}"
        for _ in range(args.runs):
            for c in args.concurrency:
                for option in options:
                    done = subprocess.run(
                        [sys.executable, "-c", CLIENT, option, url, str(args.requests), str(c)],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    figures = json.loads(done.stdout)
                    per = figures["cpu"] * 1000 / (args.requests // c * c)
                    cpu_ms.setdefault((option, c), []).append(per)
    finally:
        server.kill()
    body = orjson.dumps({"input": [{"text": f"item {n} " * 8} for n in range(100)]})
    lines = [
        f"client CPU per create (ms), {len(body) / 1000:.0f} KB body, {args.requests:,} "
        f"requests, median of {args.runs} runs, against a bare asyncio echo server:"
    ]
    header = "| option | " + " | ".join(f"C = {c}" for c in args.concurrency) + " |"
    lines.append(header)
    for option in options:
        cells = [f"{statistics.median(cpu_ms[(option, c)]):.2f}" for c in args.concurrency]
        lines.append(f"| {option} | " + " | ".join(cells) + " |")
    ours = [statistics.median(cpu_ms[(OPTIONS[0], c)]) for c in args.concurrency]
    record(
        "cpu_per_create_ms",
        max(ours),
        " / ".join(f"{v:.2f}" for v in ours)
        + f" ms at C = {' / '.join(map(str, args.concurrency))} (median of {args.runs})",
        "python " + " ".join(["benchmarks/bench_http.py", *sys.argv[1:]]),
    )
    append_results(
        "HTTP path: client CPU per create by transport", "python " + " ".join(sys.argv), lines
    )


if __name__ == "__main__":
    main()
