"""Sequences a review found could break the promise (no duplicate run, no lost or misjoined row);
each test is one of them, against the emulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pandas as pd
import pytest

from runflow_frames import (
    CheckpointError,
    ProtocolError,
    RetryPolicy,
    SubmissionError,
    collect,
    read_checkpoint,
    retry_failed,
    run_batches,
)
from runflow_frames.emulator import Emulator, Faults, create_app, serve

from .conftest import API_KEY

ONE_TRY = RetryPolicy(attempts=1)


def frame(n: int) -> pd.DataFrame:
    text: list[Any] = [f"row {i}" if i % 7 else i for i in range(n)]
    return pd.DataFrame({"text": text}, index=[f"k{i:05d}" for i in range(n)])


def once_each(emulator: Emulator, df: pd.DataFrame) -> None:
    assert emulator.accounting().runs_by_client_ref == dict.fromkeys(df.index, 1)


def test_a_4xx_on_a_resent_pending_chunk_never_leads_to_a_duplicate(tmp_path: Path) -> None:
    emulator = Emulator()
    df = frame(300)
    options: dict[str, Any] = {"api_key": API_KEY, "checkpoint": tmp_path, "max_concurrency": 1}
    with serve(emulator) as url:
        # Run 1: the server creates the first chunk, the answer is lost (then the job stops).
        emulator.faults = Faults(reset_after=1.0, routes="create")
        with pytest.raises(SubmissionError):
            run_batches(df, "acme", "uppercase", base_url=url, retry=ONE_TRY, **options)
        # Run 2: the re-send of that pending chunk is refused with a 4xx.
        emulator.faults = Faults(rejected=1.0, routes="create")
        with pytest.raises(SubmissionError):
            run_batches(df, "acme", "uppercase", base_url=url, retry=ONE_TRY, **options)
        assert read_checkpoint(tmp_path).attrs["progress"]["rows_pending"] == 100  # still
        # Run 3, healthy: the pending chunk is replayed, never created again.
        emulator.faults = None
        out = run_batches(df, "acme", "uppercase", base_url=url, **options)
    assert out["runflow_run_id"].notna().all()
    once_each(emulator, df)


def test_reordered_metadata_is_a_different_job(
    tmp_path: Path, emulator: Emulator, base_url: str
) -> None:
    df = frame(10)
    run_batches(
        df,
        "acme",
        "uppercase",
        base_url=base_url,
        api_key=API_KEY,
        checkpoint=tmp_path,
        metadata={"a": 1, "b": 2},
    )
    for other in ({"b": 2, "a": 1}, {"a": 1.0, "b": 2}):
        with pytest.raises(CheckpointError, match="metadata"):
            run_batches(
                df,
                "acme",
                "uppercase",
                base_url=base_url,
                api_key=API_KEY,
                checkpoint=tmp_path,
                metadata=other,
            )


def test_pending_chunks_are_not_resent_under_another_api_key(tmp_path: Path) -> None:
    emulator = Emulator()
    df = frame(200)
    with serve(emulator) as url:
        emulator.faults = Faults(reset_after=1.0, routes="create")
        with pytest.raises(SubmissionError):
            run_batches(
                df,
                "acme",
                "uppercase",
                base_url=url,
                api_key=API_KEY,
                checkpoint=tmp_path,
                retry=ONE_TRY,
                max_concurrency=1,
            )
        emulator.faults = None
        with pytest.raises(CheckpointError, match="another API key"):
            run_batches(
                df, "acme", "uppercase", base_url=url, api_key="rf_live_other", checkpoint=tmp_path
            )
        out = run_batches(
            df, "acme", "uppercase", base_url=url, api_key=API_KEY, checkpoint=tmp_path
        )
        # With nothing pending, a new key is fine: only new chunks go out under it.
        grown = pd.concat([df, frame(250).iloc[200:]])
        again = run_batches(
            grown, "acme", "uppercase", base_url=url, api_key="rf_live_other", checkpoint=tmp_path
        )
    assert out["runflow_run_id"].notna().all()
    assert again["runflow_run_id"].notna().all()
    once_each(emulator, grown)  # the 200 recorded rows were not sent again under the new key
    assert API_KEY.encode() not in (tmp_path / "manifest.json").read_bytes()


class PerBatchIds(httpx.AsyncBaseTransport):
    """A server whose item ids are unique only within their batch ("0", "1", ...)."""

    def __init__(self, emulator: Emulator) -> None:
        self.inner = httpx.ASGITransport(app=create_app(emulator))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        path = request.url.path
        if response.status_code >= 300 or not (path.endswith(("/batches", "/items"))):
            return response
        body = orjson.loads(await response.aread())
        for item in body["items"]:
            item["id"] = str(item["sequence_index"])
        return httpx.Response(response.status_code, content=orjson.dumps(body))


def test_item_ids_unique_only_per_batch_are_joined_right(emulator: Emulator) -> None:
    df = frame(250)
    transport = PerBatchIds(emulator)
    options: dict[str, Any] = {
        "api_key": API_KEY,
        "base_url": "http://localhost",
        "transport": transport,
    }
    out = run_batches(df, "acme", "uppercase", **options)
    assert out["runflow_item_id"].duplicated().any()
    done = collect(out, poll_interval=(0.05, 0.2), **options)
    for key, text in df["text"].items():
        expected = {"text": text.upper()} if isinstance(text, str) else None
        assert done.at[key, "runflow_output"] == expected


def test_collect_refuses_items_that_come_back_for_another_row(emulator: Emulator) -> None:
    class Swapped(PerBatchIds):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            response = await self.inner.handle_async_request(request)
            if not request.url.path.endswith("/items"):
                return response
            body = orjson.loads(await response.aread())
            a, b = body["items"][0], body["items"][1]
            a["client_ref"], b["client_ref"] = b["client_ref"], a["client_ref"]
            return httpx.Response(200, content=orjson.dumps(body))

    options: dict[str, Any] = {
        "api_key": API_KEY,
        "base_url": "http://localhost",
        "transport": Swapped(emulator),
    }
    out = run_batches(frame(50), "acme", "uppercase", **options)
    with pytest.raises(ProtocolError, match="another row's client_ref"):
        collect(out, poll_interval=(0.05, 0.2), **options)


def test_collect_from_a_checkpoint_shows_pending_rows(tmp_path: Path) -> None:
    emulator = Emulator()
    df = frame(300)
    with serve(emulator) as url:
        emulator.faults = Faults(reset_after=1.0, routes="create")
        with pytest.raises(SubmissionError):
            run_batches(
                df,
                "acme",
                "uppercase",
                base_url=url,
                api_key=API_KEY,
                checkpoint=tmp_path,
                retry=ONE_TRY,
                max_concurrency=1,
            )
        emulator.faults = None
        out = collect(tmp_path, base_url=url, api_key=API_KEY, poll_interval=(0.05, 0.2))
    assert (out["runflow_status"] == "pending").sum() == 100
    assert len(out) == 100


def test_a_frame_with_repeated_rows_collects(emulator: Emulator, base_url: str) -> None:
    out = run_batches(frame(150), "acme", "uppercase", base_url=base_url, api_key=API_KEY)
    doubled = pd.concat([out, out.iloc[:10]])
    done = collect(doubled, base_url=base_url, api_key=API_KEY, poll_interval=(0.05, 0.2))
    assert len(done) == 160
    assert done["runflow_status"].notna().all()


def test_retry_failed_without_waiting_clears_the_old_outcome(
    tmp_path: Path, emulator: Emulator, base_url: str
) -> None:
    options: dict[str, Any] = {"base_url": base_url, "api_key": API_KEY, "checkpoint": tmp_path}
    done = run_batches(frame(70), "acme", "uppercase", wait=True, **options)
    failed = done["runflow_status"] == "failed"
    again = retry_failed(done, "acme", "uppercase", **options)
    assert (again.loc[failed, "runflow_status"] == "queued").all()
    for column in (
        "runflow_failure_code",
        "runflow_cost",
        "runflow_completed_at",
        "runflow_output",
    ):
        assert again.loc[failed, column].isna().all(), column
    assert again.loc[~failed, "runflow_failure_code"].isna().all()
    assert (again.loc[~failed, "runflow_status"] == "succeeded").all()
