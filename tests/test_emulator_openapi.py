"""The emulator's robustness (issue 14): the inputs known to break it, over real HTTP; its
OpenAPI document; and schemathesis against that document, in-process."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from runflow_frames.emulator import Emulator, Timing, serve

# Runs end as soon as they are created: a created batch can be read back at once.
INSTANT = Timing(queued=0.0, dispatching=0.0, running=0.0)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with (
        serve(Emulator(seed=1, timing=INSTANT)) as url,
        httpx.Client(base_url=url, headers={"Authorization": "Bearer x"}) as c,
    ):
        yield c


def _create(client: httpx.Client, model: str, *items: dict[str, Any]) -> dict[str, Any]:
    r = client.post(f"/v1/models/{model}/batches", json={"input": list(items)})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def _items(client: httpx.Client, batch: dict[str, Any]) -> list[dict[str, Any]]:
    r = client.get(f"/v1/batches/{batch['id']}/items")
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def test_a_null_optional_input_is_the_models_default(client: httpx.Client) -> None:
    # What missing="null" sends for a missing Int64: the declared optional input is absent.
    batch = _create(client, "acme/uppercase", {"text": "ab", "repeat": None}, {"text": "ab"})
    outputs = [item["output"] for item in _items(client, batch)]
    assert outputs == [{"text": "AB"}, {"text": "AB"}]
    item = _items(client, batch)[0]
    r = client.get(f"/v1/batches/{batch['id']}/items/{item['id']}")
    assert r.status_code == 200
    assert client.get(f"/v1/runs/{item['run_id']}").json()["output"] == {"text": "AB"}


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        _b64("o:\u00b2"),  # a digit to str.isdigit, not to int()
        _b64("o:\u0661"),  # an Arabic-Indic digit: int() takes it, the cursor is still not ours
        _b64("o:" + "9" * 5000),  # past int()'s digit limit
        _b64("o:-1"),
        _b64("o:"),
        _b64("x:1"),
        _b64("o:1\x00"),
        "%%%",
        "é",
        "",
        "A",  # not a whole base64 quantum
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),  # not UTF-8
    ],
)
def test_a_crafted_cursor_is_a_422_envelope(client: httpx.Client, cursor: str) -> None:
    batch = _create(client, "acme/echo", {"a": 1})
    r = client.get(f"/v1/batches/{batch['id']}/items", params={"pq": cursor})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "VALIDATION_ERROR"
    assert body["errors"][0]["loc"] == ["query", "pq"]


@pytest.mark.parametrize(
    "limit", ["\u0661\u0662", "\u0665", "\u00b2", " 5", "5 ", "+5", "1_0", "0x10", "5.0", "", "0"]
)
def test_limit_is_ascii_digits_only(client: httpx.Client, limit: str) -> None:
    batch = _create(client, "acme/echo", {"a": 1})
    r = client.get(f"/v1/batches/{batch['id']}/items", params={"limit": limit})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "VALIDATION_ERROR"
    assert body["errors"][0]["loc"] == ["query", "limit"]


def test_limit_in_range_with_leading_zeros_is_taken(client: httpx.Client) -> None:
    batch = _create(client, "acme/echo", {"a": 1}, {"a": 2})
    r = client.get(f"/v1/batches/{batch['id']}/items", params={"limit": "001"})
    assert r.status_code == 200
    assert len(r.json()["items"]) == 1


def test_repeat_is_bounded_and_an_item_past_the_bound_fails_its_inputs(
    client: httpx.Client,
) -> None:
    # 10 characters * 10**6 answered 20 MB per item (output and run.output); 10**18, never.
    batch = _create(
        client,
        "acme/uppercase",
        {"text": "abcdefghij", "repeat": 10**6},
        {"text": "abcdefghij", "repeat": 10**18},
        {"text": "abcdefghij", "repeat": -1},
    )
    r = client.get(f"/v1/batches/{batch['id']}/items")
    assert r.status_code == 200
    assert len(r.content) < 100_000
    for item in r.json()["items"]:
        assert item["status_code"] == "failed"
        assert item["output"] is None
        assert item["error"]["code"] == "INPUT_VALIDATION_FAILED"
        assert "repeat" in item["error"]["message"]


def test_an_output_at_the_bound_is_answered(client: httpx.Client) -> None:
    from runflow_frames.emulator._models import MAX_OUTPUT_BYTES

    at_bound = MAX_OUTPUT_BYTES // 4
    batch = _create(
        client,
        "acme/uppercase",
        {"text": "abcd", "repeat": at_bound},
        {"text": "abcd", "repeat": at_bound + 1},
        {"text": "ßßßß", "repeat": at_bound},  # "SS" each: twice the bytes upper-cased
    )
    first, *rest = _items(client, batch)
    assert first["status_code"] == "succeeded"
    assert len(first["output"]["text"]) == MAX_OUTPUT_BYTES
    assert [item["status_code"] for item in rest] == ["failed", "failed"]


def test_a_method_a_route_does_not_take_is_405_naming_those_it_does(client: httpx.Client) -> None:
    r = client.delete("/v1/health")
    assert r.status_code == 405
    assert set(r.headers["allow"].split(", ")) == {"GET", "HEAD"}
    assert r.json()["code"] == "METHOD_NOT_ALLOWED"
