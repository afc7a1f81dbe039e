"""Rate-limit shapes a server may enforce, on an injected clock.

Real APIs limit in different shapes, and a client that only ever met one of them learns to
depend on it. Each shape here is pure: no method reads a clock, every one takes ``now``
(seconds, any origin), so the same classes serve the emulator (``time.monotonic()``) and
simulated-time tests that run hundreds of seconds in milliseconds. None is thread-safe: the
caller holds a lock around them.

- ``TokenBucket(rate, burst)``: ``burst`` requests at once, then ``rate`` a second; ``burst=1``
  is strict spacing (GCRA).
- ``FixedWindow(limit, window)``: ``limit`` per window; counts reset on window boundaries.
- ``SlidingWindow(limit, window)``: at most ``limit`` admissions in any ``window`` seconds.
- ``ConcurrencyCap(limit)``: at most ``limit`` requests in flight.
- ``AllOf(*limiters)``: every one of them at once.

``admit(now)`` returns ``None`` when the request is admitted, else the seconds until a retry
would be admitted (exact: a retry at ``now + wait`` is admitted if nothing else took the room
meanwhile; ``0.0`` where the wait is unknown, as for a concurrency cap). ``done(now)`` says an
admitted request finished. ``retry_after_header`` renders a wait the ways servers send it.
"""

from __future__ import annotations

import email.utils
import math
from collections import deque
from typing import Final, Protocol

# Tolerance of the comparisons with ``now``: a retry at ``now + wait`` must land in the admitting
# side although ``now + wait - now`` is not exactly ``wait`` in floating point. A microsecond is
# far below any limit's grain and far above the rounding of a monotonic clock's seconds.
_EPS: Final = 1e-6

RETRY_AFTER_MODES: Final = ("none", "exact", "ceil", "date")


class Limiter(Protocol):
    """Admission to a server, as a rate-limit shape decides it."""

    def admit(self, now: float) -> float | None:
        """``None``: admitted (and counted in flight where that matters); else the seconds until
        a retry would be admitted (``>= 0``; ``0.0`` when unknown)."""

    def done(self, now: float) -> None:
        """An admitted request finished."""


class Shape:
    """A limiter in two steps, so that ``AllOf`` can check every limiter before committing any:
    ``wait(now)`` asks without taking, ``take(now)`` takes (after a ``None`` wait)."""

    def wait(self, now: float) -> float | None:  # pragma: no cover - every shape overrides it
        raise NotImplementedError

    def take(self, now: float) -> None:  # pragma: no cover - every shape overrides it
        raise NotImplementedError

    def admit(self, now: float) -> float | None:
        wait = self.wait(now)
        if wait is None:
            self.take(now)
        return wait

    def done(self, now: float) -> None:
        """Only a concurrency cap minds a request finishing."""


def _positive(name: str, value: float) -> None:
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a positive number, not {value!r}")


class TokenBucket(Shape):
    """``burst`` tokens, refilled at ``rate`` a second, one per request; starts full.

    Kept as GCRA does: ``tat``, the theoretical arrival time of the next request at the steady
    rate. A request is admitted when ``tat`` is at most ``(burst - 1) / rate`` ahead of ``now``:
    the same admissions as a token bucket, without a refill to compute. ``burst=1`` admits one
    request every ``1 / rate`` seconds and no burst.
    """

    def __init__(self, rate: float, burst: float = 1.0) -> None:
        _positive("rate", rate)
        if not 1 <= burst < math.inf:
            raise ValueError(f"burst must be at least 1 (one request), not {burst!r}")
        self.rate = rate
        self.burst = burst
        self._interval = 1.0 / rate
        self._tolerance = (burst - 1.0) / rate
        self._tat = -math.inf

    def wait(self, now: float) -> float | None:
        ahead = max(self._tat, now) - now
        if ahead <= self._tolerance + _EPS:
            return None
        return ahead - self._tolerance

    def take(self, now: float) -> None:
        self._tat = max(self._tat, now) + self._interval

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self.rate!r}, burst={self.burst!r})"


class FixedWindow(Shape):
    """``limit`` requests per window; windows start at multiples of ``window`` from ``start``
    (the first ``now`` the limiter sees, by default), and each starts with a fresh count."""

    def __init__(self, limit: int, window: float = 1.0, *, start: float | None = None) -> None:
        _positive("limit", limit)
        _positive("window", window)
        self.limit = limit
        self.window = window
        self._start = start
        self._index: int | None = None
        self._count = 0

    def _current(self, now: float) -> tuple[int, float]:
        """The index of the window ``now`` falls in, and when that window ends."""
        if self._start is None:
            self._start = now
        index = math.floor((now - self._start) / self.window)
        end = self._start + (index + 1) * self.window
        if end - now <= _EPS:  # on a boundary (give or take rounding): the next window
            index += 1
            end += self.window
        return index, end

    def wait(self, now: float) -> float | None:
        index, end = self._current(now)
        if index != self._index or self._count < self.limit:
            return None
        return end - now

    def take(self, now: float) -> None:
        index, _ = self._current(now)
        if index != self._index:
            self._index, self._count = index, 0
        self._count += 1

    def __repr__(self) -> str:
        return f"FixedWindow(limit={self.limit!r}, window={self.window!r})"


class SlidingWindow(Shape):
    """At most ``limit`` admissions in any ``window`` seconds: a log of admission times, where
    an admission at ``t`` stops counting at ``t + window``."""

    def __init__(self, limit: int, window: float = 1.0) -> None:
        _positive("limit", limit)
        _positive("window", window)
        self.limit = limit
        self.window = window
        self._log: deque[float] = deque()

    def _forget(self, now: float) -> None:
        while self._log and self._log[0] + self.window <= now + _EPS:
            self._log.popleft()

    def wait(self, now: float) -> float | None:
        self._forget(now)
        if len(self._log) < self.limit:
            return None
        return max(0.0, self._log[0] + self.window - now)

    def take(self, now: float) -> None:
        self._forget(now)
        self._log.append(now)

    def __repr__(self) -> str:
        return f"SlidingWindow(limit={self.limit!r}, window={self.window!r})"


class ConcurrencyCap(Shape):
    """At most ``limit`` admitted requests not yet ``done``. Full, it cannot know when one will
    finish: its wait is ``0.0`` (unknown)."""

    def __init__(self, limit: int) -> None:
        _positive("limit", limit)
        self.limit = limit
        self.in_flight = 0

    def wait(self, now: float) -> float | None:  # noqa: ARG002 - time does not matter here
        return None if self.in_flight < self.limit else 0.0

    def take(self, now: float) -> None:  # noqa: ARG002 - time does not matter here
        self.in_flight += 1

    def done(self, now: float) -> None:  # noqa: ARG002 - time does not matter here
        self.in_flight = max(0, self.in_flight - 1)

    def __repr__(self) -> str:
        return f"ConcurrencyCap(limit={self.limit!r})"


class AllOf(Shape):
    """Admitted only if every limiter admits; a refusal by one consumes nothing of the others.
    The wait is the longest of the refusing limiters' waits."""

    def __init__(self, *limiters: Shape) -> None:
        for limiter in limiters:
            if not isinstance(limiter, Shape):
                raise TypeError(f"AllOf combines this module's limiters, not {limiter!r}")
        self.limiters = limiters

    def wait(self, now: float) -> float | None:
        waits = [w for w in (limiter.wait(now) for limiter in self.limiters) if w is not None]
        return max(waits) if waits else None

    def take(self, now: float) -> None:
        for limiter in self.limiters:
            limiter.take(now)

    def done(self, now: float) -> None:
        for limiter in self.limiters:
            limiter.done(now)

    def __repr__(self) -> str:
        return f"AllOf({', '.join(map(repr, self.limiters))})"


def retry_after_header(wait: float, mode: str, wall_now: float) -> str | None:
    """``Retry-After`` for a wait of ``wait`` seconds, as a server of kind ``mode`` sends it.

    ``"none"``: no header. ``"exact"``: seconds, rounded up to the millisecond (``"0.25"``).
    ``"ceil"``: whole seconds rounded up, at least 1. ``"date"``: the HTTP date of
    ``wall_now + wait`` (seconds since the epoch), rounded up to the next whole second.

    >>> retry_after_header(0.25, "exact", 0.0), retry_after_header(0.25, "ceil", 0.0)
    ('0.25', '1')
    >>> retry_after_header(1.5, "date", 0.0)
    'Thu, 01 Jan 1970 00:00:02 GMT'
    """
    wait = max(0.0, wait)
    if mode == "none":
        return None
    if mode == "exact":
        # The slack keeps float noise (0.1 * 1000 = 100.00000000000001) from adding a millisecond.
        millis = math.ceil(wait * 1000 - 1e-6)
        return f"{millis / 1000:.3f}".rstrip("0").rstrip(".")
    if mode == "ceil":
        return str(max(1, math.ceil(wait - 1e-9)))
    if mode == "date":
        return email.utils.formatdate(math.ceil(wall_now + wait), usegmt=True)
    raise ValueError(
        f"Retry-After mode must be one of {', '.join(RETRY_AFTER_MODES)}, not {mode!r}"
    )
