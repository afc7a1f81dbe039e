"""A retry that meets its own first try: a create still being processed on the server when the
client's timeout passes, or when its connection drops, against each way a server answers a
same-key request meanwhile (``Faults.in_flight``); counted on the server."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import orjson
import pandas as pd
import pytest

from runflow_frames import (
    ProtocolError,
    RequestInProgressError,
    RequestRejectedError,
    RetryPolicy,
    SubmissionError,
    run_batches,
)
from runflow_frames.emulator import Emulator, Faults, Timing, serve

from .conftest import API_KEY

FAST = RetryPolicy(attempts=12, wait_initial=0.01, wait_max=0.05, timeout=60)


def frame(rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"text": [f"t{i}" for i in range(rows)]}, index=[f"r{i}" for i in range(rows)]
    )


def assert_each_row_once(out: pd.DataFrame, emulator: Emulator) -> None:
    seen = emulator.accounting()
    assert seen.runs_by_client_ref == dict.fromkeys(out.index, 1), "a row was billed twice"
    received = {r["client_ref"]: r["run_id"] for r in emulator.received()}
    assert out["runflow_run_id"].to_dict() == received


@pytest.mark.slow
@pytest.mark.parametrize("in_flight", ["conflict", "wait", "process"])
@pytest.mark.parametrize("kept", [False, True], ids=["no-checkpoint", "checkpoint"])
def test_a_create_slower_than_the_timeout_is_waited_for_not_sent_twice(
    in_flight: str, kept: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Creates take 0.6 s on the server and the client's timeout is 0.2 s: each one is still
    # being processed when the timeout passes.
    emulator = Emulator(
        timing=Timing(create_latency=0.6, queued=0.01, running=0.01),
        faults=Faults(in_flight=in_flight),
    )
    with caplog.at_level(logging.WARNING, "runflow_frames"), serve(emulator) as url:
        out = run_batches(
            frame(500),
            "acme/echo",
            api_key=API_KEY,
            base_url=url,
            timeout=0.2,
            retry=FAST,
            checkpoint=tmp_path / "ck" if kept else None,
        )
    assert out["runflow_run_id"].notna().all()  # every row's handle, in one call
    assert_each_row_once(out, emulator)
    assert set(emulator.accounting().requests_by_idempotency_key.values()) == {1}
    said = [r.getMessage() for r in caplog.records if "still processing" in r.getMessage()]
    assert len(said) == 5  # one line per create, naming the client's timeout
    assert "timeout (0.2 s)" in said[0]
    took = [r.getMessage() for r in caplog.records if "answered after" in r.getMessage()]
    assert len(took) == 5  # and then how long the server took
    assert all(0.55 < float(t.split("answered after ")[1].split(" s")[0]) < 2 for t in took)


@pytest.mark.slow
@pytest.mark.parametrize("in_flight", ["conflict", "wait"])
def test_a_retry_after_a_hang_up_meets_its_first_try_and_gets_its_batch(
    in_flight: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection drops while the server processes the create (which goes on); the retry
    arrives while it is still in progress: a 409 "in use" is waited out, a held retry waited
    for, and both end with the first try's batch."""
    emulator = Emulator(
        timing=Timing(create_latency=0.4, queued=0.01, running=0.01),
        faults=Faults(hangup=0.5, seed=7, in_flight=in_flight, routes="create"),
    )
    with caplog.at_level(logging.WARNING, "runflow_frames"), serve(emulator) as url:
        out = run_batches(frame(1000), "acme/echo", api_key=API_KEY, base_url=url, retry=FAST)
    seen = emulator.accounting()
    assert seen.faults.get("hangup", 0) >= 2
    assert out["runflow_run_id"].notna().all()
    assert_each_row_once(out, emulator)
    assert seen.batches_created == 10
    assert seen.idempotent_replays >= 1  # hung-up creates ended with their first try's batch
    if in_flight == "conflict":
        assert any("still processing its first POST" in r.getMessage() for r in caplog.records)


def mock(*answers: httpx.Response) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A server answering creates with ``answers`` in turn; the requests it got."""
    got: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        got.append(request)
        return answers[min(len(got), len(answers)) - 1]

    return httpx.MockTransport(handler), got


def submit(transport: httpx.MockTransport, retry: RetryPolicy = FAST) -> pd.DataFrame:
    return run_batches(
        frame(3), "acme/echo", api_key=API_KEY, base_url="https://api.example",
        transport=transport, retry=retry,
    )  # fmt: skip


def created(rows: int) -> httpx.Response:
    items = [
        {"id": f"i{n}", "sequence_index": n, "run_id": f"run{n}", "status": "queued",
         "client_ref": f"r{n}"}
        for n in range(rows)
    ]  # fmt: skip
    return httpx.Response(201, json={"id": "b1", "status": "queued", "items": items})


def test_an_in_progress_409_is_waited_out_and_retried_with_the_same_key_and_bytes() -> None:
    in_use = httpx.Response(
        409,
        json={"code": "idempotency_key_in_use", "message": "request in progress"},
        headers={"Retry-After": "0.05"},
    )
    transport, got = mock(in_use, in_use, in_use, created(3))
    # One attempt allowed: "in progress" is no failed try, only "later".
    out = submit(transport, RetryPolicy(attempts=1, timeout=10))
    assert out["runflow_run_id"].tolist() == ["run0", "run1", "run2"]
    assert len(got) == 4
    assert len({r.headers["Idempotency-Key"] for r in got}) == 1
    assert len({r.content for r in got}) == 1


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(409, content=b""),  # a 409 that says nothing: may have been created
        httpx.Response(409, json={"code": "CONFLICT", "message": "key used with another body"}),
    ],
    ids=["unexplained", "another-body"],
)
def test_any_other_409_is_a_refusal_that_may_have_created_the_batch(answer: httpx.Response) -> None:
    transport, got = mock(answer)
    with pytest.raises(SubmissionError) as info:
        submit(transport)
    assert len(got) == 1  # not retried
    cause = info.value.__cause__
    assert isinstance(cause, RequestRejectedError)
    assert not isinstance(cause, RequestInProgressError)
    assert info.value.uncertain == 3  # kept pending: a resume replays it, never new rows


def test_an_oversized_answer_is_a_protocol_error_not_read_to_its_end() -> None:
    huge = httpx.Response(201, content=b'{"items": [' + b" " * (5 * 2**20) + b"]}")
    transport, got = mock(huge)
    with pytest.raises(SubmissionError) as info:
        submit(transport)
    assert isinstance(info.value.__cause__, ProtocolError)
    assert "over 4 MiB" in str(info.value.__cause__)
    assert len(got) == 1
    assert info.value.uncertain == 3


def test_the_emulator_answers_an_in_use_key_with_409_and_retry_after() -> None:
    import threading

    emulator = Emulator(timing=Timing(create_latency=0.5), faults=Faults(in_flight="conflict"))
    body = orjson.dumps({"input": [{"text": "a"}]})
    headers = {"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": "k1"}
    with serve(emulator) as url:
        first = threading.Thread(
            target=httpx.post, args=(f"{url}/v1/models/acme/echo/batches",),
            kwargs={"content": body, "headers": headers, "timeout": 5},
        )  # fmt: skip
        first.start()
        import time

        time.sleep(0.15)
        second = httpx.post(f"{url}/v1/models/acme/echo/batches", content=body, headers=headers)
        first.join()
        third = httpx.post(f"{url}/v1/models/acme/echo/batches", content=body, headers=headers)
    assert second.status_code == 409
    assert second.json()["code"] == "IDEMPOTENCY_KEY_IN_USE"
    assert second.headers["Retry-After"] == "1"
    assert third.status_code == 201  # the first one's replay
    assert emulator.accounting().batches_created == 1
    assert emulator.accounting().idempotent_replays == 1


@pytest.mark.slow
def test_an_oversized_answer_over_http_is_not_read_to_its_end() -> None:
    """Through the default transport, on a real socket: a server that trickles 100 MiB over
    2 s is given up on once 4 MiB came, not waited for to its end."""
    import time

    import anyio

    from .conftest import serve_app

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        assert callable(send)
        await send({"type": "http.response.start", "status": 201, "headers": []})
        for _ in range(100):
            await send({"type": "http.response.body", "body": b" " * 2**20, "more_body": True})
            await anyio.sleep(0.02)
        await send({"type": "http.response.body", "body": b""})

    with serve_app(app) as url:
        started = time.monotonic()
        with pytest.raises(SubmissionError) as info:
            run_batches(frame(3), "acme/echo", api_key=API_KEY, base_url=url, retry=FAST)
        took = time.monotonic() - started
    assert "over 4 MiB" in str(info.value.__cause__)
    assert took < 1.0  # about 5 chunks' time, not 100's
