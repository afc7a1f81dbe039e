"""Fault injection: what a real API does to a client at scale, on purpose and reproducibly.

``Faults`` says how often each fault strikes (a probability per request, drawn from a seeded
random generator) and which limits the server enforces. ``FaultMiddleware`` wraps the emulator's
ASGI app and applies them to every ``/v1`` request but the health check. Faults that strike
*before* a request is processed leave no trace in the emulator's state; faults that strike
*after* (a reset after processing, a slow response, a malformed body) leave the work done and
the answer lost, which is the ambiguous case exactly-once has to survive.

A reset is made by starting a response and dropping the connection before its body is complete;
over real HTTP the client sees the connection close mid-response.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, fields
from typing import Any, Final

import anyio
import orjson

from ._limits import (
    RETRY_AFTER_MODES,
    AllOf,
    ConcurrencyCap,
    FixedWindow,
    Shape,
    SlidingWindow,
    TokenBucket,
    retry_after_header,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_SERVER_ERRORS: Final = (500, 502, 503, 504)


@dataclass(frozen=True)
class Faults:
    """How the emulator misbehaves: random faults, and the limits a server enforces.

    Rates are probabilities per API request (0 to 1), drawn from a generator seeded by ``seed``.

    Parameters
    ----------
    seed : int
        Seeds the draws, so a run of faults can be replayed.
    rate_limited : float
        429 ``RATE_LIMITED`` before processing.
    retry_after : float or None
        Seconds sent as ``Retry-After`` with every 429 (a limit's 429: at least its wait,
        unless ``limit_retry_after`` names a form); ``None`` sends no header (what the newest
        docs say the API does).
    server_error : float
        500, 502, 503 or 504 before processing.
    reset_before : float
        The connection drops before the request is processed.
    reset_after : float
        The request is processed, then the connection drops before the answer is complete.
    slow : float
        The request is processed, then the answer waits ``slow_seconds`` (beyond a client's
        timeout).
    slow_seconds : float
        How long a slow answer waits.
    malformed : float
        The request is processed, then the answer's body is not valid JSON.
    rejected : float
        422 ``VALIDATION_ERROR`` before processing, as for an input the API refuses.
    rate_limit : float or None
        Requests per second the server accepts: a token bucket refilled at this rate; beyond
        it, 429 ``RATE_LIMITED``.
    concurrency_limit : int or None
        Requests the server serves at once; beyond it, 429.
    routes : str
        ``"create"``: faults strike only batch creation; ``"all"``: every API request.
    burst : float or None
        The token bucket's size (needs ``rate_limit``): requests admitted at once before the
        rate applies. ``None``: one second's worth (``rate_limit``); ``1``: strict spacing of
        ``1 / rate_limit`` seconds (GCRA).
    window_limit : int or None
        Requests admitted per ``window``; beyond it, 429.
    window : float
        The window's length in seconds.
    window_kind : str
        ``"fixed"``: counts reset on window boundaries (multiples of ``window`` from the
        limiter's first request), so a burst may straddle one; ``"sliding"``: at most
        ``window_limit`` in any ``window`` seconds.
    hangup : float
        The connection drops while the request is being processed, and the processing goes
        on, as a server's does when its client hangs up (with ``in_flight`` other than
        ``"done"``, a retry may then meet it still in progress).
    in_flight : str
        What a create with the Idempotency-Key of one still being processed meets:
        ``"done"`` (the default) processes every create on arrival and holds only its answer
        back for the service time, so a same-key retry finds the first done and gets its
        replay; the others process a create at the end of its service time and answer a
        same-key request meanwhile with ``"conflict"`` (409 ``IDEMPOTENCY_KEY_IN_USE``, with
        ``Retry-After``: the seconds left, rounded up), ``"wait"`` (held until the first
        answers, then its replay) or ``"process"`` (processed again: a second batch).
    limit_retry_after : str
        The ``Retry-After`` of the limits' 429s, from the true wait: ``"none"`` (no header of
        their own; ``retry_after``, when set, still applies), ``"exact"`` (seconds, to the
        millisecond), ``"ceil"`` (whole seconds rounded up, at least 1) or ``"date"`` (an HTTP
        date). A concurrency cap cannot know its wait and says 0 (``"ceil"``: 1).

    The limits (``rate_limit``, ``window_limit``, ``concurrency_limit``) combine: a request is
    admitted only when every one set admits it, and a refusal consumes none of them. They are
    deterministic (the ``seed`` drives only the random faults above); a new ``Faults`` starts
    them afresh, full. See ``runflow_frames.emulator._limits`` for the shapes, on any clock.

    Examples
    --------
    >>> Faults.parse("rate_limit=10,burst=1,window_limit=100,window=60,limit_retry_after=ceil")
    ... # doctest: +ELLIPSIS
    Faults(seed=0, ..., rate_limit=10.0, ..., burst=1.0, window_limit=100, window=60.0, ...)
    """

    seed: int = 0
    rate_limited: float = 0.0
    retry_after: float | None = None
    server_error: float = 0.0
    reset_before: float = 0.0
    reset_after: float = 0.0
    slow: float = 0.0
    slow_seconds: float = 30.0
    malformed: float = 0.0
    rejected: float = 0.0
    rate_limit: float | None = None
    concurrency_limit: int | None = None
    routes: str = "all"
    burst: float | None = None
    window_limit: int | None = None
    window: float = 1.0
    window_kind: str = "fixed"
    limit_retry_after: str = "none"
    hangup: float = 0.0
    in_flight: str = "done"

    def __post_init__(self) -> None:
        rates = [self.rate_limited, self.server_error, self.reset_before, self.reset_after]
        rates += [self.slow, self.malformed, self.rejected, self.hangup]
        if self.in_flight not in IN_FLIGHT_MODES:
            known = ", ".join(repr(m) for m in IN_FLIGHT_MODES)
            raise ValueError(f"in_flight must be one of {known}, not {self.in_flight!r}")
        if any(not 0 <= r <= 1 for r in rates) or sum(rates) > 1:
            raise ValueError("fault rates must be within 0..1 and add up to at most 1")
        if self.routes not in ("all", "create"):
            raise ValueError("routes must be 'all' or 'create'")
        if self.burst is not None and self.rate_limit is None:
            raise ValueError("burst is the size of the rate_limit's bucket: set rate_limit too")
        if self.window_kind not in _WINDOW_KINDS:
            raise ValueError(f"window_kind must be 'fixed' or 'sliding', not {self.window_kind!r}")
        if self.limit_retry_after not in RETRY_AFTER_MODES:
            known = ", ".join(repr(m) for m in RETRY_AFTER_MODES)
            raise ValueError(
                f"limit_retry_after must be one of {known}, not {self.limit_retry_after!r}"
            )
        if not 0 < self.window < math.inf:
            raise ValueError(f"window must be a positive number of seconds, not {self.window!r}")
        self.limiter()  # the limits' own checks (positive rates and sizes), said now

    def limiter(self) -> AllOf:
        """A fresh limiter of the limits set: every one must admit (none set: all admitted)."""
        shapes: list[Shape] = []
        if self.rate_limit is not None:
            # One second's worth by default, and at least the one request (a rate below 1/s).
            burst = max(1.0, self.rate_limit) if self.burst is None else self.burst
            shapes.append(TokenBucket(self.rate_limit, burst))
        if self.window_limit is not None:
            window = FixedWindow if self.window_kind == "fixed" else SlidingWindow
            shapes.append(window(self.window_limit, self.window))
        if self.concurrency_limit is not None:
            shapes.append(ConcurrencyCap(self.concurrency_limit))
        return AllOf(*shapes)

    @classmethod
    def parse(cls, spec: str) -> Faults:
        """``"rate_limited=0.05,retry_after=1,rate_limit=20"``: what ``--faults`` takes."""
        names = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, raw = part.partition("=")
            name, raw = name.strip(), raw.strip()
            if name not in names:
                raise ValueError(f"unknown fault {name!r}; known: {', '.join(sorted(names))}")
            values[name] = _value(name, raw)
        return cls(**values)


_WINDOW_KINDS: Final = ("fixed", "sliding")
_WORDS: Final = ("routes", "window_kind", "limit_retry_after", "in_flight")
IN_FLIGHT_MODES: Final = ("done", "conflict", "wait", "process")
_INTEGERS: Final = ("seed", "concurrency_limit", "window_limit")


def _value(name: str, raw: str) -> Any:
    """One ``--faults`` value: a word, an integer or a number, as the field takes."""
    if name in _WORDS:
        return raw
    if raw.lower() == "none":
        return None
    kind = int if name in _INTEGERS else float
    try:
        return kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{name} takes {what}, not {raw!r}") from None


class _Dropped(Exception):  # noqa: N818 - a signal to the server, not an error
    """Raised after a response has started: the server then closes the connection."""


class _QuietDrops(logging.Filter):
    """Keeps uvicorn from logging a traceback for every connection we drop on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _Dropped)


logging.getLogger("uvicorn.error").addFilter(_QuietDrops())


class FaultMiddleware:
    """Applies the current ``faults()`` to the API requests that reach ``app``; ``on_fault``
    hears of each. Faults are read per request, so they can be changed (or healed) live; a
    new ``Faults`` starts its own seeded draws and limits."""

    def __init__(
        self,
        app: ASGIApp,
        faults: Callable[[], Faults | None],
        on_fault: Callable[[str], None],
    ) -> None:
        self.app = app
        self._current = faults
        self._count = on_fault
        self._lock = threading.Lock()
        self.faults = Faults()
        self.rng = random.Random()  # noqa: S311 - reproducible faults, not secrets
        self.limiter = AllOf()

    def _configure(self, faults: Faults) -> None:
        with self._lock:
            if faults is not self.faults:
                self.faults = faults
                self.rng = random.Random(faults.seed)  # noqa: S311 - reproducible, not secrets
                self.limiter = faults.limiter()

    def _draw(self) -> str | None:
        f = self.faults
        with self._lock:
            x = self.rng.random()
        for name, rate in (
            ("rate_limited", f.rate_limited),
            ("server_error", f.server_error),
            ("reset_before", f.reset_before),
            ("reset_after", f.reset_after),
            ("slow", f.slow),
            ("malformed", f.malformed),
            ("rejected", f.rejected),
            ("hangup", f.hangup),
        ):
            if x < rate:
                return name
            x -= rate
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        faults = self._current()
        if (
            faults is None
            or scope["type"] != "http"
            or not path.startswith("/v1/")
            or path == "/v1/health"
        ):
            await self.app(scope, receive, send)
            return
        self._configure(faults)
        if self.faults.routes == "create" and not (
            scope["method"] == "POST" and path.endswith("/batches")
        ):
            await self.app(scope, receive, send)
            return
        limiter = self.limiter
        with self._lock:
            wait = limiter.admit(time.monotonic())
        if wait is not None:
            self._count("limited")
            await _answer(send, 429, "RATE_LIMITED", "Rate limit exceeded", self._limited(wait))
            return
        try:
            await self._serve(scope, receive, send)
        finally:
            with self._lock:
                limiter.done(time.monotonic())

    def _limited(self, wait: float) -> str | None:
        """The ``Retry-After`` of a limit's 429: in the form ``limit_retry_after`` names, else
        as ``retry_after`` says for every 429 (at least the true wait)."""
        mode = self.faults.limit_retry_after
        if mode != "none":
            return retry_after_header(wait, mode, time.time())
        return self._retry_after(wait)

    def _retry_after(self, wait: float = 0.0) -> str | None:
        if self.faults.retry_after is None:
            return None
        return str(max(1, round(max(self.faults.retry_after, wait))))

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        fault = self._draw()
        if fault is None:
            await self.app(scope, receive, send)
            return
        self._count(fault)
        if fault == "rate_limited":
            await _answer(send, 429, "RATE_LIMITED", "Rate limit exceeded", self._retry_after())
        elif fault == "server_error":
            with self._lock:
                status = self.rng.choice(_SERVER_ERRORS)
            await _answer(send, status, "INTERNAL_ERROR", "injected server error")
        elif fault == "rejected":
            await _answer(send, 422, "VALIDATION_ERROR", "injected rejection")
        elif fault == "reset_before":
            await _drop(send)
        elif fault == "hangup":
            await _hang_up(self.app, scope, receive, send)
        else:
            # Process for real, hold the answer back, then spoil it.
            status, headers, body = await _capture(self.app, scope, receive)
            if fault == "reset_after":
                await _drop(send)
            elif fault == "slow":
                await anyio.sleep(self.faults.slow_seconds)
                await _send(send, status, headers, body)
            else:  # malformed
                await _send(send, status, headers, body[: len(body) // 2])


async def _capture(app: ASGIApp, scope: Scope, receive: Receive) -> tuple[int, list[Any], bytes]:
    start: Message = {}
    chunks: list[bytes] = []

    async def keep(message: Message) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, keep)
    return start["status"], list(start.get("headers", [])), b"".join(chunks)


async def _send(send: Send, status: int, headers: list[Any], body: bytes) -> None:
    kept = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    kept.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": kept})
    await send({"type": "http.response.body", "body": body})


async def _answer(
    send: Send, status: int, code: str, message: str, retry_after: str | None = None
) -> None:
    headers = [(b"content-type", b"application/json")]
    if retry_after is not None:
        headers.append((b"retry-after", retry_after.encode()))
    body = orjson.dumps({"code": code, "message": message, "errors": None})
    await _send(send, status, headers, body)


async def _hang_up(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Drop the connection while ``app`` goes on processing the request, in a thread of its
    own (what this request's task does ends with the connection)."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break

    async def replayed() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def unheard(_message: Message) -> None:
        return None

    async def process() -> None:
        await app(scope, replayed, unheard)

    threading.Thread(target=anyio.run, args=(process,), daemon=True).start()
    await _drop(send)


async def _drop(send: Send) -> None:
    # Promise a body, send half of nothing, and fail: the server closes the connection.
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"64")]}
    )
    await send({"type": "http.response.body", "body": b"{", "more_body": True})
    raise _Dropped
