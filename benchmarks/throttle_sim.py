"""The throttle against every limiter shape, in simulated time (issue 14).

Runs ``runflow_frames.emulator._simulate`` (the throttle's own policy, ``_admission``, driving
the emulator's own limiter shapes, ``_limits``) for a job of 10 s at the allowed rate (30 s for
the 5 s window: six windows) at ``max_concurrency=16``, for each shape x latency x Retry-After
form, five seeds each, and prints the medians: the fraction of the allowed rate overall and in
steady state (the job's second half), the 429s per create and their share of the answers in
steady state. Seconds, not minutes: the bench to tune the throttle on, before the HTTP
benchmark (``bench_ratelimits.py``) confirms it.

    python benchmarks/throttle_sim.py
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from typing import Final

from runflow_frames.emulator._simulate import SHAPES, Flaky, Job, figures, simulate

SEEDS: Final = 5


def cases() -> Iterator[tuple[str, float, str, dict[str, float]]]:
    """Every shape x latency x Retry-After form: the median of ``SEEDS`` runs of each figure."""
    for latency in (0.003, 0.1):
        for shape in SHAPES.values():
            if shape.cap is not None and latency < 0.01:
                continue  # at no latency a cap of 8 does not bind 16 workers' pace
            for retry_after in ("none", "exact", "ceil"):
                yield shape.name, latency, retry_after, figures(shape, latency, retry_after, SEEDS)


def main() -> None:
    print(
        f"{'shape':<30} {'latency':>7} {'Retry-After':>11} {'overall':>8} {'steady':>7} "
        f"{'429/create':>10} {'429 share (steady)':>18}"
    )
    worst = {"overall": 9.0, "steady": 9.0, "share": 0.0}
    for name, latency, retry_after, r in cases():
        print(
            f"{name:<30} {latency * 1000:>5.0f}ms {retry_after:>11} {r['overall']:>8.2f} "
            f"{r['steady']:>7.2f} {r['per_create']:>10.2f} {r['share']:>18.3f}"
        )
        worst = {
            "overall": min(worst["overall"], r["overall"]),
            "steady": min(worst["steady"], r["steady"]),
            "share": max(worst["share"], r["share"]),
        }
    print(
        f"worst case: overall {worst['overall']:.2f} (goal >= 0.85), steady {worst['steady']:.2f} "
        f"(goal >= 0.95), 429 share in steady state {worst['share']:.3f} (goal <= 0.05)"
    )
    flaky = [
        simulate(Flaky(0.05, seed), Job(1600, 16, 0.1, "none", seed)).fraction(160)
        for seed in range(SEEDS)
    ]
    print(
        "stray 429s (5% at random), nothing else limiting, 100 ms: "
        f"{statistics.median(flaky):.2f} of the 16 workers' pace"
    )


if __name__ == "__main__":
    main()
