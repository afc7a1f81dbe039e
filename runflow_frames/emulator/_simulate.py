"""A submit job against a limiter shape in simulated time: hundreds of seconds in milliseconds.

The throttle's policy (``runflow_frames._admission.Admission``) is pure, and so are the limiter
shapes (``_limits``): this discrete-event simulation drives one with the other, the way the
pipeline and the emulator do over HTTP. ``concurrency`` workers each send a create when the
admission allows (a timer that holds a send fires up to ``LATE`` late, as an event loop's
does); it reaches the server half a round trip later, give or take (the spacing the client kept
is not quite the spacing the server sees), where the limiter admits it (answered ``latency``
later, varying by about 20% as a server's does) or refuses it at once, with a ``Retry-After``
that is absent, exact, or rounded up to whole seconds; a refused create waits its
``Retry-After``, if any, then goes back in line (what ``_retry.retrying`` does).

The round trip, its jitter and the timers' lateness are loopback's, measured: a constant pace
of 0.95 / 0.97 / 0.99 of a strict-spacing limit (token bucket, burst 1) gets 0.934 / 0.957 /
0.977 of it through over HTTP against the emulator with no 429, and 0.936 / 0.955 / 0.975
here. Farther servers jitter more: ``Job(jitter=...)``.

Used by ``tests/test_rate.py`` (the throttle reaches each shape's limit) and by
``benchmarks/throttle_sim.py`` (the table of every shape).
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from .._admission import Admission, Ticket
from ._limits import ConcurrencyCap, FixedWindow, Limiter, SlidingWindow, TokenBucket

ROUND_TRIP: Final = 0.001
JITTER: Final = 0.3
LATE: Final = 0.002


class Flaky:
    """A server that refuses a share of requests at random, whatever the rate (no limit)."""

    def __init__(self, share: float, seed: int = 1) -> None:
        self.share, self.rng = share, random.Random(seed)  # noqa: S311 - a simulation

    def admit(self, now: float) -> float | None:  # noqa: ARG002 - time does not matter here
        return 0.0 if self.rng.random() < self.share else None

    def done(self, now: float) -> None:  # noqa: ARG002 - nothing is held
        return None


@dataclass(frozen=True)
class Job:
    """What is simulated: ``creates`` requests by ``concurrency`` workers."""

    creates: int = 200
    concurrency: int = 16
    latency: float = 0.1  # seconds to answer an admitted create
    retry_after: str = "none"  # "none", "exact" or "ceil" (whole seconds, rounded up)
    seed: int = 0
    jitter: float = JITTER  # the spread of the time to reach the server (lognormal sigma)
    late: float = LATE  # a timer fires up to this many seconds late


@dataclass
class Outcome:
    """Every answer ``(time, admitted)`` and the job's length."""

    answers: list[tuple[float, bool]] = field(default_factory=list)
    duration: float = 0.0

    def fraction(self, allowed: float) -> float:
        """Creates per second over the whole job, as a fraction of ``allowed``."""
        return self.creates() / allowed / self.duration

    def steady(self, allowed: float) -> float:
        """The same over the job's second half."""
        half = self.duration / 2
        late = sum(ok for at, ok in self.answers if at >= half)
        return late / allowed / (self.duration - half)

    def refused_share(self) -> float:
        """The share of answers that were 429s, over the job's second half."""
        half = self.duration / 2
        late = [ok for at, ok in self.answers if at >= half]
        return late.count(False) / max(1, len(late))

    def creates(self) -> int:
        return sum(ok for _, ok in self.answers)


def simulate(limiter: Limiter, job: Job, admission: Admission | None = None) -> Outcome:
    """Run ``job`` against ``limiter`` through ``admission`` (a fresh one by default)."""
    return _Run(limiter, job, admission or Admission(job.concurrency)).run()


class _Run:
    def __init__(self, limiter: Limiter, job: Job, admission: Admission) -> None:
        self.limiter, self.job, self.admission = limiter, job, admission
        self.rng = random.Random(job.seed)  # noqa: S311 - a simulation
        self.events: list[tuple[float, int, str, int, Ticket | None]] = []
        self.count = 0
        self.waits: list[float] = [0.0] * job.concurrency  # each worker's Retry-After
        self.parked: list[int] = []  # workers waiting for an answer to free a place
        self.outcome = Outcome()
        self.lateness: dict[float, float] = {}

    def run(self) -> Outcome:
        remaining = self.job.creates
        for worker in range(min(self.job.concurrency, remaining)):
            remaining -= 1
            self.push(0.0, "ready", worker)
        now = 0.0
        while self.events:
            now, _, kind, worker, ticket = heapq.heappop(self.events)
            if kind == "ready":
                self.ready(now, worker)
                continue
            assert ticket is not None
            if kind == "arrive":
                self.arrive(now, worker, ticket)
                continue
            admitted = self.answer(now, kind, ticket, worker)
            if not admitted:
                self.push(now + self.waits[worker], "ready", worker)
            elif remaining:
                remaining -= 1
                self.push(now, "ready", worker)
        self.outcome.duration = now
        return self.outcome

    def push(self, at: float, kind: str, worker: int, ticket: Ticket | None = None) -> None:
        self.count += 1
        heapq.heappush(self.events, (at, self.count, kind, worker, ticket))

    def ready(self, now: float, worker: int) -> None:
        hold = self.admission.wait(now)
        if hold is None:
            self.parked.append(worker)
        elif hold > 0:
            self.push(self.woken(now + hold), "ready", worker)
        else:  # it reaches the server half a round trip later, give or take
            ticket = self.admission.take(now)
            self.push(now + self.after(ROUND_TRIP / 2, self.job.jitter), "arrive", worker, ticket)

    def arrive(self, now: float, worker: int, ticket: Ticket) -> None:
        refused = self.limiter.admit(now)
        if refused is None:
            self.push(now + self.after(self.job.latency), "ok", worker, ticket)
        else:  # a limiter does no work: the 429 is back after the other half
            self.waits[worker] = self.retry_after(refused)
            self.push(now + self.after(ROUND_TRIP / 2, self.job.jitter), "429", worker, ticket)

    def answer(self, now: float, kind: str, ticket: Ticket, worker: int) -> bool:
        admitted = kind == "ok"
        if admitted:
            self.limiter.done(now)
        precise = self.job.retry_after == "exact"  # what _pipeline.hold_of passes on
        wait = self.waits[worker] if precise and not admitted else None
        self.admission.settle(ticket, "ok" if admitted else "rate_limited", now, wait)
        self.outcome.answers.append((now, admitted))
        while self.parked:
            self.push(now, "ready", self.parked.pop())
        return admitted

    def woken(self, at: float) -> float:
        """When a timer set for ``at`` fires: late by up to ``job.late``, the same for every
        timer set for that moment (an event loop wakes once for all of them)."""
        key = round(at, 6)
        if key not in self.lateness:
            self.lateness[key] = self.rng.uniform(0, self.job.late)
        return at + self.lateness[key]

    def after(self, median: float, sigma: float = 0.2) -> float:
        return median * self.rng.lognormvariate(0.0, sigma)

    def retry_after(self, wait: float) -> float:
        if self.job.retry_after == "exact":
            return wait
        if self.job.retry_after == "ceil":
            return max(1.0, math.ceil(wait))
        return 0.0


@dataclass(frozen=True)
class Shape:
    """A limiter shape to simulate: how to make it, the rate it allows (creates per second;
    for a cap on requests in flight, ``cap / latency``) and how long a job runs at that rate:
    10 s (20,000 rows at 20 creates/s), or six windows where the window is longer (one or two
    windows measure where their boundaries fall, not the throttle)."""

    name: str
    make: Callable[[random.Random], Limiter]
    allowed: float
    seconds: float = 10.0
    cap: int | None = None

    def allowed_at(self, latency: float) -> float:
        return self.cap / latency if self.cap is not None else self.allowed


SHAPES: Final = {
    "strict": Shape("token bucket 20/s, burst 1", lambda _: TokenBucket(20, 1), 20.0),
    "bucket": Shape("token bucket 20/s, burst 20", lambda _: TokenBucket(20, 20), 20.0),
    "fixed": Shape(
        "fixed window 20 per 1 s", lambda rng: FixedWindow(20, 1.0, start=rng.uniform(0, 1)), 20.0
    ),
    "sliding": Shape("sliding window 20 per 1 s", lambda _: SlidingWindow(20, 1.0), 20.0),
    "window-5s": Shape(
        "fixed window 100 per 5 s",
        lambda rng: FixedWindow(100, 5.0, start=rng.uniform(0, 5)),
        20.0,
        seconds=30.0,
    ),
    "cap": Shape("concurrency cap 8", lambda _: ConcurrencyCap(8), 0.0, cap=8),
}


def figures(shape: Shape, latency: float, retry_after: str, seeds: int) -> dict[str, float]:
    """The medians over ``seeds`` jobs of 16 workers: the fraction of the allowed rate overall
    and in steady state, the share of 429s in steady state and the 429s per create."""
    allowed = shape.allowed_at(latency)
    runs = []
    for seed in range(seeds):
        job = Job(round(shape.seconds * allowed), 16, latency, retry_after, seed)
        runs.append(simulate(shape.make(random.Random(seed)), job))  # noqa: S311
    return {
        "overall": statistics.median(r.fraction(allowed) for r in runs),
        "steady": statistics.median(r.steady(allowed) for r in runs),
        "share": statistics.median(r.refused_share() for r in runs),
        "per_create": statistics.median(
            sum(not ok for _, ok in r.answers) / r.creates() for r in runs
        ),
    }
