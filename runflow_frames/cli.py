"""The ``runflow-frames`` command: ``demo`` and ``emulator``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from ._version import __version__

DEMO_KEY = "rf_live_demo"


def _demo(rows: int) -> int:
    import pandas as pd

    from ._api import run_batches
    from .emulator import Emulator
    from .emulator._serve import serve

    emulator = Emulator()
    df = pd.DataFrame(
        {
            "text": [f"row number {i}" for i in range(rows)],
            "repeat": [1 + i % 3 for i in range(rows)],
        },
        index=pd.Index([f"row-{i:05d}" for i in range(rows)], name="row"),
    )
    with serve(emulator) as base_url:
        print(f"emulator serving Runflow's batch API at {base_url}")
        print(f"submitting {rows} rows to acme/uppercase in chunks of 100, 8 at a time...")
        started = time.perf_counter()
        out = run_batches(df, "acme", "uppercase", base_url=base_url, api_key=DEMO_KEY)
        elapsed = time.perf_counter() - started
    seen = emulator.accounting()
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(out)
    print(
        f"\n{len(out)} rows -> {out['runflow_batch_id'].nunique()} batches, "
        f"{out['runflow_run_id'].nunique()} runs in {elapsed:.2f} s; "
        f"the emulator created {seen.batches_created} batches, "
        f"{sum(seen.runs_by_client_ref.values())} runs, duplicates: {len(seen.duplicate_refs())}"
    )
    return 0


def _emulator(
    host: str, port: int, queued: float, running: float, latency: float, faults: str
) -> int:
    from .emulator import Emulator, Faults, Timing
    from .emulator._serve import run_forever

    timing = Timing(queued=queued, running=running, create_latency=latency)
    injected = Faults.parse(faults) if faults else None
    print(f"Runflow emulator on http://{host}:{port} (any bearer token is accepted)", flush=True)
    if injected is not None:
        print(f"injecting {injected}", flush=True)
    run_forever(Emulator(timing=timing, faults=injected), host=host, port=port)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="runflow-frames", description="Push dataframes through Runflow's batch API."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a small job on the embedded emulator")
    demo.add_argument("--rows", type=int, default=250, help="rows to submit (default 250)")
    emu = commands.add_parser("emulator", help="serve the local Runflow emulator")
    emu.add_argument("--host", default="127.0.0.1")
    emu.add_argument("--port", type=int, default=8080)
    emu.add_argument("--queued", type=float, default=0.05, help="seconds a run waits in queue")
    emu.add_argument("--running", type=float, default=0.2, help="seconds a run runs")
    emu.add_argument("--latency", type=float, default=0.0, help="service time of a create POST")
    emu.add_argument(
        "--faults",
        default="",
        help="faults to inject, e.g. 'rate_limited=0.05,retry_after=1,reset_after=0.02,"
        "rate_limit=20' (see runflow_frames.emulator.Faults)",
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args.rows)
    return _emulator(args.host, args.port, args.queued, args.running, args.latency, args.faults)


if __name__ == "__main__":
    sys.exit(main())
