"""Retry decisions (pure) and the retry loop (on an injected clock, sleep and random generator).

What is retried: connection errors and timeouts, 429, a 409 saying the key's first request is
still in progress (``RequestInProgressError``), 5xx, and a 2xx whose body cannot be read. What
never is: 400, 401, 402, 403, 404, any other 409, 422 and any other 4xx, and a response whose
handles do not match the rows sent. A create POST is safe to retry only because every try sends the same
bytes with the same ``Idempotency-Key``: if the first try was processed and its answer lost, the
server replays that batch instead of creating another.

The wait before a retry is the server's ``Retry-After`` (seconds or an HTTP date) or a
``retry_after`` field of the error body when present, capped at ``retry_after_max``; otherwise
exponential backoff with full jitter: uniform in ``[0, min(wait_max, wait_initial * 2**n)]``,
except after a 429: without ``Retry-After`` it is retried as soon as the throttle's pace allows
(the throttle learns the pace from the 429s; see ``_admission``). A request gives up after
``attempts`` tries that failed for another reason than a 429 or an in-progress 409 (the server
took nothing new: they only say "later"), or once ``timeout`` seconds have passed.
"""

from __future__ import annotations

import email.utils
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

from ._admission import Pace
from ._errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    InputError,
    ProtocolError,
    RateLimitError,
    RequestInProgressError,
    ServerError,
)

T = TypeVar("T")

DEFAULT_ATTEMPTS: Final = 10


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one request tries.

    Parameters
    ----------
    attempts : int, default 10
        Tries per request, the first included. A try refused with a 429 does not count: the
        server took nothing, and the throttle paces the next one (``timeout`` still bounds it).
    timeout : float, default 600
        Seconds one request may take in all, waits included, before it gives up.
    wait_initial : float, default 0.5
        Upper bound of the first backoff (seconds); it doubles with each retry.
    wait_max : float, default 30
        Upper bound of any backoff.
    retry_after_max : float, default 120
        Cap on a server-requested wait (``Retry-After``).

    Examples
    --------
    >>> from runflow_frames import RetryPolicy
    >>> patient = RetryPolicy(attempts=20, timeout=3600)
    """

    attempts: int = DEFAULT_ATTEMPTS
    timeout: float = 600.0
    wait_initial: float = 0.5
    wait_max: float = 30.0
    retry_after_max: float = 120.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise InputError(f"RetryPolicy.attempts must be at least 1, got {self.attempts}")
        if min(self.timeout, self.wait_initial, self.wait_max, self.retry_after_max) < 0:
            raise InputError("RetryPolicy durations must not be negative")

    def backoff(self, retry: int, rng: random.Random) -> float:
        """The jittered wait before retry number ``retry`` (0 for the first retry)."""
        return rng.uniform(0, min(self.wait_max, self.wait_initial * 2.0**retry))

    def wait(self, retry: int, error: APIError, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` after ``error``."""
        asked = getattr(error, "retry_after", None)
        if asked is not None:
            return float(min(asked, self.retry_after_max))
        return self.backoff(retry, rng)


def retryable(error: APIError) -> bool:
    """Whether trying the same request again may succeed."""
    if isinstance(
        error, APIConnectionError | RateLimitError | RequestInProgressError | ServerError
    ):
        return True
    return isinstance(error, ProtocolError) and error.retryable


def not_created(error: APIError) -> bool:
    """Whether this answer says the server created nothing: a 4xx (429 included) but 409, which
    for an Idempotency-Key means the key was used. After a timeout, a lost connection, a 5xx or
    an unreadable 2xx it may have created it."""
    return (
        isinstance(error, APIStatusError) and error.status_code < 500 and error.status_code != 409
    )


def overloaded(error: APIError) -> bool:
    """A 503 is the server asking every caller to back off, not just this request (a 429 is
    a limit the gate learns to pace under, see ``_admission``)."""
    return isinstance(error, ServerError) and error.status_code == 503


def parse_retry_after(header: str | None, body: Any, now: float) -> float | None:
    """Seconds the server asks to wait: ``Retry-After`` (delta-seconds or an HTTP date, relative
    to ``now``, seconds since the epoch), else a numeric ``retry_after`` in the error body.

    >>> parse_retry_after("3", None, 0.0)
    3.0
    >>> parse_retry_after("Thu, 01 Jan 1970 00:00:10 GMT", None, 4.0)
    6.0
    """
    if header:
        text = header.strip()
        try:
            return max(0.0, float(text))
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            when = None
        if when is not None and when.tzinfo is not None:
            return max(0.0, when.timestamp() - now)
    if isinstance(body, dict):
        value = body.get("retry_after")
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return float(value)
    return None


class Gate(Protocol):
    """Admission to send a request (the shared throttle, in the pipeline): ``acquire`` returns
    a ticket, handed back to ``release`` with how the try went.

    ``strikes`` counts the overload episodes (503) since the last success: the backoff of a
    shared pause grows with it, not with one request's own retries, so one unlucky request
    cannot stall everyone for long while others are getting through.
    """

    @property
    def strikes(self) -> int: ...

    async def acquire(self) -> Any: ...

    def release(self, ticket: Any, error: APIError | None, wait: float | None = None) -> None:
        """How the try went; ``wait`` is the retry's wait, when there will be one."""

    def pace(self) -> Pace:
        """What it learned of the server's limits (kept in a checkpoint)."""

    def start_from(self, pace: Pace | None) -> None:
        """What a checkpoint kept, to start from when nothing was learned yet."""


async def retrying(
    call: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    gate: Gate,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[None]],
    rng: random.Random,
    on_retry: Callable[[APIError, float], None] | None = None,
) -> T:
    """``await call()`` until it succeeds, a non-retryable error, or the policy gives up.

    Each try passes ``gate`` first; the gate hears how it went. A 503's wait is the gate's to
    impose on everyone (``overloaded``); a 429's is this request's own: its
    ``Retry-After``, else none (the gate paces the retry). A 429 does not count against
    ``attempts``: the server took nothing, and the gate decides when to try again; ``timeout``
    still bounds it.
    """
    started = clock()
    retry = 0  # tries that failed for another reason than a 429
    while True:
        ticket = await gate.acquire()
        try:
            result = await call()
        except APIError as error:
            limited = isinstance(error, RateLimitError | RequestInProgressError)
            wait: float | None = None
            if retryable(error) and (limited or retry + 1 < policy.attempts):
                wait = _wait(policy, error, retry, gate.strikes, rng)
                if clock() + wait - started > policy.timeout:
                    wait = None
            gate.release(ticket, error, wait)
            if wait is None:
                raise
            if on_retry is not None:
                on_retry(error, wait)
            if wait > 0 and not overloaded(error):
                await sleep(wait)
            retry += not limited
            continue
        gate.release(ticket, None)
        return result


def _wait(
    policy: RetryPolicy, error: APIError, retry: int, strikes: int, rng: random.Random
) -> float:
    """The wait before the next try: a 429's own ``Retry-After`` (0 without: the gate paces),
    a 503's backoff by the gate's strikes, any other error's by this request's retries."""
    if isinstance(error, RateLimitError):
        asked = error.retry_after
        return 0.0 if asked is None else float(min(asked, policy.retry_after_max))
    return policy.wait(strikes if overloaded(error) else retry, error, rng)
