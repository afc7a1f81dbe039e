"""The throttle against every limiter shape, in simulated time (issue 14).

Runs ``runflow_frames.emulator._simulate`` (the throttle's own policy, ``_admission``, driving
the emulator's own limiter shapes, ``_limits``) for a job of 10 s at the allowed rate (30 s for
the 5 s window: six windows) at ``max_concurrency=16``, for each shape x latency x Retry-After
form, five seeds each, and prints the medians: the fraction of the allowed rate overall and in
steady state (the job's second half), the 429s per create and their share of the answers in
steady state. Seconds, not minutes: the bench to tune the throttle on, before the HTTP
benchmark (``bench_ratelimits.py``) confirms it.

Beside each shape, ``best pace``: the steady fraction of the best constant pace known in
advance (swept from 0.90 to 1.04 of the allowed rate, 429s at most 5%): what no throttle can
beat against that shape with the simulated jitter and timers (loopback's, see
``_simulate``). Against strict spacing it is 0.98: a request that reaches the server a
millisecond early is refused, so the pace must leave room.

    python benchmarks/throttle_sim.py
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterator
from typing import Final

from runflow_frames._admission import Admission
from runflow_frames._rate import RateController
from runflow_frames.emulator._simulate import SHAPES, Flaky, Job, Shape, figures, simulate

SEEDS: Final = 5
PACES: Final = [0.90 + 0.01 * step for step in range(15)]


class _Constant(RateController):
    """A pace fixed in advance: answers teach it nothing."""

    def answered(self, now: float, sent_at: float, *, limited: bool) -> None:  # noqa: ARG002
        return None


def best_pace(shape: Shape, latency: float, retry_after: str) -> float:
    """The steady fraction of the best constant pace with at most 5% refused (median of 3)."""
    allowed, best = shape.allowed_at(latency), 0.0
    for fraction in PACES:
        runs = []
        for seed in range(3):
            admission = Admission(16)
            admission.pace = _Constant(fraction * allowed)
            job = Job(round(shape.seconds * allowed), 16, latency, retry_after, seed)
            runs.append(simulate(shape.make(random.Random(seed)), job, admission))
        if statistics.median(r.refused_share() for r in runs) <= 0.05:
            best = max(best, statistics.median(r.steady(allowed) for r in runs))
    return best


def cases() -> Iterator[tuple[str, float, str, dict[str, float]]]:
    """Every shape x latency x Retry-After form: the median of ``SEEDS`` runs of each figure,
    and the best constant pace's."""
    for latency in (0.003, 0.1):
        for shape in SHAPES.values():
            if shape.cap is not None:
                continue  # a cap on requests in flight is not a pace: no constant pace to find
            for retry_after in ("none", "exact", "ceil"):
                got = figures(shape, latency, retry_after, SEEDS)
                got["best"] = best_pace(shape, latency, retry_after)
                yield shape.name, latency, retry_after, got
    cap = SHAPES["cap"]
    for retry_after in ("none", "exact", "ceil"):
        got = figures(cap, 0.1, retry_after, SEEDS)
        got["best"] = float("nan")
        yield cap.name, 0.1, retry_after, got


def main() -> None:
    print(
        f"{'shape':<30} {'latency':>7} {'Retry-After':>11} {'overall':>8} {'steady':>7} "
        f"{'429/create':>10} {'429 share (steady)':>18} {'best pace':>9}"
    )
    worst = {"overall": 9.0, "steady": 9.0, "share": 0.0}
    for name, latency, retry_after, r in cases():
        print(
            f"{name:<30} {latency * 1000:>5.0f}ms {retry_after:>11} {r['overall']:>8.2f} "
            f"{r['steady']:>7.2f} {r['per_create']:>10.2f} {r['share']:>18.3f} {r['best']:>9.2f}"
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
