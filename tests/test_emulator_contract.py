"""The emulator honours the Runflow contract (shared/runflow-api.md), over real HTTP."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from runflow_frames.emulator import Emulator, ModelSpec, Timing, create_app, serve

ECHO = "/v1/models/acme/echo/batches"


def post(http: httpx.Client, body: Any, path: str = ECHO, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return http.post(path, content=content, headers={"Content-Type": "application/json", **headers})


def items(n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"client_ref": f"r{i}", "x": i, **extra} for i in range(n)]


def test_create_answers_201_with_one_handle_per_item(http: httpx.Client) -> None:
    r = post(http, {"input": items(3), "metadata": {"job": "t"}, "callback_url": None})
    assert r.status_code == 201
    body = r.json()
    assert body["status_code"] == "queued"
    assert body["items_total"] == 3
    assert body["metadata"] == {"job": "t"}
    assert Decimal(body["cost"]) == 0
    assert [h["sequence_index"] for h in body["items"]] == [0, 1, 2]
    assert [h["client_ref"] for h in body["items"]] == ["r0", "r1", "r2"]
    assert {h["status_code"] for h in body["items"]} == {"queued"}
    assert len({h["run_id"] for h in body["items"]}) == 3
    assert set(body["items"][0]) == {"id", "sequence_index", "run_id", "status_code", "client_ref"}


def test_client_ref_is_stripped_before_the_model_sees_the_item(
    http: httpx.Client, emulator: Emulator
) -> None:
    r = post(http, {"input": [{"client_ref": "a", "x": 1}, {"y": 2}]})
    assert r.status_code == 201
    received = emulator.received()
    assert [(run["client_ref"], run["input"]) for run in received] == [
        ("a", {"x": 1}),
        (None, {"y": 2}),
    ]
    run = http.get(f"/v1/runs/{r.json()['items'][0]['run_id']}").json()
    assert run["input"] == {"x": 1}
    assert run["client_ref"] == "a"


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"input": []}, ["body", "input"]),
        ({"input": items(101)}, ["body", "input"]),
        ({}, ["body", "input"]),
        ({"items": [{"input": {}}]}, ["body", "input"]),  # the guide's stale shape
        ({"input": {"x": 1}}, ["body", "input"]),
        ({"input": [1]}, ["body", "input", 0]),
        ({"input": [{"client_ref": 7}]}, ["body", "input", 0, "client_ref"]),
        ({"input": [{"client_ref": "x" * 256}]}, ["body", "input", 0, "client_ref"]),
        ({"input": [{}], "callback_url": "https://h/" + "x" * 2039}, ["body", "callback_url"]),
        ({"input": [{}], "callback_url": 5}, ["body", "callback_url"]),
        ({"input": [{}], "metadata": [1]}, ["body", "metadata"]),
        ([{"x": 1}], ["body"]),
    ],
)
def test_invalid_create_bodies_get_422_with_the_error_envelope(
    http: httpx.Client, emulator: Emulator, body: Any, loc: list[Any]
) -> None:
    r = post(http, body)
    assert r.status_code == 422
    envelope = r.json()
    assert envelope["code"] == "VALIDATION_ERROR"
    assert isinstance(envelope["message"], str)
    assert loc in [e["loc"] for e in envelope["errors"]]
    assert emulator.accounting().batches_created == 0


def test_limits_are_inclusive(http: httpx.Client) -> None:
    assert post(http, {"input": items(100)}).status_code == 201
    assert post(http, {"input": [{"client_ref": "x" * 255}]}).status_code == 201
    url = "https://h/" + "x" * 2038
    assert len(url) == 2048
    assert post(http, {"input": [{}], "callback_url": url}).status_code == 201


def test_body_that_is_not_json_is_400(http: httpx.Client) -> None:
    r = post(http, b"{not json")
    assert r.status_code == 400
    assert r.json()["code"] == "BAD_REQUEST"


def test_missing_or_wrong_bearer_token_is_401(base_url: str) -> None:
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Basic abc"}):
        r = httpx.post(base_url + ECHO, json={"input": [{}]}, headers=headers)
        assert r.status_code == 401
        assert r.json() == {
            "code": "UNAUTHORIZED",
            "message": "missing bearer token",
            "errors": None,
        }
    emulator = Emulator(api_keys={"good"})
    with serve(emulator) as url:
        bad = httpx.post(url + ECHO, json={"input": [{}]}, headers={"Authorization": "Bearer bad"})
        good = httpx.post(
            url + ECHO, json={"input": [{}]}, headers={"Authorization": "Bearer good"}
        )
    assert (bad.status_code, good.status_code) == (401, 201)


def test_unknown_model_is_404_and_non_batch_model_is_422(http: httpx.Client) -> None:
    assert post(http, {"input": [{}]}, "/v1/models/acme/nope/batches").status_code == 404
    r = post(http, {"input": [{}]}, "/v1/models/acme/solo/batches")
    assert r.status_code == 422
    assert r.json()["code"] == "MODEL_NOT_BATCH_CAPABLE"
    assert post(http, {"input": [{}]}, "/v1/models/acme/batches").status_code == 404


def test_three_segment_and_percent_encoded_model_paths(
    http: httpx.Client, emulator: Emulator
) -> None:
    assert (
        post(http, {"input": [{"prompt": "p"}]}, "/v1/models/acme/image/edit/batches").status_code
        == 201
    )
    emulator.register(ModelSpec("acme/a b%"))
    # Each segment is percent-decoded on its own.
    assert post(http, {"input": [{}]}, "/v1/models/acme/a%20b%25/batches").status_code == 201
    assert post(http, {"input": [{}]}, "/v1/models/acme/a%20b/batches").status_code == 404
    # An encoded slash stays inside its segment, so it names no model (not acme/image/edit).
    assert post(http, {"input": [{}]}, "/v1/models/acme/image%2Fedit/batches").status_code == 404


def test_idempotent_replay_returns_the_same_batch_and_creates_nothing(
    http: httpx.Client, emulator: Emulator
) -> None:
    body = orjson.dumps({"input": items(5)})
    first = post(http, body, **{"Idempotency-Key": "k1"})
    second = post(http, body, **{"Idempotency-Key": "k1"})
    assert first.status_code == second.status_code == 201
    assert first.content == second.content
    seen = emulator.accounting()
    assert seen.batches_created == 1
    assert seen.runs_by_client_ref == {f"r{i}": 1 for i in range(5)}
    assert seen.requests_by_idempotency_key == {"k1": 2}
    assert seen.idempotent_replays == 1


def test_same_key_with_another_body_is_409(http: httpx.Client, emulator: Emulator) -> None:
    assert post(http, {"input": items(2)}, **{"Idempotency-Key": "k"}).status_code == 201
    r = post(http, {"input": items(3)}, **{"Idempotency-Key": "k"})
    assert r.status_code == 409
    assert r.json()["code"] == "CONFLICT"
    # Same body to another model is another request too.
    assert (
        post(
            http,
            {"input": items(2)},
            "/v1/models/acme/image/edit/batches",
            **{"Idempotency-Key": "k"},
        ).status_code
        == 409
    )
    assert emulator.accounting().batches_created == 1


def test_idempotency_is_scoped_per_api_key_and_failures_are_not_cached(base_url: str) -> None:
    body = orjson.dumps({"input": items(1)})
    a = httpx.post(
        base_url + ECHO, content=body, headers={"Authorization": "Bearer a", "Idempotency-Key": "k"}
    )
    b = httpx.post(
        base_url + ECHO, content=body, headers={"Authorization": "Bearer b", "Idempotency-Key": "k"}
    )
    assert a.json()["id"] != b.json()["id"]
    bad = httpx.post(
        base_url + ECHO,
        content=b"[]",
        headers={"Authorization": "Bearer a", "Idempotency-Key": "j"},
    )
    assert bad.status_code == 422
    good = httpx.post(
        base_url + ECHO, content=body, headers={"Authorization": "Bearer a", "Idempotency-Key": "j"}
    )
    assert good.status_code == 201


def test_batches_of_another_key_are_not_found(http: httpx.Client, base_url: str) -> None:
    batch = post(http, {"input": items(1)}).json()
    other = {"Authorization": "Bearer someone-else"}
    assert httpx.get(f"{base_url}/v1/batches/{batch['id']}", headers=other).status_code == 404
    assert (
        httpx.get(f"{base_url}/v1/runs/{batch['items'][0]['run_id']}", headers=other).status_code
        == 404
    )


def test_pagination_walks_every_item_once_with_both_cursor_spellings(http: httpx.Client) -> None:
    batch = post(http, {"input": items(100)}).json()
    seen: list[int] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 7}
        if cursor:
            params["pq"] = cursor
        page = http.get(f"/v1/batches/{batch['id']}/items", params=params).json()
        pages += 1
        assert page["next"] == page["next_pq"]
        assert page["previous"] == page["prev_pq"]
        seen += [item["sequence_index"] for item in page["items"]]
        cursor = page["next_pq"]
        if cursor is None:
            break
    assert seen == list(range(100))
    assert pages == 15
    default = http.get(f"/v1/batches/{batch['id']}/items").json()
    assert len(default["items"]) == 100
    assert default["next"] is None


@pytest.mark.parametrize("limit", ["0", "501", "x", "-1"])
def test_page_limit_must_be_1_to_500(http: httpx.Client, limit: str) -> None:
    batch = post(http, {"input": items(1)}).json()
    r = http.get(f"/v1/batches/{batch['id']}/items", params={"limit": limit})
    assert r.status_code == 422
    assert http.get(f"/v1/batches/{batch['id']}/items", params={"limit": 500}).status_code == 200


def test_a_bad_cursor_is_422(http: httpx.Client) -> None:
    batch = post(http, {"input": items(1)}).json()
    r = http.get(f"/v1/batches/{batch['id']}/items", params={"pq": "garbage"})
    assert r.status_code == 422


def test_unknown_ids_are_404(http: httpx.Client) -> None:
    batch = post(http, {"input": items(1)}).json()
    assert http.get("/v1/batches/nope").status_code == 404
    assert http.get("/v1/batches/nope/items").status_code == 404
    assert http.get(f"/v1/batches/{batch['id']}/items/nope").status_code == 404
    assert http.get("/v1/runs/nope").status_code == 404
    r = http.get("/v1/no/such/route")
    assert r.status_code == 404
    assert r.json()["code"] == "NOT_FOUND"


def test_health_needs_no_key(base_url: str) -> None:
    assert httpx.get(base_url + "/v1/health").json() == {"status": "ok"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_lifecycle_outputs_costs_and_batch_status_follow_the_clock() -> None:
    clock = FakeClock()
    emulator = Emulator(clock=clock, timing=Timing(queued=1, dispatching=1, running=2))
    transport = httpx.ASGITransport(app=create_app(emulator))

    async def scenario() -> None:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://emulator", headers={"Authorization": "Bearer k"}
        ) as c:
            body = {
                "input": [
                    {"client_ref": "ok", "text": "hi", "repeat": 2},
                    {"client_ref": "bad", "text": 3},
                ]
            }
            created = (await c.post("/v1/models/acme/uppercase/batches", json=body)).json()
            bid = created["id"]

            async def state() -> tuple[str, dict[str, str]]:
                b = (await c.get(f"/v1/batches/{bid}")).json()
                return b["status_code"], {h["client_ref"]: h["status_code"] for h in b["items"]}

            assert await state() == ("queued", {"ok": "queued", "bad": "queued"})
            clock.now += 1.5
            assert await state() == ("queued", {"ok": "dispatching", "bad": "dispatching"})
            clock.now += 1
            assert await state() == ("running", {"ok": "running", "bad": "failed"})
            clock.now += 2
            assert await state() == ("partial_succeeded", {"ok": "succeeded", "bad": "failed"})

            batch = (await c.get(f"/v1/batches/{bid}")).json()
            assert (batch["items_succeeded"], batch["items_failed"], batch["items_total"]) == (
                1,
                1,
                2,
            )
            assert batch["cost"] == "0.002"
            assert batch["completed_at"] is not None
            assert batch["input"] == body["input"]
            listed = (await c.get(f"/v1/batches/{bid}/items")).json()["items"]
            ok, bad = listed
            assert ok["output"] == {"text": "HIHI"}
            assert ok["cost"] == "0.002"
            assert ok["error"] is None
            assert bad["output"] is None
            assert bad["cost"] == "0"
            assert bad["error"] == {
                "code": "INPUT_VALIDATION_FAILED",
                "message": "input 'text' must be of type string",
            }
            assert bad["run"]["failure_stage_code"] == "preprocess"
            one = (await c.get(f"/v1/batches/{bid}/items/{ok['id']}")).json()
            assert one == ok

    import anyio

    anyio.run(scenario)


def test_batch_status_all_succeeded_or_all_failed() -> None:
    clock = FakeClock()
    emulator = Emulator(clock=clock)
    ok = emulator.create_batch(
        "k", "acme/uppercase", orjson.dumps({"input": [{"text": "a"}]}), None
    )
    bad = emulator.create_batch("k", "acme/uppercase", orjson.dumps({"input": [{}]}), None)
    clock.now += 10
    assert (
        emulator.get_batch("k", orjson.loads(ok.content())["id"]).body["status_code"] == "succeeded"
    )
    assert (
        emulator.get_batch("k", orjson.loads(bad.content())["id"]).body["status_code"] == "failed"
    )


def test_outputs_are_deterministic_functions_of_the_input() -> None:
    outputs = []
    for seed in (1, 2):
        clock = FakeClock()
        emulator = Emulator(clock=clock, seed=seed)
        created = emulator.create_batch(
            "k", "acme/image/edit", orjson.dumps({"input": [{"prompt": "a cat"}]}), None
        )
        clock.now += 10
        bid = orjson.loads(created.content())["id"]
        outputs.append(emulator.list_items("k", bid, None, None).body["items"][0]["output"])
    assert outputs[0] == outputs[1]
    assert outputs[0]["outputs"][0]["type"] == "image"


def test_accounting_counts_requests_by_route_and_is_served(
    http: httpx.Client, base_url: str
) -> None:
    batch = post(http, {"input": items(2)}).json()
    http.get(f"/v1/batches/{batch['id']}")
    http.get("/v1/health")
    served = httpx.get(base_url + "/_emulator/accounting").json()
    assert served["requests_by_route"] == {
        "POST /v1/models/{model}/batches": 1,
        "GET /v1/batches/{id}": 1,
        "GET /v1/health": 1,
    }
    assert served["runs_by_client_ref"] == {"r0": 1, "r1": 1}
    received = httpx.get(base_url + "/_emulator/received").json()["runs"]
    assert [r["input"] for r in received] == [{"x": 0}, {"x": 1}]


def test_registered_models_validate_declared_inputs() -> None:
    with pytest.raises(ValueError, match="two or more"):
        ModelSpec("solo")
    with pytest.raises(ValueError, match="unknown input type"):
        ModelSpec("a/b", required={"x": "text"})
    spec = ModelSpec("a/b", required={"n": "integer"}, optional={"f": "number"})
    assert spec.validate({"n": 1, "f": 2}) is None
    assert spec.validate({"n": True}) == "input 'n' must be of type integer"
    assert spec.validate({"n": 1, "f": "x"}) == "input 'f' must be of type number"
    assert spec.validate({}) == "missing required input 'n'"
