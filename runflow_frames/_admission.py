"""Admission of every try of every request: how many at once, how fast, and when to hold off.

Pure: no method reads a clock or sleeps; each takes ``now``. ``_pipeline.Throttle`` is the
async shell around it (one per job, or one per cluster on the Dask scheduler), and
``benchmarks/throttle_sim.py`` drives it against simulated servers.

Three limits, the tightest wins:

- **Pace** (``_rate.RateController``): learned from 429s, nothing paced until the first.
- **A concurrency cap learned from 429s.** Each try is counted with the number of requests in
  flight when it left. When, over the last ``LEVELS`` answers, the tries that left with up to
  some level were admitted and nearly all those above it refused, that is a cap on requests in
  flight (a rate limit refuses at any level): the cap becomes that level, and such 429s do
  not slow the pace. Only once paced, and only when the refused tries were not sent faster than
  anything got through (then a rate explains them as well): the first burst of a job tells a
  rate from a cap by nothing. The first time a cap is learned, the pace is forgotten: the 429s it
  was learned from were the cap's. After ``CAP_PROBE`` seconds without a refusal above it, the cap
  rises by one; a refusal of that probe puts it back.
- **Overload** (503): the concurrency limit halves, at most once per episode, and grows back
  by one per ``limit`` successes (AIMD, as TCP does), within ``max_concurrency``; every request
  holds off for the wait the 503 called for. A 503 says nothing of a rate.

A 429 holds off nobody but the request that got it (its own ``Retry-After``), unless its
``Retry-After`` is precise (to a fraction of a second) and ``HOLD_AFTER`` or longer: then it says
when a closed window opens again, and nobody goes sooner.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Final, Literal, TypedDict, TypeGuard

from ._rate import RateController

Outcome = Literal["ok", "rate_limited", "overloaded", "failed"]


class Pace(TypedDict, total=False):
    """What a job learned of the server's limits, to start its next run from."""

    rate: float | None
    cap: int | None


CAP_PROBE: Final = 5.0
# A precise Retry-After at least this long holds everyone: a closed window, not the next slot
# (shorter waits are the pace's to keep).
HOLD_AFTER: Final = 1.0
CAP_EVIDENCE: Final = 3  # refusals above the most ever admitted at once, before a cap is believed
LEVELS: Final = 100  # answers behind that judgement
CAP_NOISE: Final = 0.2  # refusals under a cap, admissions over it, that the judgement forgives


@dataclass(frozen=True, slots=True)
class Ticket:
    """One admitted try: when it left, and how many were in flight with it (itself included)."""

    sent_at: float
    in_flight: int


class Admission:
    """The admission state of one job (see the module docstring)."""

    def __init__(
        self, max_concurrency: int, *, rate: float | None = None, cap: int | None = None
    ) -> None:
        self.max = max_concurrency
        self.limit = float(max_concurrency)
        self.pace = RateController(rate)
        self.in_flight = 0
        self.paused_until = -math.inf
        self.strikes = 0  # overload episodes since the last success
        self._levels: deque[tuple[Ticket, bool]] = deque(maxlen=LEVELS)  # (try, admitted)
        # A cap learned (``cap``, one more while probing; ``_capped``, the one confirmed) and
        # when a request over it was last refused, or the last probe began.
        self.cap = self._capped = cap if cap is not None and cap < max_concurrency else None
        self._capped_at = -math.inf

    def learned(self) -> Pace:
        """The pace and cap learned, for ``Admission(max_concurrency, **learned)``."""
        return {"rate": self.pace.rate, "cap": self._capped}

    def allowed(self) -> int:
        """Requests that may be in flight at once now."""
        return max(1, min(int(self.limit), self.cap or self.max))

    def wait(self, now: float) -> float | None:
        """Seconds until a try may leave (0: now), or None: when one in flight is answered."""
        hold = max(self.paused_until - now, self.pace.delay(now))
        if hold > 0:
            return hold
        return 0.0 if self.in_flight < self.allowed() else None

    def take(self, now: float) -> Ticket:
        """A try leaves now (after ``wait`` said 0)."""
        self.in_flight += 1
        self.pace.sent(now)
        return Ticket(now, self.in_flight)

    def settle(
        self, ticket: Ticket, outcome: Outcome, now: float, wait: float | None = None
    ) -> None:
        """How the try went; ``wait`` is what everyone waits for: a 503's pause, a 429's
        precise ``Retry-After``."""
        self.in_flight -= 1
        if outcome == "ok":
            self.limit = min(float(self.max), self.limit + 1 / self.limit)
            self.strikes = 0
            self._levels.append((ticket, True))
            self.pace.answered(now, ticket.sent_at, limited=False)
            self._probe_cap(now)
        elif outcome == "rate_limited":
            self._levels.append((ticket, False))
            if _precise(wait):  # the server says when it admits again: nobody goes sooner
                self.paused_until = max(self.paused_until, now + wait)
            if self._over_cap(ticket):
                if self.cap is None and self._capped_at == -math.inf:  # the first sign of a cap
                    self.pace = RateController()  # the 429s that set the pace were the cap's
                self.cap = self._capped
                self._capped_at = now
            else:
                self.pace.answered(now, ticket.sent_at, limited=True)
        elif outcome == "overloaded":
            if now >= self.paused_until:  # the first 503 of an episode cuts; the rest echo it
                self.limit = max(1.0, self.limit / 2)
                self.strikes += 1
            if wait is not None:
                self.paused_until = max(self.paused_until, now + wait)

    def _over_cap(self, ticket: Ticket) -> bool:
        """Whether a 429 looks like a cap on requests in flight (see the module docstring)."""
        if self._capped is not None and ticket.in_flight > self._capped:
            return True  # a probe above the cap, refused
        paced_since = self.pace.paced_since
        if paced_since is None or ticket.sent_at < paced_since:
            return False
        if self.pace.offered(ticket.sent_at) > 1.5 * self.pace.through(ticket.sent_at, 1.0):
            return False  # sent faster than anything got through: a rate explains it as well
        paced = [(t.in_flight, ok) for t, ok in self._levels if t.sent_at >= paced_since]
        cap = _cap_in(paced, below=ticket.in_flight)
        if cap is None:
            return False
        self._capped = cap
        return True

    def _probe_cap(self, now: float) -> None:
        """Quiet for ``CAP_PROBE`` seconds: the probe one above the cap held (it becomes the
        cap), and the next probe starts."""
        if self._capped is None or self.cap is None or now - self._capped_at <= CAP_PROBE:
            return
        self._capped = self.cap
        self.cap = None if self.cap >= self.max else self.cap + 1
        self._capped_at = now


def _cap_in(answers: list[tuple[int, bool]], below: int) -> int | None:
    """The lowest level under ``below`` with few refusals at or under it and mostly refusals
    above it, seen enough: a cap on requests in flight (the client counts a few more in flight
    than the server does, those on their way, so the line is not sharp)."""
    for level in range(1, below):
        under = [ok for n, ok in answers if n <= level]
        over = [ok for n, ok in answers if n > level]
        refused_over = over.count(False)
        if (
            len(under) >= 3 * CAP_EVIDENCE
            and under.count(False) <= CAP_NOISE * len(under)
            and refused_over >= CAP_EVIDENCE
            and refused_over >= (1 - CAP_NOISE) * len(over)
        ):
            return level
    return None


def _precise(wait: float | None) -> TypeGuard[float]:
    """A 429's wait for everyone: the throttle is given one only for a precise ``Retry-After``
    (``_pipeline.hold_of``); one in whole seconds (rounded up, or an HTTP date) says little
    more than "later", and holds back only the request that got it."""
    return wait is not None and wait >= HOLD_AFTER
