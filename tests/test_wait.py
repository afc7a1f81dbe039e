"""``wait=True`` collects outcomes while the job still sends (issue 20): what the server was
asked, and when, seen through the transport."""

from __future__ import annotations

import time
from collections import Counter

import httpx
import orjson
import pandas as pd

from runflow_frames import run_batches
from runflow_frames.emulator import Emulator, Timing, serve

from .conftest import API_KEY


class Recording(httpx.AsyncBaseTransport):
    """Every request sent, with when it was sent, through a real HTTP transport; and the item
    pages that found every item of their batch over."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sent: list[tuple[float, str, str]] = []
        self.over: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((time.monotonic(), request.method, request.url.path))
        response = await self.inner.handle_async_request(request)
        if not request.url.path.endswith("/items"):
            return response
        body = await response.aread()
        items = orjson.loads(body)["items"]
        if all(item["status_code"] in ("succeeded", "failed") for item in items):
            self.over.append(request.url.path)
        return httpx.Response(response.status_code, headers=response.headers, content=body)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_outcomes_are_collected_while_the_job_sends_and_never_fetched_twice() -> None:
    # Creates take 50 ms each, one at a time: the job sends for about a second while its first
    # runs are over in 30 ms.
    server = Emulator(
        timing=Timing(queued=0.01, dispatching=0.0, running=0.02, create_latency=0.05)
    )
    df = pd.DataFrame(
        {"text": [f"t{i}" for i in range(2_000)]}, index=[f"r{i}" for i in range(2_000)]
    )
    transport = Recording()
    with serve(server) as url:
        out = run_batches(
            df,
            "acme/echo",
            wait=True,
            chunk_size=100,
            max_concurrency=1,
            api_key=API_KEY,
            base_url=url,
            transport=transport,
            progress=False,
        )
    assert (out["runflow_status"] == "succeeded").all()
    assert server.accounting().runs_by_client_ref == dict.fromkeys(df.index, 1)
    last_create = max(at for at, method, _ in transport.sent if method == "POST")
    pages = [(at, path) for at, method, path in transport.sent if path.endswith("/items")]
    early = [path for at, path in pages if at < last_create]
    assert len(early) >= 10, "outcomes were not collected while the job sent"
    # A page may find its batch still running (it is swept again later); once over, it is
    # fetched once, by the prefetcher or by the final collect, never by both.
    assert Counter(transport.over) == Counter(
        f"/v1/batches/{b}/items" for b in out["runflow_batch_id"].unique()
    ), "a finished batch's items were fetched more or less than once"


def test_outcomes_come_soon_after_the_last_run_ends_wherever_it_falls_between_polls() -> None:
    """Polls while waiting are never further apart than a tenth of the batches' age. Runs of
    about 4 s end between two polls of the intervals grown so far (3.4 s and 5.3 s after the
    job started, with waits growing from 0.25 s by half each time up to 2 s): the outcomes
    would come about 1.3 s late; a poll every 0.4 s sees them end."""
    server = Emulator(timing=Timing(queued=0.4, dispatching=0.0, running=3.6))
    df = pd.DataFrame(
        {"text": [f"t{i}" for i in range(2_000)]}, index=[f"r{i}" for i in range(2_000)]
    )
    with serve(server) as url:
        out = run_batches(
            df,
            "acme/echo",
            wait=True,
            max_concurrency=4,
            api_key=API_KEY,
            base_url=url,
            progress=False,
        )
        returned = time.time()
    assert (out["runflow_status"] == "succeeded").all()
    last_end = pd.to_datetime(out["runflow_completed_at"], utc=True).max().timestamp()
    assert returned - last_end < 0.8
    assert server.accounting().runs_by_client_ref == dict.fromkeys(df.index, 1)
