"""The throttle against every limiter shape, over HTTP: how close a job gets to the allowed rate.

The emulator (its own process) enforces one shape on creates: a token bucket of 20/s with no
burst (strict spacing) or a one-second burst, a fixed or a sliding window of 20 per second, a
fixed window of 100 per 5 s, or a cap of 8 requests in flight; it answers 429 beyond, with a
``Retry-After`` that is absent, exact, or rounded up to whole seconds. A 20,000-row job (200
creates; 60,000 rows for the 5 s window, six windows) runs at ``max_concurrency=16``, with a
service time of 0 or 100 ms, in one process or on a 2-worker Dask LocalCluster (one throttle
on the scheduler).

From the server's own timeline (every create and every 429, ``/_emulator/accounting``):

- overall: creates per second over the job, as a fraction of the allowed rate;
- steady: the same over the job's second half (goal: >= 0.95 in one process, >= 0.90 on the
  cluster);
- 429 share: 429s among the create requests of the second half (goal: <= 0.05);
- to 90%: seconds until the creates of a 2-second window first reach 90% of the allowed;
- silence: the longest time no create request reached the server.

Medians of ``--runs`` runs. Appends to RESULTS.md and draws ``ratelimits.png``.

    python benchmarks/bench_ratelimits.py [--runs 3] [--only strict] [--no-cluster] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import numpy as np
import pandas as pd
from _common import append_results, emulator_process
from _figures import record

from runflow_frames import run_batches

KEY = "bench"
HERE = Path(__file__).parent


@dataclass(frozen=True)
class Shape:
    name: str
    faults: str
    allowed: float  # creates per second (at 100 ms for the cap)
    rows: int = 20_000
    cap: bool = False


SHAPES: Final = [
    Shape("token bucket 20/s, burst 1", "rate_limit=20,burst=1", 20.0),
    Shape("token bucket 20/s, burst 20", "rate_limit=20,burst=20", 20.0),
    Shape("fixed window 20 per 1 s", "window_limit=20,window=1", 20.0),
    Shape("sliding window 20 per 1 s", "window_limit=20,window=1,window_kind=sliding", 20.0),
    Shape("fixed window 100 per 5 s", "window_limit=100,window=5", 20.0, rows=60_000),
    Shape("concurrency cap 8", "concurrency_limit=8", 80.0, rows=80_000, cap=True),
]
FORMS: Final = ("none", "exact", "ceil")


def figures(timeline: list[tuple[float, bool]], allowed: float) -> dict[str, float]:
    """Overall, steady, 429 share, seconds to 90% and the longest silence, from the server's
    timeline of (time, created)."""
    times = np.array([t for t, _ in timeline])
    created = np.array([ok for _, ok in timeline], dtype=bool)
    start, end = times.min(), times.max()
    duration = max(end - start, 1e-9)
    half = start + duration / 2
    late = times >= half
    steady = created[late].sum() / allowed / (end - half)
    share = (~created[late]).sum() / max(1, late.sum())
    made = np.sort(times[created])
    counts = np.searchsorted(made, made + 2.0) - np.arange(len(made))
    reached = np.nonzero(counts >= 0.9 * allowed * 2.0)[0]
    to_90 = float(made[reached[0]] - start) if len(reached) else float("nan")
    return {
        "overall": created.sum() / allowed / duration,
        "steady": float(steady),
        "share": float(share),
        "per_create": float((~created).sum() / max(1, created.sum())),
        "to_90": to_90,
        "silence": float(np.diff(np.sort(times)).max(initial=0.0)),
    }


def frame(rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"prompt": [f"item {i}" for i in range(rows)]},
        index=pd.Index([f"row-{i:07d}" for i in range(rows)]),
    )


def one_run(shape: Shape, form: str, latency: float, cluster: Any) -> dict[str, float]:
    faults = f"{shape.faults},limit_retry_after={form},routes=create"
    df = frame(shape.rows)
    with emulator_process("--faults", faults, "--latency", str(latency)) as url:
        if cluster is None:
            out = run_batches(
                df, "acme/echo", base_url=url, api_key=KEY, max_concurrency=16, progress=False
            )
        else:
            import dask.dataframe as dd

            from runflow_frames import dask as rfd

            with tempfile.TemporaryDirectory() as root:
                ddf = dd.from_pandas(df, npartitions=4)
                out = rfd.run_batches(
                    ddf, "acme/echo", checkpoint=root, max_concurrency=16, api_key=KEY, base_url=url
                ).compute()
        seen = httpx.get(url + "/_emulator/accounting", timeout=30).json()
    assert out["runflow_run_id"].notna().all()
    assert all(n == 1 for n in seen["runs_by_client_ref"].values()), "a duplicate run"
    allowed = 8 / latency if shape.cap else shape.allowed
    return figures([(t, ok) for t, ok in seen["timeline"]], allowed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="", help="shapes whose name contains this")
    parser.add_argument("--no-cluster", action="store_true")
    parser.add_argument("--quick", action="store_true", help="one run, no RESULTS.md")
    args = parser.parse_args()
    runs = 1 if args.quick else args.runs
    rows: list[tuple[str, str, float, str, dict[str, float]]] = []
    modes: list[str] = ["one process"] if args.no_cluster else ["one process", "2-worker cluster"]
    for mode in modes:
        cluster = _cluster() if mode != "one process" else None
        try:
            for shape in SHAPES:
                if args.only not in shape.name:
                    continue
                for latency in (0.0, 0.1):
                    if shape.cap and latency == 0.0:
                        continue  # at no service time a cap of 8 binds nothing
                    for form in FORMS if mode == "one process" else ("none",):
                        got = [one_run(shape, form, latency, cluster) for _ in range(runs)]
                        median = {k: statistics.median(g[k] for g in got) for k in got[0]}
                        rows.append((shape.name, form, latency, mode, median))
                        print(_line(rows[-1]), flush=True)
        finally:
            if cluster is not None:
                cluster.close()
    lines = [_line(r) for r in rows]
    lines.append(_verdict(rows))
    if args.quick:
        print("\n".join(lines))
        return
    _chart(rows, HERE / "ratelimits.png")
    if not args.only:
        _record(rows, runs, "python " + " ".join(["benchmarks/bench_ratelimits.py", *sys.argv[1:]]))
    append_results(
        "Rate limits: the throttle against every limiter shape (issue 14)",
        "python benchmarks/bench_ratelimits.py",
        lines,
    )


def _cluster() -> Any:
    import distributed

    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True)
    client = distributed.Client(cluster)
    client.cluster_handle = cluster
    return client


def _line(row: tuple[str, str, float, str, dict[str, float]]) -> str:
    name, form, latency, mode, f = row
    return (
        f"{name}, Retry-After {form}, {latency * 1000:.0f} ms, {mode}: overall {f['overall']:.2f}, "
        f"steady {f['steady']:.2f}, 429 share (steady) {f['share']:.3f}, 429s per create "
        f"{f['per_create']:.2f}, to 90% {f['to_90']:.1f} s, longest silence {f['silence']:.2f} s"
    )


def _verdict(rows: list[tuple[str, str, float, str, dict[str, float]]]) -> str:
    single = [f for *_, mode, f in rows if mode == "one process"]
    cluster = [f for *_, mode, f in rows if mode != "one process"]
    text = (
        f"one process, worst case: overall {min(f['overall'] for f in single):.2f} (goal 0.85), "
        f"steady {min(f['steady'] for f in single):.2f} (goal 0.95), 429 share "
        f"{max(f['share'] for f in single):.3f} (goal 0.05); cases meeting all three: "
        f"{sum(_meets(f) for f in single)} of {len(single)}"
    )
    if cluster:
        text += (
            f"; 2-worker cluster, worst steady {min(f['steady'] for f in cluster):.2f} (goal 0.90)"
        )
    return text


def _record(
    rows: list[tuple[str, str, float, str, dict[str, float]]], runs: int, command: str
) -> None:
    single = [f for *_, mode, f in rows if mode == "one process"]
    cluster = [f for *_, mode, f in rows if mode != "one process"]
    met = sum(_meets(f) for f in single)
    record(
        "throttle_cases",
        met / len(single),
        f"{met} of {len(single)} cases; worst steady {min(f['steady'] for f in single):.2f}, "
        f"overall {min(f['overall'] for f in single):.2f}, 429 share "
        f"{max(f['share'] for f in single):.3f} (median of {runs} each)",
        command,
    )
    if cluster:
        worst = min(f["steady"] for f in cluster)
        record("throttle_cluster_steady", worst, f"{worst:.2f} (median of {runs} each)", command)


def _meets(f: dict[str, float]) -> bool:
    return f["overall"] >= 0.85 and f["steady"] >= 0.95 and f["share"] <= 0.05


def _chart(rows: list[tuple[str, str, float, str, dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{n}\nRA {form}, {lat * 1000:.0f} ms, {mode}" for n, form, lat, mode, _ in rows]
    steady = [f["steady"] for *_, f in rows]
    share = [f["share"] for *_, f in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.32 * len(rows) + 1.5), sharey=True)
    y = np.arange(len(rows))
    left.barh(y, steady, color=["tab:green" if s >= 0.95 else "tab:orange" for s in steady])
    left.axvline(0.95, color="black", linestyle="--", linewidth=1)
    left.set_xlabel("steady state: fraction of the allowed rate (goal >= 0.95)")
    left.set_yticks(y, labels, fontsize=6)
    left.invert_yaxis()
    right.barh(y, share, color=["tab:green" if s <= 0.05 else "tab:orange" for s in share])
    right.axvline(0.05, color="black", linestyle="--", linewidth=1)
    right.set_xlabel("steady state: share of creates refused with 429 (goal <= 0.05)")
    fig.suptitle(f"runflow-frames throttle vs limiter shapes, {time.strftime('%Y-%m-%d')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
