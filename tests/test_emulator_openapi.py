"""The emulator's robustness (issue 14): the inputs known to break it, over real HTTP; its
OpenAPI document; schemathesis against that document, in-process; and the `emulator` command,
which serves loopback only unless told otherwise (the internal routes have no access control)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from click.testing import CliRunner
from hypothesis import settings
from hypothesis import strategies as st
from schemathesis import Case, Config, HookContext
from schemathesis.checks import positive_data_acceptance

from runflow_frames.cli import main
from runflow_frames.emulator import Emulator, Timing, create_app, serve
from runflow_frames.emulator._requests import _encode_cursor

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
    _assert_items_query_refused(client, "pq", cursor)


@pytest.mark.parametrize(
    "limit", ["\u0661\u0662", "\u0665", "\u00b2", " 5", "5 ", "+5", "1_0", "0x10", "5.0", "", "0"]
)
def test_limit_is_ascii_digits_only(client: httpx.Client, limit: str) -> None:
    _assert_items_query_refused(client, "limit", limit)


def _assert_items_query_refused(client: httpx.Client, name: str, value: str) -> None:
    """An items page asked with ``name=value`` is a 422 envelope that names the parameter."""
    batch = _create(client, "acme/echo", {"a": 1})
    r = client.get(f"/v1/batches/{batch['id']}/items", params={name: value})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "VALIDATION_ERROR"
    assert body["errors"][0]["loc"] == ["query", name]


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


# -- the OpenAPI document, and schemathesis against it --------------------------------------------


def test_the_openapi_document_is_served_without_a_key(client: httpx.Client) -> None:
    r = httpx.get(client.base_url.join("/openapi.json"))
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    document = r.json()
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {
        "/v1/health",
        "/v1/models/{owner}/{slug}/batches",
        "/v1/batches/{batch_id}",
        "/v1/batches/{batch_id}/items",
        "/v1/batches/{batch_id}/items/{item_id}",
        "/v1/batches/{batch_id}/callback",
        "/v1/runs/{run_id}",
    }
    created = document["paths"]["/v1/models/{owner}/{slug}/batches"]["post"]["responses"]
    assert {"201", "400", "401", "404", "409", "422"} <= set(created)
    schemathesis.openapi.from_dict(document).validate()  # against OpenAPI 3.1's own schema


def test_a_method_a_route_does_not_take_is_405_naming_those_it_does(client: httpx.Client) -> None:
    r = client.delete("/v1/health")
    assert r.status_code == 405
    assert set(r.headers["allow"].split(", ")) == {"GET", "HEAD"}
    assert r.json()["code"] == "METHOD_NOT_ALLOWED"


T0 = 1_800_000_000.0  # the emulator's clock while schemathesis runs: a fixed now


class _Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def _seeded_emulator() -> tuple[Emulator, dict[str, list[Any]]]:
    """An emulator holding batches in every state (so that reads answer 200s in every shape,
    not only 404s), and the ids and cursors that reach them."""
    clock = _Clock()
    emulator = Emulator(seed=3, clock=clock, signing_secrets=["s"], api_keys=["x"])
    batches: list[dict[str, Any]] = []

    def create(at: float, model: str, body: dict[str, Any]) -> None:
        clock.now = at
        answer = emulator.create_batch("x", model, orjson.dumps(body), None)
        assert answer.status == 201
        batches.append(orjson.loads(answer.content()))

    done = T0 - 60
    texts = [{"text": f"t{i}", "client_ref": f"r{i}", "repeat": i % 3} for i in range(100)]
    create(done, "acme/uppercase", {"input": texts, "metadata": {"k": "v"}})
    create(done, "acme/uppercase", {"input": [{"text": "a"}, {"nope": 1}]})  # partial
    create(done, "acme/uppercase", {"input": [{"text": 1}]})  # failed
    create(done, "acme/image/edit", {"input": [{"prompt": "p"}], "callback_url": "http://cb"})
    for age in (0.01, 0.07, 0.15):  # queued, dispatching, running
        create(T0 - age, "acme/echo", {"input": [{"a": age, "client_ref": "c"}]})
    clock.now = T0
    # The callback's delivery, as the server's delivery thread would record it.
    for batch_id, *_ in emulator.due_callbacks():
        emulator.delivered(batch_id, 500)
        emulator.delivered(batch_id, None, "ConnectError")
    ids: dict[str, list[Any]] = {
        "batch_id": [b["id"] for b in batches],
        "item": [(b["id"], i["id"]) for b in batches for i in b["items"]],
        "run_id": [i["run_id"] for b in batches for i in b["items"]],
        "pq": [_encode_cursor(n) for n in (0, 1, 50, 99, 100, 101)],
    }
    return emulator, ids


_EMULATOR, _IDS = _seeded_emulator()
# No made-up query parameters in negative cases: the emulator ignores unknown ones, as Runflow's
# (FastAPI) API does, and OpenAPI does not say they are refused.
_CONFIG = Config.from_dict({"generation": {"allow-extra-parameters": False}})
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(_EMULATOR), config=_CONFIG)


@schema.hook
def before_generate_path_parameters(context: HookContext, strategy: st.SearchStrategy[Any]) -> Any:
    """Half the time, ids the emulator holds (and the models it serves) instead of random ones."""
    assert context.operation is not None
    path = context.operation.path
    if path.startswith("/v1/models/"):
        models = [{"owner": "acme", "slug": s} for s in ("echo", "uppercase", "solo")]
        return st.one_of(st.sampled_from(models), strategy)
    if "{item_id}" in path:
        pairs = [{"batch_id": b, "item_id": i} for b, i in _IDS["item"]]
        return st.one_of(st.sampled_from(pairs), strategy)
    for name in ("batch_id", "run_id"):
        if f"{{{name}}}" in path:
            return st.one_of(st.sampled_from([{name: v} for v in _IDS[name]]), strategy)
    return strategy


@schema.hook
def before_generate_query(context: HookContext, strategy: st.SearchStrategy[Any]) -> Any:
    """Cursors the emulator made (a page past its end, too), besides random strings."""
    assert context.operation is not None
    if context.operation.path != "/v1/batches/{batch_id}/items":
        return strategy
    real = st.fixed_dictionaries(
        {}, optional={"limit": st.integers(1, 120), "pq": st.sampled_from(_IDS["pq"])}
    )
    return st.one_of(real, strategy)


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=60, deadline=None)
def test_schemathesis_finds_no_5xx_and_every_answer_matches_the_document(case: Case) -> None:
    # Schemathesis's default checks (not_a_server_error, response_schema_conformance,
    # status_code_conformance, content_type_conformance, response_headers_conformance,
    # negative_data_rejection, ignored_auth, unsupported_method, ...) but one:
    # positive_data_acceptance wants a 2xx for every request the document allows, and no
    # schema can say that a pq is valid only as the emulator made it (an opaque cursor), or
    # that acme/solo refuses batches (422, as Runflow's per-provider models do).
    case.call_and_validate(
        headers={"Authorization": "Bearer x"}, excluded_checks=[positive_data_acceptance]
    )


# -- the internal routes have no access control: `runflow-frames emulator` serves loopback only --


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What `runflow-frames emulator` would have served (nothing is bound)."""
    calls: list[dict[str, Any]] = []

    def run_forever(emulator: Any, *, on_ready: Any, **kwargs: Any) -> None:
        calls.append(kwargs)
        on_ready(kwargs["port"])  # as if bound

    monkeypatch.setattr("runflow_frames.emulator._serve.run_forever", run_forever)
    return calls


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_the_emulator_command_serves_loopback(served: list[dict[str, Any]], host: str) -> None:
    result = CliRunner().invoke(main, ["emulator", "--host", host, "--port", "9"])
    assert result.exit_code == 0, result.output
    assert served == [{"host": host, "port": 9, "workers": 1}]
    assert "warning" not in result.output


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "example.com", ""])
def test_the_emulator_command_refuses_another_host_without_allow_remote(
    served: list[dict[str, Any]], host: str
) -> None:
    result = CliRunner().invoke(main, ["emulator", "--host", host])
    assert result.exit_code == 2
    assert served == []
    assert "no access control" in result.output
    assert "--allow-remote" in result.output


def test_allow_remote_serves_another_host_and_says_so(served: list[dict[str, Any]]) -> None:
    result = CliRunner().invoke(main, ["emulator", "--host", "0.0.0.0", "--allow-remote"])
    assert result.exit_code == 0, result.output
    assert served == [{"host": "0.0.0.0", "port": 8080, "workers": 1}]
    assert "no access control" in result.output


def test_the_emulator_command_help_says_why(served: list[dict[str, Any]]) -> None:
    result = CliRunner().invoke(main, ["emulator", "--help"])
    assert "--allow-remote" in result.output
    assert "no access control" in " ".join(result.output.split())
