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
import random
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, fields
from typing import Any, Final

import anyio
import orjson

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_SERVER_ERRORS: Final = (500, 502, 503, 504)


@dataclass(frozen=True)
class Faults:
    """How the emulator misbehaves. Rates are probabilities per API request (0 to 1).

    Parameters
    ----------
    seed : int
        Seeds the draws, so a run of faults can be replayed.
    rate_limited : float
        429 ``RATE_LIMITED`` before processing.
    retry_after : float or None
        Seconds sent as ``Retry-After`` with every 429; ``None`` sends no header (what the
        newest docs say the API does).
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
        Requests per second the server accepts (a token bucket of one second's burst); beyond
        it, 429.
    concurrency_limit : int or None
        Requests the server serves at once; beyond it, 429.
    routes : str
        ``"create"``: faults strike only batch creation; ``"all"``: every API request.
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

    def __post_init__(self) -> None:
        rates = [self.rate_limited, self.server_error, self.reset_before, self.reset_after]
        rates += [self.slow, self.malformed, self.rejected]
        if any(not 0 <= r <= 1 for r in rates) or sum(rates) > 1:
            raise ValueError("fault rates must be within 0..1 and add up to at most 1")
        if self.routes not in ("all", "create"):
            raise ValueError("routes must be 'all' or 'create'")

    @classmethod
    def parse(cls, spec: str) -> Faults:
        """``"rate_limited=0.05,retry_after=1,rate_limit=20"``: what ``--faults`` takes."""
        names = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, raw = part.partition("=")
            if name not in names:
                raise ValueError(f"unknown fault {name!r}; known: {', '.join(sorted(names))}")
            if raw.lower() == "none":
                values[name] = None
            elif name == "routes":
                values[name] = raw
            elif name in ("seed", "concurrency_limit"):
                values[name] = int(raw)
            else:
                values[name] = float(raw)
        return cls(**values)


class _Limiter:
    """The server-side limits: a token bucket and an in-flight count."""

    def __init__(self, rate: float | None, concurrency: int | None) -> None:
        self.rate = rate
        self.concurrency = concurrency
        self.tokens = rate or 0.0
        self.updated = time.monotonic()
        self.in_flight = 0
        self.lock = threading.Lock()

    def admit(self) -> float | None:
        """None when admitted (and counted in flight), else seconds until a token is due."""
        with self.lock:
            if self.concurrency is not None and self.in_flight >= self.concurrency:
                return 0.0
            if self.rate is not None:
                now = time.monotonic()
                self.tokens = min(self.rate, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens < 1:
                    return (1 - self.tokens) / self.rate
                self.tokens -= 1
            self.in_flight += 1
            return None

    def done(self) -> None:
        with self.lock:
            self.in_flight -= 1


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
        self.limiter = _Limiter(None, None)

    def _configure(self, faults: Faults) -> None:
        with self._lock:
            if faults is not self.faults:
                self.faults = faults
                self.rng = random.Random(faults.seed)  # noqa: S311 - reproducible, not secrets
                self.limiter = _Limiter(faults.rate_limit, faults.concurrency_limit)

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
        wait = limiter.admit()
        if wait is not None:
            self._count("limited")
            await _answer(send, 429, "RATE_LIMITED", "Rate limit exceeded", self._retry_after(wait))
            return
        try:
            await self._serve(scope, receive, send)
        finally:
            limiter.done()

    def _retry_after(self, wait: float | None = None) -> float | None:
        if self.faults.retry_after is None:
            return None
        return max(self.faults.retry_after, wait or 0.0)

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
    send: Send, status: int, code: str, message: str, retry_after: float | None = None
) -> None:
    headers = [(b"content-type", b"application/json")]
    if retry_after is not None:
        headers.append((b"retry-after", str(max(1, round(retry_after))).encode()))
    body = orjson.dumps({"code": code, "message": message, "errors": None})
    await _send(send, status, headers, body)


async def _drop(send: Send) -> None:
    # Promise a body, send half of nothing, and fail: the server closes the connection.
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"64")]}
    )
    await send({"type": "http.response.body", "body": b"{", "more_body": True})
    raise _Dropped
