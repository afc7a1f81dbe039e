"""The emulator's service time: a create configured with latency L is answered, its last byte
written, about L after it arrived, whatever writing the answer costs (the Little's-law ceiling
of the benchmarks assumes it)."""

from __future__ import annotations

import statistics
from typing import Any

import anyio
import orjson
import pytest

from runflow_frames.emulator import Emulator, Timing, _app, create_app

from .conftest import API_KEY

LATENCY = 0.03
WRITE = 0.005  # what each write of an answer costs the server, here


async def answer_times(creates: int) -> list[float]:
    """Seconds from each create's arrival to its answer's last byte, one create at a time, on
    an ASGI server whose every write takes ``WRITE``."""
    app = create_app(Emulator(timing=Timing(create_latency=LATENCY)))
    body = orjson.dumps({"input": [{"client_ref": "r", "text": "x"}]})
    times = []
    for n in range(creates):
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/models/acme/echo/batches",
            "raw_path": b"/v1/models/acme/echo/batches",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"authorization", f"Bearer {API_KEY}".encode()),
                (b"content-type", b"application/json"),
                (b"idempotency-key", f"k{n}".encode()),
            ],
            "server": ("127.0.0.1", 80),
            "client": ("127.0.0.1", 1234),
        }
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                await anyio.sleep_forever()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        ended: list[float] = []

        async def send(message: dict[str, Any]) -> None:
            await anyio.sleep(WRITE)
            if message["type"] == "http.response.body":
                ended.append(anyio.current_time())  # noqa: B023

        started = anyio.current_time()
        await app(scope, receive, send)
        times.append(ended[-1] - started)
    return times


def test_a_create_is_answered_its_latency_after_it_arrived_writes_included(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_app._waker, "sending", 0.0)  # restored for the other tests
    times = anyio.run(answer_times, 40)
    # The first answers are late by the two writes (2 x 5 ms); the waker learns what writing
    # costs, and the last ones end within a couple of ms of their service time.
    assert statistics.median(times[:3]) > LATENCY + 1.5 * WRITE
    assert LATENCY - 0.002 < statistics.median(times[-10:]) < LATENCY + 0.0025
