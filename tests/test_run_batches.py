"""run_batches end to end against the emulator: real loopback HTTP, and in-process for speed."""

from __future__ import annotations

import asyncio
import logging
import traceback
from typing import Any

import anyio
import httpx
import numpy as np
import orjson
import pandas as pd
import pytest

from runflow_frames import (
    HANDLE_COLUMNS,
    APIConnectionError,
    AsyncRunflowClient,
    AuthenticationError,
    InputError,
    ProtocolError,
    RequestRejectedError,
    RetryPolicy,
    ServerError,
    SubmissionError,
    arun_batches,
    run_batches,
)
from runflow_frames.emulator import Emulator, Timing, create_app, serve

from .conftest import API_KEY, FirstWave, serve_app

LOCAL = "http://localhost"  # in-process tests: the transport answers, no socket
CREATE = "POST /v1/models/{model}/batches"


def frame(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"text": [f"t{i}" for i in range(n)], "n": np.arange(n), "f": np.linspace(0, 1, n)},
        index=pd.Index([f"k{i:04d}" for i in range(n)], name="key"),
    )


def server_view(emulator: Emulator) -> dict[str, dict[str, Any]]:
    """client_ref -> what the model received, straight from the emulator."""
    return {r["client_ref"]: r for r in emulator.received()}


def assert_run_ids_are_the_servers(out: pd.DataFrame, emulator: Emulator) -> None:
    received = server_view(emulator)
    for key, run_id in out["runflow_run_id"].items():
        assert run_id == received[str(key)]["run_id"]


def test_every_row_gets_its_own_handle_over_real_http(emulator: Emulator, base_url: str) -> None:
    df = frame(1234)
    out = run_batches(df, "acme", "echo", base_url=base_url, api_key=API_KEY)

    # The input comes back untouched: index, order, columns, values.
    pd.testing.assert_frame_equal(out[df.columns], df)
    assert list(out.columns) == [*df.columns, *HANDLE_COLUMNS]
    # The server saw each row exactly once, with exactly the row's values.
    seen = emulator.accounting()
    assert seen.runs_by_client_ref == dict.fromkeys(df.index, 1)
    assert seen.requests_by_route == {CREATE: 13}
    received = server_view(emulator)
    for key, row in df.iterrows():
        assert received[str(key)]["input"] == {"text": row["text"], "n": row["n"], "f": row["f"]}
    # Each row's handle is the server's record for that row.
    for key, row in out.iterrows():
        r = received[str(key)]
        assert (row["runflow_run_id"], row["runflow_item_id"], row["runflow_batch_id"]) == (
            r["run_id"],
            r["item_id"],
            r["batch_id"],
        )
        assert row["runflow_sequence_index"] == r["sequence_index"]
        assert row["runflow_client_ref"] == key
    assert set(out["runflow_status"]) == {"queued"}
    assert out["runflow_batch_id"].value_counts().max() == 100


def test_key_column_columns_and_chunk_size(emulator: Emulator, asgi: httpx.ASGITransport) -> None:
    df = pd.DataFrame({"id": [10, 20, 30], "a": [1, 2, 3], "b": ["x", "y", "z"], "c": [0.5] * 3})
    out = run_batches(
        df,
        "acme",
        "echo",
        key="id",
        columns=["b", "a"],
        chunk_size=2,
        api_key=API_KEY,
        transport=asgi,
        base_url=LOCAL,
    )
    assert list(out["runflow_client_ref"]) == ["10", "20", "30"]
    received = server_view(emulator)
    assert received["20"]["input"] == {"b": "y", "a": 2}
    assert emulator.accounting().batches_created == 2
    assert out.index.equals(df.index)


def test_rows_are_encoded_as_their_chunks_go(
    emulator: Emulator, asgi: httpx.ASGITransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first request leaves once its group is made, one chunk per request in flight (the
    next group, twice as many, may be on its way): not a whole frame, nor a full group of 64
    chunks encoded. The rest is encoded ahead in blocks that a chunk size of 30 does not
    divide, and every row still goes once, as it is."""
    import runflow_frames._items as items_module

    encoded: list[int] = []
    real = items_module.encode_rows

    def counting(df: pd.DataFrame, *args: Any, **kwargs: Any) -> list[bytes]:
        encoded.append(len(df))
        return real(df, *args, **kwargs)

    monkeypatch.setattr(items_module, "encode_rows", counting)
    at_first_request: list[int] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if not at_first_request:
            at_first_request.append(sum(encoded))
        return await asgi.handle_async_request(request)

    df = frame(12_000)
    out = run_batches(
        df,
        "acme",
        "echo",
        chunk_size=30,
        max_concurrency=4,
        api_key=API_KEY,
        transport=httpx.MockTransport(handler),
        base_url=LOCAL,
    )
    assert at_first_request[0] <= (4 + 8) * 30
    assert sum(encoded) == len(df)  # each row once
    received = server_view(emulator)
    assert emulator.accounting().runs_by_client_ref == dict.fromkeys(df.index, 1)
    for key, row in df.iterrows():
        assert received[str(key)]["input"] == {"text": row["text"], "n": row["n"], "f": row["f"]}
    assert_run_ids_are_the_servers(out, emulator)


def test_a_frame_changed_while_its_job_runs_is_sent_as_it_was(
    emulator: Emulator, asgi: httpx.ASGITransport
) -> None:
    """Rows are encoded as they go, so the job keeps its own view of the frame: a change the
    caller makes to it meanwhile (a notebook cell while the job runs as a task) is not sent."""
    df = frame(12_000)
    original = df.copy()
    changed: list[bool] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if not changed:  # the first request is out: change every value in place
            df.loc[:, "text"] = "changed"
            changed.append(True)
        return await asgi.handle_async_request(request)

    run_batches(
        df,
        "acme",
        "echo",
        max_concurrency=2,
        api_key=API_KEY,
        transport=httpx.MockTransport(handler),
        base_url=LOCAL,
    )
    assert changed
    assert (df["text"] == "changed").all()
    received = server_view(emulator)
    assert len(received) == len(df)
    for key, text in original["text"].items():
        assert received[str(key)]["input"]["text"] == text


def test_metadata_and_callback_url_go_on_every_batch(
    emulator: Emulator, http: httpx.Client, base_url: str
) -> None:
    out = run_batches(
        frame(250),
        "acme",
        "echo",
        metadata={"job": "nightly", "n": 1},
        callback_url="https://example.com/hook",
        base_url=base_url,
        api_key=API_KEY,
    )
    batch_ids = out["runflow_batch_id"].unique()
    assert len(batch_ids) == 3
    for batch_id in batch_ids:
        batch = http.get(f"/v1/batches/{batch_id}").json()
        assert batch["metadata"] == {"job": "nightly", "n": 1}
        assert batch["callback_url"] == "https://example.com/hook"


def test_three_segment_model_path(emulator: Emulator, asgi: httpx.ASGITransport) -> None:
    df = pd.DataFrame({"prompt": ["a", "b"]})
    out = run_batches(df, "acme", "image/edit", api_key=API_KEY, transport=asgi, base_url=LOCAL)
    assert out["runflow_run_id"].notna().all()
    assert emulator.accounting().requests_by_route == {CREATE: 1}


def test_works_from_inside_a_running_event_loop(emulator: Emulator, base_url: str) -> None:
    async def notebook_cell() -> pd.DataFrame:
        asyncio.get_running_loop()  # a loop is running here, as in Jupyter
        return run_batches(frame(300), "acme", "echo", base_url=base_url, api_key=API_KEY)

    out = asyncio.run(notebook_cell())
    assert out["runflow_run_id"].notna().all()
    assert len(emulator.accounting().runs_by_client_ref) == 300


def test_async_api(emulator: Emulator, asgi: httpx.ASGITransport) -> None:
    async def main() -> pd.DataFrame:
        return await arun_batches(
            frame(120), "acme", "echo", api_key=API_KEY, transport=asgi, base_url=LOCAL
        )

    out = anyio.run(main)
    assert out["runflow_run_id"].notna().all()
    assert emulator.accounting().batches_created == 2


def test_pipeline_keeps_max_concurrency_requests_in_flight(emulator: Emulator) -> None:
    emulator.timing = Timing(create_latency=0.05)
    # The server holds the first creates until 5 are in flight together: reaching 5 does not
    # hang on requests overlapping by chance, and a sixth would be seen arriving.
    gate = FirstWave(create_app(emulator), size=5)
    with serve_app(gate) as url:
        out = run_batches(
            frame(3000), "acme", "echo", max_concurrency=5, base_url=url, api_key=API_KEY
        )
    assert out["runflow_run_id"].notna().all()
    assert gate.most_in_flight == 5
    assert emulator.accounting().max_creates_in_flight <= 5


def test_environment_variables_configure_the_client(
    emulator: Emulator, base_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNFLOW_API_KEY", API_KEY)
    monkeypatch.setenv("RUNFLOW_BASE_URL", base_url)
    out = run_batches(frame(3), "acme", "echo")
    assert out["runflow_run_id"].notna().all()


# -- bad input: a clear error, and the server receives nothing ----------------------------------


@pytest.mark.parametrize(
    ("df", "kwargs", "message"),
    [
        (pd.DataFrame({"v": [1, 2]}, index=["a", "a"]), {}, "not unique"),
        (pd.DataFrame({"v": [1, 2]}, index=["a", None]), {}, "null key"),
        (pd.DataFrame({"v": [1.0, np.inf]}, index=["a", "b"]), {}, "column 'v'.*'b'"),
        (pd.DataFrame({"v": [b"x", "y"]}), {}, "bytes"),
        (frame(2), {"chunk_size": 0}, "chunk_size"),
        (frame(2), {"chunk_size": 101}, "chunk_size"),
        (frame(2), {"max_concurrency": 0}, "max_concurrency"),
        (frame(2), {"missing": "drop"}, "missing"),
        (frame(2), {"metadata": [1]}, "metadata"),
        (frame(2), {"callback_url": "https://x/" + "a" * 2048}, "callback_url"),
        (frame(2), {"key": "nope"}, "not in the frame"),
        (frame(2), {"columns": ["nope"]}, "not in the frame"),
        (frame(2).assign(runflow_run_id="x"), {}, "runflow_run_id"),
        (frame(2), {"slug": "echo/../x"}, "segment"),
        (frame(2), {"slug": ""}, "segment"),
        (frame(2), {"api_key": ""}, "API key"),
        (frame(2), {"base_url": "http://api.example.com"}, "https://"),
        (frame(2), {"timeout": 0}, "timeout"),
        ([{"v": 1}], {}, "DataFrame"),
    ],
)
def test_bad_input_is_refused_before_any_request(
    emulator: Emulator, base_url: str, df: Any, kwargs: dict[str, Any], message: str
) -> None:
    options: dict[str, Any] = {"base_url": base_url, "api_key": API_KEY, "slug": "echo", **kwargs}
    slug = options.pop("slug")
    with pytest.raises(InputError, match=message):
        run_batches(df, "acme", slug, **options)
    assert emulator.accounting().requests_by_route == {}


def test_missing_api_key_is_refused(base_url: str, emulator: Emulator) -> None:
    with pytest.raises(InputError, match="RUNFLOW_API_KEY"):
        run_batches(frame(1), "acme", "echo", base_url=base_url)
    assert emulator.accounting().requests_by_route == {}


def test_empty_frame_returns_empty_result_without_requests(
    emulator: Emulator, base_url: str
) -> None:
    out = run_batches(frame(0), "acme", "echo", base_url=base_url, api_key=API_KEY)
    assert len(out) == 0
    assert list(out.columns)[-len(HANDLE_COLUMNS) :] == list(HANDLE_COLUMNS)
    assert emulator.accounting().requests_by_route == {}


# -- errors during a job ------------------------------------------------------------------------


def test_401_stops_the_job_with_an_auth_error_and_hides_the_key(base_url: str) -> None:
    emulator = Emulator(api_keys={"the-right-one"})
    with serve(emulator) as url, pytest.raises(SubmissionError) as info:
        run_batches(frame(500), "acme", "echo", base_url=url, api_key=API_KEY, max_concurrency=2)
    err = info.value
    assert isinstance(err.__cause__, AuthenticationError)
    assert err.__cause__.status_code == 401
    assert err.submitted == 0
    assert err.not_submitted == 500
    assert err.result["runflow_run_id"].isna().all()
    # After the first failure no new chunk starts: at most the in-flight ones were sent.
    assert emulator.accounting().requests_by_route[CREATE] <= 2
    text = "".join(traceback.format_exception(err)) + repr(err) + repr(err.__cause__)
    assert API_KEY not in text


def test_unknown_model_is_rejected(base_url: str) -> None:
    with pytest.raises(SubmissionError) as info:
        run_batches(frame(5), "acme", "nope", base_url=base_url, api_key=API_KEY)
    assert isinstance(info.value.__cause__, RequestRejectedError)
    assert info.value.__cause__.status_code == 404
    assert info.value.__cause__.code == "MODEL_NOT_FOUND"


class FailNthCreate(httpx.AsyncBaseTransport):
    """The emulator in-process, except that the n-th create POST answers 500 unprocessed."""

    def __init__(self, emulator: Emulator, n: int) -> None:
        self.inner = httpx.ASGITransport(app=create_app(emulator))
        self.n = n
        self.creates = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            self.creates += 1
            if self.creates == self.n:
                return httpx.Response(
                    500, json={"code": "INTERNAL", "message": "boom", "errors": None}
                )
        return await self.inner.handle_async_request(request)


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_failure_mid_job_keeps_every_submitted_handle(
    emulator: Emulator, concurrency: int
) -> None:
    df = frame(1000)
    with pytest.raises(SubmissionError) as info:
        run_batches(
            df,
            "acme",
            "echo",
            max_concurrency=concurrency,
            api_key=API_KEY,
            base_url=LOCAL,
            transport=FailNthCreate(emulator, 4),
            retry=RetryPolicy(attempts=1),
        )
    err = info.value
    assert isinstance(err.__cause__, ServerError)
    # Requests in flight when the 4th failed finish, and their handles are kept.
    assert err.submitted >= 300
    assert err.submitted + err.not_submitted == 1000
    assert f"{err.submitted} submitted" in str(err)
    assert f"{err.not_submitted} of 1000" in str(err)
    assert err.uncertain == 100  # a 500 may have been processed
    if concurrency == 1:
        assert err.submitted == 300
    result = err.result
    pd.testing.assert_frame_equal(result[df.columns], df)
    submitted = result[result["runflow_run_id"].notna()]
    received = server_view(emulator)
    assert set(submitted.index) == set(received)
    for key, row in submitted.iterrows():
        assert row["runflow_run_id"] == received[str(key)]["run_id"]


class Tamper(httpx.AsyncBaseTransport):
    """Forwards to the emulator, then rewrites the create response's items."""

    def __init__(self, emulator: Emulator, edit: Any) -> None:
        self.inner = httpx.ASGITransport(app=create_app(emulator))
        self.edit = edit

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method != "POST":
            return response
        body = orjson.loads(await response.aread())
        self.edit(body["items"])
        return httpx.Response(201, content=orjson.dumps(body))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda items: items.pop(), "missing"),
        (lambda items: items.append(dict(items[0])), "came back twice"),
        (lambda items: items[0].update(client_ref="intruder"), "unexpected"),
        (lambda items: items[0].pop("run_id"), "no id or run_id"),
        (lambda items: items[0].pop("client_ref"), "no client_ref"),
        (lambda items: items[0].update(client_ref=items[0]["client_ref"] + " "), "unexpected"),
    ],
)
def test_handles_that_do_not_match_are_an_error_not_a_misjoin(
    emulator: Emulator, edit: Any, message: str
) -> None:
    with pytest.raises(SubmissionError) as info:
        run_batches(
            frame(10),
            "acme",
            "echo",
            api_key=API_KEY,
            base_url=LOCAL,
            transport=Tamper(emulator, edit),
        )
    assert isinstance(info.value.__cause__, ProtocolError)
    assert message in str(info.value.__cause__)
    assert info.value.result["runflow_run_id"].isna().all()
    # The server did create the batch: those rows are reported as uncertain, not as unsent.
    assert emulator.accounting().batches_created == 1
    assert info.value.uncertain == 10
    assert "could run them twice" in str(info.value)


def test_handles_are_joined_by_client_ref_not_by_position(emulator: Emulator) -> None:
    df = frame(250)
    out = run_batches(
        df,
        "acme",
        "echo",
        api_key=API_KEY,
        base_url=LOCAL,
        transport=Tamper(emulator, lambda items: items.reverse()),
    )
    assert_run_ids_are_the_servers(out, emulator)


class LastFirst(httpx.AsyncBaseTransport):
    """Forwards to the emulator; each create answers later the earlier it was sent, so the
    answers end in the reverse of the chunk order."""

    def __init__(self, emulator: Emulator, creates: int) -> None:
        self.inner = httpx.ASGITransport(app=create_app(emulator))
        self.left = creates

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            self.left -= 1
            await anyio.sleep(0.02 * self.left)
        return await self.inner.handle_async_request(request)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_answers_ending_out_of_chunk_order_join_to_their_rows(
    emulator: Emulator, tmp_path: Any, checkpointed: bool
) -> None:
    df = frame(500)
    out = run_batches(
        df,
        "acme",
        "echo",
        api_key=API_KEY,
        base_url=LOCAL,
        max_concurrency=5,
        checkpoint=tmp_path / "ckpt" if checkpointed else None,
        transport=LastFirst(emulator, creates=5),
    )
    assert [r["client_ref"] for r in emulator.received()][:100] == [
        f"k{i:04d}" for i in range(400, 500)
    ]
    assert list(out.index) == list(df.index)
    assert_run_ids_are_the_servers(out, emulator)
    if checkpointed:  # the same rows in another order: nothing sent, each still its own handle
        asgi = httpx.ASGITransport(app=create_app(emulator))
        ckpt = tmp_path / "ckpt"
        again = run_batches(
            df.iloc[::-1],
            "acme",
            "echo",
            api_key=API_KEY,
            base_url=LOCAL,
            checkpoint=ckpt,
            transport=asgi,
        )
        assert emulator.accounting().batches_created == 5
        assert_run_ids_are_the_servers(again, emulator)


def test_a_body_that_cannot_be_decoded_is_a_protocol_error(emulator: Emulator) -> None:
    class Garbled(httpx.AsyncBaseTransport):
        inner = httpx.ASGITransport(app=create_app(emulator))

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            await self.inner.handle_async_request(request)
            return httpx.Response(201, headers={"Content-Encoding": "gzip"}, content=b"not gzip")

    with pytest.raises(SubmissionError) as info:
        run_batches(
            frame(5),
            "acme",
            "echo",
            api_key=API_KEY,
            base_url=LOCAL,
            transport=Garbled(),
            retry=RetryPolicy(attempts=2, wait_initial=0),
        )
    assert isinstance(info.value.__cause__, ProtocolError)
    assert info.value.uncertain == 5


def test_connection_refused_is_a_connection_error() -> None:
    with serve(Emulator()) as url:
        pass  # the port is closed again
    with pytest.raises(SubmissionError) as info:
        run_batches(
            frame(3),
            "acme",
            "echo",
            base_url=url,
            api_key=API_KEY,
            retry=RetryPolicy(attempts=3, wait_initial=0.01),
        )
    assert isinstance(info.value.__cause__, APIConnectionError)


def test_the_key_never_appears_in_reprs_or_logs(
    base_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = AsyncRunflowClient(api_key=API_KEY, base_url=base_url)
    assert API_KEY not in repr(client)
    assert API_KEY not in str(client)
    run_batches(frame(150), "acme", "echo", base_url=base_url, api_key=API_KEY)
    assert caplog.records  # the request log is on at DEBUG
    assert all(API_KEY not in r.getMessage() for r in caplog.records)


def test_org_id_header_is_sent(emulator: Emulator) -> None:
    seen: list[str | None] = []
    inner = httpx.ASGITransport(app=create_app(emulator))

    class Spy(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            seen.append(request.headers.get("x-organization-id"))
            assert request.headers["authorization"] == f"Bearer {API_KEY}"
            assert request.headers["idempotency-key"].startswith("rff-")
            return await inner.handle_async_request(request)

    run_batches(
        frame(3), "acme", "echo", api_key=API_KEY, org_id="org-1", base_url=LOCAL, transport=Spy()
    )
    assert seen == ["org-1"]


@pytest.mark.parametrize("bad_key", [API_KEY + "\n", " " + API_KEY, f'"{API_KEY}"', "rf-live!"])
def test_a_malformed_key_is_refused_without_echoing_it(
    base_url: str, emulator: Emulator, bad_key: str
) -> None:
    with pytest.raises(InputError, match="stray newline") as info:
        run_batches(frame(3), "acme", "echo", base_url=base_url, api_key=bad_key)
    assert bad_key.strip() not in "".join(traceback.format_exception(info.value))
    assert emulator.accounting().requests_by_route == {}


def test_a_timeout_after_the_server_processed_is_reported_as_uncertain(
    emulator: Emulator, base_url: str
) -> None:
    emulator.timing = Timing(create_latency=0.5)
    with pytest.raises(SubmissionError) as info:
        run_batches(
            frame(300),
            "acme",
            "echo",
            base_url=base_url,
            api_key=API_KEY,
            timeout=0.2,
            # A create is waited for up to half the policy's time (0.3 s) past its 0.2-s
            # timeout, and gives up still short of the server's 0.5 s.
            retry=RetryPolicy(attempts=1, timeout=0.6),
        )
    err = info.value
    assert isinstance(err.__cause__, APIConnectionError)
    assert err.not_submitted == 300
    assert err.uncertain == 300
    assert "could run them twice" in str(err)
    assert "checkpoint=" in str(err)


def test_a_pyarrow_table_in_gives_a_table_out(
    emulator: Emulator, asgi: httpx.ASGITransport
) -> None:
    import pyarrow as pa

    table = pa.table(
        {
            "id": ["a", "b", "c"],
            "tags": [["x"], [], ["y", "z"]],
            "n": pa.array([1, None, 3], pa.int64()),
        }
    )
    out = run_batches(
        table, "acme", "echo", key="id", api_key=API_KEY, base_url=LOCAL, transport=asgi
    )
    assert isinstance(out, pa.Table)
    assert out.column_names[:3] == ["id", "tags", "n"]
    assert out["runflow_client_ref"].to_pylist() == ["a", "b", "c"]
    received = server_view(emulator)
    assert received["b"]["input"] == {"tags": []}
    assert received["c"]["input"] == {"tags": ["y", "z"], "n": 3}
    assert out["runflow_run_id"].to_pylist() == [received[k]["run_id"] for k in "abc"]


@pytest.mark.slow
def test_a_polars_frame_in_gives_a_polars_frame_out(emulator: Emulator, base_url: str) -> None:
    import polars as pl

    frame = pl.DataFrame({"text": ["a", "b", "c"], "repeat": [1, 2, 3]})
    out = run_batches(frame, "acme", "uppercase", api_key=API_KEY, base_url=base_url, wait=True)
    assert isinstance(out, pl.DataFrame)
    assert out["runflow_client_ref"].to_list() == ["0", "1", "2"]
    assert out["runflow_status"].to_list() == ["succeeded"] * 3
    assert [o["text"] for o in out["runflow_output"].to_list()] == ["A", "BB", "CCC"]


@pytest.mark.parametrize("kind", ["arrow", "polars"])
def test_summarize_collect_and_retry_failed_take_and_give_polars_and_arrow(
    kind: str, emulator: Emulator, asgi: httpx.ASGITransport
) -> None:
    import polars as pl
    import pyarrow as pa

    from runflow_frames import collect, retry_failed, summarize

    # The last row's output would pass 64 KiB: its run fails.
    frame: Any = pa.table({"text": ["a", "b", "c", "d" * 1000], "repeat": [1, 2, 3, 100]})
    kind_of: type = pa.Table
    if kind == "polars":
        frame, kind_of = pl.from_arrow(frame), pl.DataFrame
    options: dict[str, Any] = {"api_key": API_KEY, "base_url": LOCAL, "transport": asgi}
    out = run_batches(frame, "acme", "uppercase", **options)
    done = collect(out, poll_interval=(0.01, 0.05), **options)
    assert isinstance(done, kind_of)
    summary = summarize(done)
    assert (summary.rows, summary.by_status) == (4, {"succeeded": 3, "failed": 1})
    assert summary.total_cost > 0
    again = retry_failed(done, "acme", "uppercase", **options)
    assert isinstance(again, kind_of)
    attempts = again["runflow_attempt"]
    assert (attempts.to_pylist() if kind == "arrow" else attempts.to_list()) == [1, 1, 1, 2]
    # Only the failed row was sent again.
    runs = emulator.accounting().runs_by_client_ref
    assert sorted(runs.values()) == [1, 1, 1, 2]


def test_an_arrow_map_goes_out_as_an_object_and_a_repeated_key_is_refused(
    emulator: Emulator, asgi: httpx.ASGITransport
) -> None:
    import pyarrow as pa

    scores = pa.map_(pa.string(), pa.int64())
    table = pa.table(
        {
            "id": ["a", "b", "c"],
            "scores": pa.array([[("x", 1), ("y", 2)], [], None], scores),
            "nested": pa.array([[{"m": [("k", 1)]}], [], []], pa.list_(pa.struct([("m", scores)]))),
        }
    )
    options: dict[str, Any] = {"api_key": API_KEY, "base_url": LOCAL, "transport": asgi}
    run_batches(table, "acme", "echo", key="id", **options)
    received = server_view(emulator)
    assert received["a"]["input"] == {"scores": {"x": 1, "y": 2}, "nested": [{"m": {"k": 1}}]}
    assert received["b"]["input"] == {"scores": {}, "nested": []}
    assert received["c"]["input"] == {"nested": []}  # a missing map: omitted, like any value
    twice = pa.table({"id": ["d"], "scores": pa.array([[("x", 1), ("x", 2)]], scores)})
    with pytest.raises(InputError, match=r"column 'scores'.*repeats a key.*'d'"):
        run_batches(twice, "acme", "echo", key="id", **options)
    assert len(server_view(emulator)) == 3  # nothing more was sent


def test_the_pandas_accessor_runs_collects_retries_and_summarizes(
    emulator: Emulator, asgi: httpx.ASGITransport
) -> None:
    options: dict[str, Any] = {"api_key": API_KEY, "base_url": LOCAL, "transport": asgi}
    df = pd.DataFrame(
        {"text": ["a", "b", "c" * 1000], "repeat": [1, 2, 100]}, index=["x", "y", "z"]
    )
    out = df.runflow.run("acme/uppercase", **options)
    assert out["runflow_run_id"].notna().all()
    done = out.runflow.collect(poll_interval=(0.01, 0.05), **options)
    assert done.loc["x", "runflow_output"] == {"text": "A"}
    assert done.runflow.summary().by_status == {"succeeded": 2, "failed": 1}
    again = done.runflow.retry_failed("acme/uppercase", **options)
    assert again["runflow_attempt"].tolist() == [1, 1, 2]
    assert emulator.accounting().runs_by_client_ref == {"x": 1, "y": 1, "z": 2}


def test_a_sync_call_never_formats_its_result(
    emulator: Emulator, asgi: httpx.ASGITransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.11's asyncio, restoring the SIGINT handler at the end of a run, formats the
    main task's result (twice): a frame's repr costs milliseconds, so it must not be that."""
    formatted: list[int] = []
    real = pd.DataFrame.__repr__

    def counting(self: pd.DataFrame) -> str:
        formatted.append(len(self))
        return real(self)

    monkeypatch.setattr(pd.DataFrame, "__repr__", counting)
    out = run_batches(frame(30), "acme", "echo", api_key=API_KEY, base_url=LOCAL, transport=asgi)
    assert out["runflow_run_id"].notna().all()
    assert formatted == []
