"""Results: wait, collect (also from a checkpoint in another process), pagination, retry_failed."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pandas as pd
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runflow_frames import (
    CollectError,
    DeadlineExceeded,
    InputError,
    ProtocolError,
    Summary,
    collect,
    retry_failed,
    run_batches,
    summarize,
    verify_signature,
)
from runflow_frames._polling import batch_is_over, next_cursor
from runflow_frames._signatures import sign
from runflow_frames.emulator import Emulator, Timing, create_app, serve
from runflow_frames.emulator._serve import _bind

from .conftest import API_KEY

LOCAL = "http://localhost"
FAST_POLL = (0.05, 0.2)


def mixed(n: int) -> pd.DataFrame:
    """acme/uppercase input where every 7th row is invalid (its run fails)."""
    text: list[Any] = [f"row {i}" if i % 7 else i for i in range(n)]
    return pd.DataFrame(
        {"text": text, "repeat": 1 + np.arange(n) % 3}, index=[f"k{i:05d}" for i in range(n)]
    )


def expected_output(row: pd.Series) -> dict[str, Any] | None:
    return (
        None if not isinstance(row["text"], str) else {"text": row["text"].upper() * row["repeat"]}
    )


@pytest.mark.parametrize(
    ("batch", "over"),
    [
        ({"status_code": "succeeded"}, True),
        ({"status_code": "partial_succeeded"}, True),
        ({"status_code": "cancelled"}, True),
        ({"status_code": "canceled"}, True),
        ({"status_code": "errored"}, True),
        ({"status_code": "running"}, False),
        ({"status_code": "something_new"}, False),
        ({"status_code": "running", "completed_at": "2026-01-01T00:00:00Z"}, True),
        (
            {
                "status_code": "weird",
                "items_total": 3,
                "items_succeeded": 2,
                "items_failed": 1,
                "items_cancelled": 0,
            },
            True,
        ),
        (
            {
                "status_code": "weird",
                "items_total": 3,
                "items_succeeded": 1,
                "items_failed": 1,
                "items_cancelled": 0,
            },
            False,
        ),
    ],
)
def test_when_a_batch_is_over(batch: dict[str, Any], over: bool) -> None:
    assert batch_is_over(batch) is over


@pytest.mark.parametrize(
    ("page", "cursor"),
    [
        ({"next_pq": "abc", "next": "zzz"}, "abc"),
        ({"next": "abc"}, "abc"),
        ({"next": "/v1/batches/b/items?limit=5&pq=xyz"}, "xyz"),
        ({"next": "?pq=xyz&limit=5"}, "xyz"),
        ({"next": None, "next_pq": None}, None),
        ({}, None),
    ],
)
def test_next_cursor_reads_both_spellings(page: dict[str, Any], cursor: str | None) -> None:
    assert next_cursor(page) == cursor


@pytest.mark.slow
def test_wait_joins_every_rows_outcome_over_thousands_of_rows(
    emulator: Emulator, base_url: str
) -> None:
    df = mixed(3000)
    out = run_batches(df, "acme", "uppercase", base_url=base_url, api_key=API_KEY, wait=True)
    pd.testing.assert_frame_equal(out[df.columns], df)
    ok = df["text"].map(lambda t: isinstance(t, str))
    assert (out.loc[ok, "runflow_status"] == "succeeded").all()
    assert (out.loc[~ok, "runflow_status"] == "failed").all()
    for key, row in df.iterrows():
        assert out.at[key, "runflow_output"] == expected_output(row)
    assert (out.loc[ok, "runflow_cost"] == Decimal("0.002")).all()
    assert (out.loc[~ok, "runflow_cost"] == Decimal("0")).all()
    assert out.loc[~ok, "runflow_failure_code"].eq("INPUT_VALIDATION_FAILED").all()
    assert out.loc[~ok, "runflow_failure_message"].eq("input 'text' must be of type string").all()
    assert out.loc[ok, "runflow_failure_code"].isna().all()
    assert str(out["runflow_completed_at"].dtype).startswith("datetime64")
    assert (out["runflow_completed_at"] >= out["runflow_created_at"]).all()
    summary = summarize(out)
    assert isinstance(summary, Summary)
    assert summary.by_status == {"succeeded": int(ok.sum()), "failed": int((~ok).sum())}
    assert summary.total_cost == Decimal("0.002") * int(ok.sum())
    assert summary.failures_by_code == {"INPUT_VALIDATION_FAILED": int((~ok).sum())}
    assert "total cost" in repr(summary)
    assert "<table" in summary._repr_html_()
    # The costs the server reports for the rows' runs add up to the same total.
    received = {r["run_id"] for r in emulator.received()}
    assert set(out["runflow_run_id"]) == received


def test_flatten_spreads_outputs_into_columns(base_url: str) -> None:
    df = mixed(50)
    out = run_batches(df, "acme", "uppercase", base_url=base_url, api_key=API_KEY)
    flat = collect(out, base_url=base_url, api_key=API_KEY, flatten=True, poll_interval=FAST_POLL)
    assert "runflow_output" not in flat.columns
    assert [None if pd.isna(t) else t for t in flat["runflow_output.text"]] == [
        None if o is None else o["text"] for o in (expected_output(r) for _, r in df.iterrows())
    ]


def test_collect_from_a_checkpoint_in_a_fresh_process_and_again_without_refetching(
    tmp_path: Path, emulator: Emulator, base_url: str
) -> None:
    df = mixed(700)
    run_batches(df, "acme", "uppercase", base_url=base_url, api_key=API_KEY, checkpoint=tmp_path)
    code = (
        "import sys, runflow_frames as rf\n"
        "out = rf.collect(sys.argv[1], poll_interval=(0.05, 0.2))\n"
        "out.drop(columns=['runflow_output']).to_parquet(sys.argv[2])\n"
        "print(rf.summarize(out).api_requests)\n"
    )
    # The key goes to the server this process is configured for, never one a file names.
    env = {"RUNFLOW_API_KEY": API_KEY, "RUNFLOW_BASE_URL": base_url, "PATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), str(tmp_path / "out.parquet")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 8  # it polled and paged, from nothing but the checkpoint path
    collected = pd.read_parquet(tmp_path / "out.parquet")
    assert len(collected) == 700
    assert set(collected.index) == set(df.index)
    assert (collected["runflow_status"] == "failed").sum() == (
        ~df["text"].map(lambda t: isinstance(t, str))
    ).sum()
    before = emulator.accounting().requests_by_route
    again = collect(tmp_path, api_key=API_KEY, base_url=base_url)
    assert emulator.accounting().requests_by_route == before  # nothing fetched twice
    assert summarize(again).api_requests == 0
    assert again["runflow_status"].to_dict() == collected["runflow_status"].to_dict()


@pytest.mark.slow
def test_many_pages_are_followed() -> None:
    emulator = Emulator(page_cap=7)
    with serve(emulator) as url:
        out = run_batches(mixed(300), "acme", "uppercase", base_url=url, api_key=API_KEY, wait=True)
    assert out["runflow_status"].notna().all()
    df = mixed(300)
    assert out["runflow_output"].tolist() == [expected_output(r) for _, r in df.iterrows()]
    pages = emulator.accounting().requests_by_route["GET /v1/batches/{id}/items"]
    assert pages >= 3 * 15  # 100 items, 7 a page


class Pages(httpx.AsyncBaseTransport):
    """The emulator in-process, with its item pages rewritten by ``edit``."""

    def __init__(self, emulator: Emulator, edit: Any) -> None:
        self.inner = httpx.ASGITransport(app=create_app(emulator))
        self.edit = edit
        self.pages = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if not request.url.path.endswith("/items"):
            return response
        self.pages += 1
        body = orjson.loads(await response.aread())
        self.edit(body)
        return httpx.Response(200, content=orjson.dumps(body))


def test_only_next_as_a_url_is_followed() -> None:
    emulator = Emulator(page_cap=10)

    def url_cursors(page: dict[str, Any]) -> None:
        cursor = page.pop("next_pq")
        page["next"] = None if cursor is None else f"/v1/batches/x/items?limit=10&pq={cursor}"

    transport = Pages(emulator, url_cursors)
    out = run_batches(
        mixed(100), "acme", "uppercase", api_key=API_KEY, base_url=LOCAL, transport=transport
    )
    done = collect(
        out, api_key=API_KEY, base_url=LOCAL, transport=transport, poll_interval=FAST_POLL
    )
    assert done["runflow_status"].notna().all()
    assert transport.pages >= 10


class Stuck(Pages):
    """A server that answers every page with the first one and the same cursor, for ever."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/items"):
            request = httpx.Request(
                "GET", request.url.copy_remove_param("pq"), headers=request.headers
            )
        return await super().handle_async_request(request)


def test_a_repeated_cursor_never_loops_forever() -> None:
    emulator = Emulator(page_cap=10)

    def stuck(page: dict[str, Any]) -> None:
        page["next_pq"] = page["next"] = "the-same-cursor"

    transport = Stuck(emulator, stuck)
    out = run_batches(
        mixed(100), "acme", "uppercase", api_key=API_KEY, base_url=LOCAL, transport=transport
    )
    with pytest.raises(CollectError, match="a cursor repeated") as info:
        collect(out, api_key=API_KEY, base_url=LOCAL, transport=transport, poll_interval=FAST_POLL)
    assert isinstance(info.value.__cause__, ProtocolError)
    # The handles are not lost with the error.
    assert info.value.result["runflow_run_id"].tolist() == out["runflow_run_id"].tolist()
    # It read the first page and the repeated cursor once, then stopped.
    assert transport.pages == 2


def test_a_deadline_returns_what_was_collected() -> None:
    # Running from the moment they are made, for 30 s: the first poll sees "running", however
    # late it comes on a busy machine (with 0.05 s queued and dispatching, a poll inside the
    # first 0.1 s saw "queued", and whether a later one fit in the 0.5 s was up to the load).
    emulator = Emulator(timing=Timing(queued=0, dispatching=0, running=30))
    with serve(emulator) as url:
        out = run_batches(mixed(250), "acme", "uppercase", base_url=url, api_key=API_KEY)
        with pytest.raises(DeadlineExceeded, match="still running") as info:
            collect(out, base_url=url, api_key=API_KEY, deadline=0.5, poll_interval=FAST_POLL)
    partial = info.value.result
    # The oldest batch was polled and is running; younger ones wait their turn (no status yet).
    statuses = set(partial["runflow_status"].dropna())
    assert "running" in statuses
    assert statuses <= {"running", "dispatching", "queued"}
    assert partial["runflow_output"].isna().all()


class OneRunsOn(httpx.AsyncBaseTransport):
    """The emulator in-process, with one batch that never ends (its items keep running)."""

    def __init__(self, emulator: Emulator) -> None:
        self.inner = httpx.ASGITransport(app=create_app(emulator))
        self.stuck: str | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if self.stuck is None or f"/batches/{self.stuck}" not in request.url.path:
            return response
        body = orjson.loads(await response.aread())
        for item in body.get("items", [body]):
            item.update(status_code="running", status="running", completed_at=None, output=None)
        if "items_total" in body:  # the batch itself: running
            body.update(status_code="running", completed_at=None, items_succeeded=0)
            body.update(items_failed=0, items_cancelled=0)
        return httpx.Response(200, content=orjson.dumps(body))


def test_one_batch_that_runs_on_holds_back_none_of_the_others() -> None:
    emulator = Emulator(timing=Timing(queued=0, dispatching=0, running=0))
    transport = OneRunsOn(emulator)
    options: dict[str, Any] = {"api_key": API_KEY, "base_url": LOCAL, "transport": transport}
    out = run_batches(mixed(1000), "acme", "uppercase", **options)
    transport.stuck = str(out["runflow_batch_id"].iloc[0])  # the oldest of ten
    with pytest.raises(DeadlineExceeded) as info:
        collect(out, deadline=1.0, poll_interval=FAST_POLL, **options)
    partial = info.value.result
    stuck = partial["runflow_batch_id"] == transport.stuck
    assert stuck.sum() == 100
    assert partial.loc[stuck, "runflow_status"].eq("running").all()
    # The other 900 rows ended, and each has its outcome.
    ended = partial.loc[~stuck]
    assert ended["runflow_status"].isin(["succeeded", "failed"]).all()
    done = ended["runflow_status"] == "succeeded"
    assert ended.loc[done, "runflow_output"].notna().all()


def test_collect_needs_handles() -> None:
    with pytest.raises(InputError, match="lacks"):
        collect(pd.DataFrame({"v": [1]}), api_key=API_KEY, base_url=LOCAL)


@pytest.mark.slow
def test_retry_failed_sends_only_the_failed_rows_once(
    tmp_path: Path, emulator: Emulator, base_url: str
) -> None:
    df = mixed(700)
    options: dict[str, Any] = {"base_url": base_url, "api_key": API_KEY, "checkpoint": tmp_path}
    done = run_batches(df, "acme", "uppercase", wait=True, **options)
    failed = done.index[done["runflow_status"] == "failed"]
    first_runs = emulator.accounting().runs_by_client_ref
    assert set(first_runs) == set(df.index)

    retried = retry_failed(done, "acme", "uppercase", wait=True, **options)
    runs = emulator.accounting().runs_by_client_ref
    assert {k: n for k, n in runs.items() if n == 2} == dict.fromkeys(failed, 2)
    assert (retried.loc[failed, "runflow_attempt"] == 2).all()
    assert (retried.loc[~retried.index.isin(failed), "runflow_attempt"] == 1).all()
    assert (retried.loc[failed, "runflow_run_id"] != done.loc[failed, "runflow_run_id"]).all()
    pd.testing.assert_series_equal(
        retried.loc[~retried.index.isin(failed), "runflow_run_id"],
        done.loc[~done.index.isin(failed), "runflow_run_id"],
    )
    # The same call again (say, after a crash) resumes attempt 2: nothing is sent a third time.
    retry_failed(done, "acme", "uppercase", wait=True, **options)
    assert emulator.accounting().runs_by_client_ref == runs


def test_summarize_a_frame_without_results() -> None:
    summary = summarize(pd.DataFrame({"v": [1, 2]}))
    assert summary.rows == 2
    assert summary.by_status == {"not collected": 2}
    assert summary.total_cost == 0


# -- callbacks -------------------------------------------------------------------------------------


def test_verify_signature() -> None:
    body = b'{"event":"batch.succeeded"}'
    good = sign(body, "whsec_new")
    assert verify_signature(body, good, "whsec_new")
    assert verify_signature(body, good, ["whsec_old", "whsec_new"])  # during a rotation
    assert not verify_signature(body, good, ["whsec_old"])
    assert not verify_signature(body + b" ", good, "whsec_new")  # the raw bytes, exactly
    assert not verify_signature(body, good.upper(), "whsec_new")  # 64 lowercase hex only
    assert not verify_signature(body, good[:-1], "whsec_new")
    assert not verify_signature(body, None, "whsec_new")
    # No secret at all is a misconfiguration, refused (tests/test_faces.py), not a False.


@contextmanager
def receiver(statuses: Iterator[int]) -> Iterator[tuple[str, list[tuple[bytes, dict[str, str]]]]]:
    """A real HTTP endpoint on loopback that records what it receives and answers with
    ``statuses`` in turn (then 200)."""
    received: list[tuple[bytes, dict[str, str]]] = []

    async def hook(request: Request) -> Response:
        received.append((await request.body(), dict(request.headers)))
        return Response(status_code=next(statuses, 200))

    app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    sock = _bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook", received
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


@pytest.mark.slow
def test_the_emulator_delivers_signed_batch_callbacks_and_retries(
    base_url: str, emulator: Emulator
) -> None:
    emulator.signing_secrets = ["whsec_old", "whsec_new"]  # the newest signs
    with receiver(iter([503])) as (hook_url, received):  # the first delivery fails
        options: dict[str, Any] = {"base_url": base_url, "api_key": API_KEY, "wait": True}
        out = run_batches(
            mixed(150), "acme", "uppercase", callback_url=hook_url, metadata={"job": 7}, **options
        )
        deadline = time.monotonic() + 10
        while len(received) < 3 and time.monotonic() < deadline:  # 2 batches + 1 retry
            time.sleep(0.02)
    by_batch: dict[str, list[bytes]] = {}
    for body, headers in received:
        assert verify_signature(body, headers.get("runflow-signature"), ["whsec_new"])
        assert not verify_signature(body, headers.get("runflow-signature"), ["whsec_old"])
        envelope = orjson.loads(body)
        by_batch.setdefault(envelope["batch_id"], []).append(body)
        assert envelope["event"] == f"batch.{envelope['status']}"
        assert envelope["metadata"] == {"job": 7}
        assert envelope["completed_at"].endswith("+00:00")
        assert envelope["output"]["total"] == len(envelope["output"]["items"])
    assert set(by_batch) == set(out["runflow_batch_id"])  # one callback per batch...
    retried = [bodies for bodies in by_batch.values() if len(bodies) > 1]
    assert len(retried) == 1  # ...the one answered 503 was delivered again,
    assert retried[0][0] == retried[0][1]  # with the same frozen bytes
    history = httpx.get(
        f"{base_url}/v1/batches/{next(iter(by_batch))}/callback",
        headers={"Authorization": f"Bearer {API_KEY}"},
    ).json()
    assert [d["status_code"] for d in history] == ["succeeded"]


@pytest.mark.slow
def test_collecting_rides_through_a_faulty_server(base_url: str, emulator: Emulator) -> None:
    from runflow_frames import RetryPolicy
    from runflow_frames.emulator import Faults

    df = mixed(1500)
    out = run_batches(df, "acme", "uppercase", base_url=base_url, api_key=API_KEY)
    emulator.faults = Faults(seed=4, rate_limited=0.15, server_error=0.15, reset_before=0.1)
    done = collect(
        out,
        base_url=base_url,
        api_key=API_KEY,
        poll_interval=FAST_POLL,
        retry=RetryPolicy(attempts=20, wait_initial=0.01, wait_max=0.05),
    )
    struck = emulator.accounting().faults
    assert sum(struck.values()) > 0
    assert done["runflow_status"].isin(["succeeded", "failed"]).all()
    ok = df["text"].map(lambda t: isinstance(t, str))
    assert (done.loc[ok, "runflow_status"] == "succeeded").all()
    assert done["runflow_output"].tolist() == [expected_output(r) for _, r in df.iterrows()]


@pytest.mark.slow
def test_progress_callbacks_count_rows_submitted_and_collected(base_url: str) -> None:
    seen: list[tuple[int, int]] = []
    run_batches(
        mixed(1234),
        "acme",
        "uppercase",
        base_url=base_url,
        api_key=API_KEY,
        wait=True,
        progress=lambda done, total: seen.append((done, total)),
    )
    submitted, collected = seen[:13], seen[13:]
    assert [d for d, _ in submitted] == sorted(d for d, _ in submitted)
    assert submitted[-1] == (1234, 1234)
    assert collected[-1] == (1234, 1234)
    assert all(total == 1234 for _, total in seen)


def test_progress_bar_goes_to_stderr_only_when_asked(
    base_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_batches(mixed(300), "acme", "uppercase", base_url=base_url, api_key=API_KEY)
    assert capsys.readouterr().err == ""  # not a terminal: quiet by default
    run_batches(mixed(300), "acme", "uppercase", base_url=base_url, api_key=API_KEY, progress=True)
    err = capsys.readouterr().err
    assert "submitted" in err
    assert "300/300" in err
