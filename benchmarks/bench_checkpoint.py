"""What checkpoints cost, and how fast a big job resumes.

1. Overhead: ROWS rows (default 200,000) through an emulator in its own process (a fresh one
   per run), with and without checkpoint=, in counterbalanced order, several runs each: median
   rows/s, and the median of the with/without ratios of runs side by side (target: at most 10%
   slower); the client CPU the checkpoint adds per row.
2. Resume start-up, clean stop: a 1,000,000-row job of which 990,000 rows were submitted by an
   earlier run that ended normally (handles compacted to Parquet): seconds from the call to its
   first new request (target: within 1.5 s).
3. Resume start-up after SIGKILL: the same 1,000,000-row job run in a subprocess and killed once
   the server has 900,000 of its rows: no close, so the answers since the last mid-run segment
   and the pending intents are only in the journal.

    python benchmarks/bench_checkpoint.py [--rows 200000] [--runs 15] [--resume-rows 1000000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from _common import append_results, emulator_process, spread
from _figures import record

from runflow_frames import run_batches
from tests.crash_job import job_frame  # the crash job's frame (_common put the repo on sys.path)

REPO = Path(__file__).resolve().parents[1]

KEY = "bench"


class FirstRequest(httpx.AsyncHTTPTransport):
    """Notes when the first request leaves."""

    first: float | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.first is None:
            self.first = time.perf_counter()
        return await super().handle_async_request(request)


def overhead(rows: int, runs: int, tmp: Path) -> list[str]:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "prompt": [f"a photo of item {i}" for i in range(rows)],
            "seed": rng.integers(0, 2**31, rows),
        }
    )
    rates: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    paired: list[float] = []  # with / without, for each run and the run next to it
    # ABBA order (without, with, with, without, ...), so that a drift of the machine is not
    # charged to whichever variant runs second. Each run meets a fresh emulator: one that kept
    # every earlier run's batches collects a bigger heap, and its pauses were most of the noise.
    order = [run % 2 == 1 for run in range(runs)] + [run % 2 == 0 for run in range(runs)]
    for n, with_ckpt in enumerate(order):
        ckpt = tmp / f"overhead-{n}" if with_ckpt else None
        with emulator_process() as url:
            run_batches(df.iloc[:2000], "acme", "echo", base_url=url, api_key=KEY)  # warm-up
            started, cpu_started = time.perf_counter(), time.process_time()
            run_batches(df, "acme", "echo", base_url=url, api_key=KEY, checkpoint=ckpt)
            rates[with_ckpt].append(rows / (time.perf_counter() - started))
            cpu[with_ckpt].append(time.process_time() - cpu_started)
        if n % 2:  # the order makes each pair one run with and one without, side by side
            paired.append(rates[True][-1] / rates[False][-1])
    ratio = statistics.median(paired)
    # How sure that median is: a 95% bootstrap interval (resampling the pairs).
    rng_ci = np.random.default_rng(1)
    resampled = np.median(rng_ci.choice(paired, (10_000, len(paired))), axis=1)
    low, high = np.percentile(resampled, [2.5, 97.5])
    of_medians = statistics.median(rates[True]) / statistics.median(rates[False])
    cpu_extra = statistics.median(cpu[True]) - statistics.median(cpu[False])
    record(
        "checkpoint_overhead",
        1 - ratio,
        f"{(1 - ratio) * 100:+.1f}% (median of {len(paired)} pair ratios; 95% interval "
        f"{low:.2f}-{high:.2f}; client CPU {cpu_extra / rows * 1e6:+.2f} us a row)",
        COMMAND,
    )
    return [
        f"overhead, {rows:,} rows: without checkpoint rows/s {spread(rates[False])}",
        f"overhead, {rows:,} rows: with checkpoint rows/s {spread(rates[True])}",
        f"overhead: with/without, median of {len(paired)} side-by-side pairs = {ratio:.3f} "
        f"(min {min(paired):.3f}, max {max(paired):.3f}; 95% bootstrap interval of the median "
        f"{low:.3f}-{high:.3f}): {(1 - ratio) * 100:+.1f}% slower (target <= 5%); ratio of "
        f"the medians {of_medians:.3f}",
        f"overhead: client CPU per run without {statistics.median(cpu[False]):.3f} s, with "
        f"{statistics.median(cpu[True]):.3f} s (medians): the checkpoint costs "
        f"{cpu_extra / rows * 1e6:.2f} us of client CPU per row (its threads included)",
    ]


def timed_resumes(
    url: str, df: pd.DataFrame, ckpt: Path, copies: int
) -> tuple[list[float], list[float], int]:
    """Resume copies of ``ckpt``: seconds to the first request, seconds in all, and the batches
    the last resume created. Every copy sends the same bytes under the same Idempotency-Keys,
    so after the first the server replays rather than creates."""
    firsts, totals, new_batches = [], [], 0
    for n in range(copies):
        copy = ckpt.with_name(f"{ckpt.name}-copy{n}")
        shutil.copytree(ckpt, copy)
        before = httpx.get(url + "/_emulator/accounting").json()["batches_created"]
        transport = FirstRequest()
        started = time.perf_counter()
        out = run_batches(
            df, "acme", "echo", base_url=url, api_key=KEY, checkpoint=copy, transport=transport
        )
        totals.append(time.perf_counter() - started)
        assert transport.first is not None
        assert out["runflow_run_id"].notna().all()
        firsts.append(transport.first - started)
        new_batches = httpx.get(url + "/_emulator/accounting").json()["batches_created"] - before
        shutil.rmtree(copy)
    return firsts, totals, new_batches


def resume_clean(url: str, rows: int, tmp: Path, copies: int) -> list[str]:
    df = job_frame(rows)
    done = rows - rows // 100
    ckpt = tmp / "resume-clean"
    started = time.perf_counter()
    run_batches(df.iloc[:done], "acme", "echo", base_url=url, api_key=KEY, checkpoint=ckpt)
    first_run = time.perf_counter() - started
    size = sum(p.stat().st_size for p in ckpt.iterdir())
    firsts, totals, new_batches = timed_resumes(url, df, ckpt, copies)
    assert new_batches == 0  # the last copy was replayed: the first copy created them
    record("resume_clean_s", statistics.median(firsts), f"{_spread_s(firsts)}", COMMAND)
    return [
        f"resume after a clean stop, {rows:,} rows, {done:,} already submitted (first run "
        f"{first_run:.1f} s, checkpoint {size / 1e6:.0f} MB): first new request after "
        f"{statistics.median(firsts):.2f} s median (min {min(firsts):.2f}, max "
        f"{max(firsts):.2f}, n={len(firsts)}; target <= 1.5 s), whole resume "
        f"{statistics.median(totals):.2f} s",
    ]


def resume_after_kill(url: str, rows: int, tmp: Path, copies: int) -> list[str]:
    ckpt = tmp / "resume-killed"
    out = tmp / "killed.parquet"
    env = {**os.environ, "RUNFLOW_API_KEY": KEY}
    before = httpx.get(url + "/_emulator/accounting").json()["batches_created"]
    job = [
        sys.executable,
        str(REPO / "tests" / "crash_job.py"),
        url,
        str(ckpt),
        str(rows),
        str(out),
        "--concurrency=8",
    ]
    proc = subprocess.Popen(job, stdout=subprocess.PIPE, env=env)
    target = int(rows * 0.9) // 100
    while httpx.get(url + "/_emulator/accounting").json()["batches_created"] - before < target:
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    journal = sum(p.stat().st_size for p in ckpt.glob("journal-*.log"))
    killed_at = httpx.get(url + "/_emulator/accounting").json()["batches_created"] - before
    df = job_frame(rows)
    firsts, totals, _ = timed_resumes(url, df, ckpt, copies - 1)
    # The last resume runs on the checkpoint itself: the emulator must then hold each row once.
    transport = FirstRequest()
    started = time.perf_counter()
    result = run_batches(
        df, "acme", "echo", base_url=url, api_key=KEY, checkpoint=ckpt, transport=transport
    )
    totals.append(time.perf_counter() - started)
    assert transport.first is not None
    firsts.append(transport.first - started)
    seen = httpx.get(url + "/_emulator/accounting").json()
    refs = set(result["runflow_client_ref"])
    # Every copy re-sends the same bytes under the same Idempotency-Keys (the chunk numbers
    # are the checkpoint's), so the server replays them: each row must still have one run.
    duplicates = sum(1 for r, n in seen["runs_by_client_ref"].items() if r in refs and n != 1)
    assert duplicates == 0
    record("resume_killed_s", statistics.median(firsts), f"{_spread_s(firsts)}", COMMAND)
    return [
        f"resume after SIGKILL, {rows:,} rows, killed with {killed_at * 100:,} rows created, "
        f"leaving a journal of {journal / 1e6:.1f} MB: first new request after "
        f"{statistics.median(firsts):.2f} s median (min {min(firsts):.2f}, max {max(firsts):.2f}, "
        f"n={len(firsts)}; target <= 1.5 s), whole resume {statistics.median(totals):.2f} s; "
        f"rows with other than one run on the server after all resumes: {duplicates} (must be 0)",
    ]


def _spread_s(seconds: list[float]) -> str:
    return (
        f"{statistics.median(seconds):.2f} s (median of {len(seconds)}; min {min(seconds):.2f}, "
        f"max {max(seconds):.2f})"
    )


COMMAND = "python " + " ".join(["benchmarks/bench_checkpoint.py", *sys.argv[1:]])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=15, help="runs each way")
    parser.add_argument("--resume-rows", type=int, default=1_000_000)
    parser.add_argument("--copies", type=int, default=3, help="resumes timed per scenario")
    parser.add_argument("--resume-only", action="store_true", help="skip the overhead pairs")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rff-bench-"))
    try:
        lines = [] if args.resume_only else overhead(args.rows, args.runs, tmp)
        with emulator_process() as url:
            lines += resume_clean(url, args.resume_rows, tmp, args.copies)
        with emulator_process() as url:
            lines += resume_after_kill(url, args.resume_rows, tmp, args.copies)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    append_results("Checkpoint overhead and resume start-up", "python " + " ".join(sys.argv), lines)


if __name__ == "__main__":
    main()
