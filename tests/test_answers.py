"""What the server says, distrusted: its text is redacted before it is shown anywhere, and a
malformed answer is checked before it is kept, so that it never fails a collect, nor (from the
checkpoint's cache) every later one."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import orjson
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

import runflow_frames
from runflow_frames._client import AsyncRunflowClient, redact
from runflow_frames._errors import APIStatusError
from runflow_frames._polling import (
    OUTCOME_COLUMNS,
    PollPolicy,
    canonical_timestamp,
    collect_items,
    finish_columns,
    outcome_values,
    results_frame,
)
from runflow_frames._retry import RetryPolicy
from runflow_frames.emulator import Emulator, serve

from .conftest import API_KEY


def outcome_row(item: dict[str, Any]) -> dict[str, Any]:
    """``outcome_values`` by column name."""
    return dict(zip(OUTCOME_COLUMNS, outcome_values(item), strict=True))


FAST_POLL = (0.05, 0.2)
FAST = RetryPolicy(attempts=3, wait_initial=0.005, wait_max=0.05, timeout=30)
BAD_TIME = "2024-13-45T99:00:00Z"


def frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({"v": np.arange(n)}, index=pd.Index([f"k{i:05d}" for i in range(n)]))


# -- server text is redacted -----------------------------------------------------------------------


def echoing(status: int, *, raw: bool = False) -> Callable[[httpx.Request], httpx.Response]:
    """A proxy that answers ``status`` and echoes the request's headers into the body."""

    def handler(request: httpx.Request) -> httpx.Response:
        auth = request.headers["authorization"]
        if raw:
            page = f"<html><pre>Bad gateway\nAuthorization: {auth}\nHost: api.example</pre>"
            return httpx.Response(status, content=page.encode())
        body = {
            "code": f"ECHO {auth}",
            "message": f"rejected: you sent Authorization: {auth}, host api.example",
            "errors": [
                {"loc": ["header", "authorization"], "msg": f"got {auth}", "type": "echo"},
                {"headers": {"Authorization": auth, "Accept": "application/json"}},
            ],
        }
        return httpx.Response(status, content=orjson.dumps(body), headers={"x-request-id": auth})

    return handler


def status_error(
    handler: Callable[[httpx.Request], httpx.Response], key: str = API_KEY
) -> APIStatusError:
    async def main() -> APIStatusError:
        transport = httpx.MockTransport(handler)
        client = AsyncRunflowClient(
            api_key=key, base_url="https://api.example", transport=transport
        )
        async with client:
            with pytest.raises(APIStatusError) as info:
                await client.get_batch("b1")
        return info.value

    return anyio.run(main)


@pytest.mark.parametrize(("status", "raw"), [(400, False), (422, False), (500, False), (502, True)])
def test_an_echoed_authorization_header_never_reaches_an_error(status: int, raw: bool) -> None:
    exc = status_error(echoing(status, raw=raw))
    shown = [str(exc), repr(exc), repr(exc.errors), repr(exc.code), repr(exc.request_id)]
    for text in shown:
        assert API_KEY not in text
        assert "rf_live_" not in text
    assert "[redacted]" in str(exc)
    assert exc.status_code == status
    if not raw:
        assert exc.code is not None
        assert "[redacted]" in exc.code
        assert exc.errors is not None
        assert exc.errors[0]["msg"] == "got Bearer [redacted]"
        assert exc.errors[1]["headers"] == {
            "Authorization": "[redacted]",
            "Accept": "application/json",
        }
        assert "host api.example" not in str(exc)  # an Authorization value runs to the line's end


def test_a_key_of_any_shape_is_redacted_verbatim_and_text_is_cut() -> None:
    key = "plainSecret0123456789"

    def handler(request: httpx.Request) -> httpx.Response:
        message = f"token {key} refused " + "x" * 10_000
        return httpx.Response(401, content=orjson.dumps({"code": key, "message": message}))

    exc = status_error(handler, key=key)
    assert key not in str(exc)
    assert exc.code == "[redacted]"
    assert "token [redacted] refused" in str(exc)
    assert len(str(exc)) < 800  # at most 500 characters of what the server said


@pytest.mark.parametrize(
    "text",
    [
        "missing bearer token",
        "invalid API key",
        "perf_test_results are in",
        "model 'acme/echo' not found",
    ],
)
def test_ordinary_server_text_is_left_alone(text: str) -> None:
    assert redact(text) == text


def test_rejected_rows_runflow_error_never_holds_the_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="runflow_frames")
    out = runflow_frames.run_batches(
        frame(30),
        "acme",
        "echo",
        api_key=API_KEY,
        base_url="https://api.example",
        transport=httpx.MockTransport(echoing(422)),
        errors="keep",
        retry=FAST,
    )
    errors = out["runflow_error"]
    assert errors.notna().all()
    assert not errors.str.contains(API_KEY, regex=False).any()
    assert errors.str.contains("[redacted]", regex=False).all()
    assert API_KEY not in caplog.text


# -- a fake-clock emulator, served over HTTP ------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_750_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def emu(clock: Clock) -> Emulator:
    return Emulator(seed=3, clock=clock)


@pytest.fixture
def url(emu: Emulator) -> Iterator[str]:
    with serve(emu) as served:
        yield served


def submitted(
    n: int, url: str, clock: Clock, *, api_key: str = API_KEY, **options: Any
) -> pd.DataFrame:
    """``n`` rows through acme/echo (100 a batch), every run over by the time this returns."""
    out = runflow_frames.run_batches(
        frame(n), "acme", "echo", base_url=url, api_key=api_key, **options
    )
    clock.now += 60
    return out


def edit_pages(
    monkeypatch: pytest.MonkeyPatch,
    emu: Emulator,
    edit: Callable[[str, list[dict[str, Any]]], None],
) -> None:
    """Serve every list-items page (``GET /v1/batches/{id}/items``) as ``edit(batch_id, items)``
    rewrites it: what a server with a bug (or a proxy) would answer."""
    real = emu.list_items

    def list_items(token: str, batch_id: str, limit: str | None, cursor: str | None) -> Any:
        answer = real(token, batch_id, limit, cursor)
        if answer.status == 200:
            edit(batch_id, answer.body["items"])
        return answer

    monkeypatch.setattr(emu, "list_items", list_items)


def each_item(edit: Callable[[dict[str, Any]], None]) -> Callable[[str, list[Any]], None]:
    def page(_batch_id: str, items: list[dict[str, Any]]) -> None:
        for item in items:
            edit(item)

    return page


def test_item_failure_text_is_redacted(
    monkeypatch: pytest.MonkeyPatch, emu: Emulator, url: str, clock: Clock
) -> None:
    key = "plainSecret0123456789"
    out = submitted(20, url, clock, api_key=key)

    def echo_the_key(item: dict[str, Any]) -> None:
        item["status_code"] = item["run"]["status_code"] = "failed"
        item["error"] = {
            "code": f"PROXY {key}",
            "message": f"upstream saw Authorization: Bearer {key} and {API_KEY}",
        }

    edit_pages(monkeypatch, emu, each_item(echo_the_key))
    done = runflow_frames.collect(out, base_url=url, api_key=key, poll_interval=FAST_POLL)
    for col in ("runflow_failure_code", "runflow_failure_message"):
        texts = done[col]
        assert texts.notna().all()
        assert not texts.str.contains(key, regex=False).any()
        assert not texts.str.contains(API_KEY, regex=False).any()
    assert (done["runflow_failure_code"] == "PROXY [redacted]").all()
    assert (done["runflow_failure_message"] == "upstream saw Authorization: [redacted]").all()


# -- malformed answers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "canonical"),
    [
        ("2024-05-01T12:00:00Z", "2024-05-01T12:00:00.000000Z"),
        ("2024-05-01T12:00:00.123Z", "2024-05-01T12:00:00.123000Z"),
        ("2024-05-01T14:00:00.123456789+02:00", "2024-05-01T12:00:00.123456Z"),
        ("2024-05-01T12:00:00", "2024-05-01T12:00:00.000000Z"),
        ("2024-05-01 12:00:00+00:00", "2024-05-01T12:00:00.000000Z"),
        (None, None),
        ("", None),
    ],
)
def test_timestamps_are_made_canonical_utc(value: Any, canonical: str | None) -> None:
    assert canonical_timestamp(value) == canonical


@pytest.mark.parametrize(
    "value",
    [BAD_TIME, "yesterday", "2024-05-01T25:00:00Z", 1_700_000_000, "9999-12-31T00:00:00Z"],
)
def test_what_is_not_a_timestamp_is_refused(value: Any) -> None:
    with pytest.raises((ValueError, TypeError, OverflowError)):
        canonical_timestamp(value)


def test_an_outcome_row_drops_and_notes_malformed_values() -> None:
    item = {
        "id": "i1",
        "status_code": "succeeded",
        "created_at": "2024-05-01T12:00:00Z",
        "completed_at": BAD_TIME,
        "cost": "12abc",
        "run": {"started_at": "soon", "cost": "NaN", "failure_message": "Bearer abcdefgh123"},
    }
    got = outcome_row(item)
    assert item["completed_at"] == BAD_TIME  # the answer itself is left as it was
    assert got["runflow_created_at"] == "2024-05-01T12:00:00.000000Z"
    assert got["runflow_completed_at"] is None
    assert got["runflow_started_at"] is None
    assert got["runflow_cost"] is None
    assert got["runflow_failure_message"] == "Bearer [redacted]"
    assert got["runflow_error"] == (
        f"malformed answer: completed_at '{BAD_TIME}' is not a timestamp; "
        "cost '12abc' is not a decimal number; run.started_at 'soon' is not a timestamp; "
        "run.cost 'NaN' is not a decimal number"
    )
    assert outcome_row({"id": "i2", "cost": "0.5"})["runflow_error"] is None
    # Whatever slips through, typing the columns does not fail on it.
    raw = results_frame("b", [item])
    typed = finish_columns(raw, flatten=False)
    assert typed["runflow_completed_at"].isna().all()


def test_a_malformed_timestamp_neither_fails_collect_nor_poisons_the_cache(
    monkeypatch: pytest.MonkeyPatch,
    emu: Emulator,
    url: str,
    clock: Clock,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ck = tmp_path / "ck"
    out = submitted(250, url, clock, checkpoint=ck)
    bad_time, bad_cost = out.at["k00003", "runflow_item_id"], out.at["k00120", "runflow_item_id"]

    def corrupt(item: dict[str, Any]) -> None:
        if item["id"] == bad_time:
            item["completed_at"] = item["run"]["completed_at"] = BAD_TIME
        if item["id"] == bad_cost:
            item["cost"] = item["run"]["cost"] = "12abc"

    edit_pages(monkeypatch, emu, each_item(corrupt))
    caplog.set_level(logging.WARNING, logger="runflow_frames")
    first = runflow_frames.collect(
        out, checkpoint=ck, base_url=url, api_key=API_KEY, poll_interval=FAST_POLL
    )
    assert (first["runflow_status"] == "succeeded").all()
    assert first["runflow_completed_at"].isna()["k00003"]
    assert first.drop(index="k00003")["runflow_completed_at"].notna().all()
    assert first.at["k00120", "runflow_cost"] is None
    assert first.drop(index="k00120")["runflow_cost"].notna().all()
    # The note: logged, and on the row, kept with its outcome.
    assert f"completed_at '{BAD_TIME}' is not a timestamp" in caplog.text
    assert "cost '12abc' is not a decimal number" in caplog.text
    assert f"completed_at '{BAD_TIME}' is not a timestamp" in first.at["k00003", "runflow_error"]
    assert "cost '12abc' is not a decimal number" in first.at["k00120", "runflow_error"]
    assert first.drop(index=["k00003", "k00120"])["runflow_error"].isna().all()

    pages = emu.accounting().requests_by_route.get("GET /v1/batches/{id}/items")
    again = runflow_frames.collect(
        out, checkpoint=ck, base_url=url, api_key=API_KEY, poll_interval=FAST_POLL
    )
    assert emu.accounting().requests_by_route.get("GET /v1/batches/{id}/items") == pages
    pd.testing.assert_frame_equal(again, first)
    from_path = runflow_frames.collect(ck, base_url=url, api_key=API_KEY)
    assert from_path["runflow_completed_at"].isna()["k00003"]
    assert "is not a timestamp" in from_path.at["k00003", "runflow_error"]


def unfiled_in(batch_id: str, how: str) -> Callable[[str, list[dict[str, Any]]], None]:
    """A page edit: in ``batch_id``, the first item comes twice (``how`` = "repeat") or loses
    its id ("no id")."""

    def edit(b: str, items: list[dict[str, Any]]) -> None:
        if b != batch_id:
            return
        if how == "repeat":
            items.append(dict(items[0]))
        else:
            del items[0]["id"]

    return edit


@pytest.mark.parametrize("how", ["repeat", "no id"])
def test_a_batch_whose_items_cannot_be_filed_is_reported_and_the_others_collected(
    monkeypatch: pytest.MonkeyPatch, emu: Emulator, url: str, clock: Clock, how: str
) -> None:
    out = submitted(250, url, clock)
    batches = list(dict.fromkeys(out["runflow_batch_id"]))
    assert len(batches) == 3
    edit_pages(monkeypatch, emu, unfiled_in(batches[1], how))
    expected: dict[str, set[str]] = {}
    for b, i in zip(out["runflow_batch_id"], out["runflow_item_id"], strict=True):
        expected.setdefault(b, set()).add(i)
    got: dict[str, int] = {}
    malformed: list[tuple[str, str]] = []

    async def main() -> list[str]:
        async with AsyncRunflowClient(api_key=API_KEY, base_url=url) as client:
            return await collect_items(
                client,
                batches,
                poll=PollPolicy(initial=0.05, max=0.2),
                retry=FAST,
                on_batch=lambda b, items: got.update({b: len(items)}),
                expected=expected,
                on_malformed=lambda b, message: malformed.append((b, message)),
            )

    assert anyio.run(main) == []
    assert got == {batches[0]: 100, batches[2]: 50}
    assert [b for b, _ in malformed] == [batches[1]]
    what = "repeats" if how == "repeat" else "has no string id"
    assert what in malformed[0][1]
    assert malformed[0][1].startswith(f"batch {batches[1]}: malformed answer: ")
    # Reported once, not polled again.
    assert emu.accounting().requests_by_route["GET /v1/batches/{id}/items"] == 3


def test_collect_reports_a_batch_repeating_an_item_id_on_its_rows_and_keeps_the_others(
    monkeypatch: pytest.MonkeyPatch, emu: Emulator, url: str, clock: Clock, tmp_path: Path
) -> None:
    ck = tmp_path / "ck"
    out = submitted(250, url, clock, checkpoint=ck)
    bad = out["runflow_batch_id"].iloc[100]
    edit_pages(monkeypatch, emu, unfiled_in(bad, "repeat"))
    options: dict[str, Any] = {"base_url": url, "api_key": API_KEY, "poll_interval": FAST_POLL}
    first = runflow_frames.collect(out, checkpoint=ck, **options)
    in_bad = (first["runflow_batch_id"] == bad).to_numpy()
    assert (
        first.loc[in_bad, "runflow_error"]
        .str.contains(r"malformed answer: item id '.+' repeats")
        .all()
    )
    assert first.loc[in_bad, "runflow_status"].isna().all()
    assert (first.loc[~in_bad, "runflow_status"] == "succeeded").all()
    assert first.loc[~in_bad, "runflow_error"].isna().all()
    # Nothing of the malformed batch was kept; the others were. Healed, it alone is fetched.
    monkeypatch.undo()
    pages = emu.accounting().requests_by_route["GET /v1/batches/{id}/items"]
    done = runflow_frames.collect(out, checkpoint=ck, **options)
    assert emu.accounting().requests_by_route["GET /v1/batches/{id}/items"] == pages + 1
    assert (done["runflow_status"] == "succeeded").all()


_TIMES = st.sampled_from(
    [
        None,
        "",
        "2024-05-01T12:00:00Z",
        "2024-05-01T14:00:00+02:00",
        "soon",
        5,
        "0001-01-01T00:00:00",
    ]
)
_COSTS = st.sampled_from([None, "", "0.05", 0.05, 3, "NaN", "12abc", True, "Infinity"])
_TEXTS = st.sampled_from([None, "", "QUOTA", "Bearer abcdefgh123", {"nested": 1}, 7])


def _answer(*, with_texts: tuple[str, ...] = ()) -> st.SearchStrategy[dict[str, Any]]:
    fields = dict.fromkeys(("created_at", "started_at", "completed_at"), _TIMES)
    fields |= {"cost": _COSTS, "status_code": st.sampled_from([None, "succeeded", "failed"])}
    fields |= {"output": st.sampled_from([None, {"text": "A"}, [1]])}
    fields |= dict.fromkeys(with_texts, _TEXTS)
    return st.fixed_dictionaries({}, optional=fields)


@given(
    item=_answer(),
    run=st.one_of(st.none(), st.just("x"), _answer(with_texts=("failure_code", "failure_message"))),
    error=st.one_of(st.none(), _answer(with_texts=("code", "message"))),
    ref=st.sampled_from([None, "r1"]),
)
def test_an_outcome_row_keeps_only_well_formed_values_whatever_the_answer(
    item: dict[str, Any], run: Any, error: Any, ref: str | None
) -> None:
    answer = {**item, "id": "i", "client_ref": ref}
    if run is not None:
        answer["run"] = run
    if error is not None:
        answer["error"] = error
    row = outcome_row(answer)
    assert row["client_ref"] == ref
    cost = row["runflow_cost"]
    assert cost is None or (isinstance(cost, Decimal) and cost.is_finite())
    for name in ("runflow_created_at", "runflow_started_at", "runflow_completed_at"):
        assert row[name] is None or canonical_timestamp(row[name]) == row[name]
    for name in ("runflow_failure_code", "runflow_failure_message"):
        assert row[name] is None or "abcdefgh123" not in row[name]
    malformed = any(v in (5, "soon", "0001-01-01T00:00:00") for v in _times_in(answer)) or any(
        v in ("NaN", "12abc", True, "Infinity") for v in _costs_in(answer)
    )
    assert (row["runflow_error"] is not None) == malformed
    # Whatever the answer, typing the columns does not fail on the row.
    finish_columns(results_frame("b", [answer]), flatten=False)


def _parts(answer: dict[str, Any]) -> list[dict[str, Any]]:
    return [answer] + [answer[k] for k in ("run", "error") if isinstance(answer.get(k), dict)]


def _times_in(answer: dict[str, Any]) -> list[Any]:
    names = ("created_at", "started_at", "completed_at")
    return [part[n] for part in _parts(answer) for n in names if n in part]


def _costs_in(answer: dict[str, Any]) -> list[Any]:
    return [part["cost"] for part in _parts(answer) if "cost" in part]
