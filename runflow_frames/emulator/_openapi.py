"""The emulator's OpenAPI 3.1 document: its public ``/v1`` routes, as the emulator answers them.

Served at ``GET /openapi.json`` (no key needed). Built from the same limits the emulator checks
(``_requests``), so the two cannot drift apart on a number. Every answer schema is closed
(``additionalProperties: false``, every field required): it says exactly what the emulator
sends, which Runflow's may exceed. Left out on purpose:

- the emulator's own ``/_emulator/...`` routes (accounting, what the models received): not part
  of Runflow's API, and without access control (``runflow-frames emulator`` serves loopback
  only unless told otherwise);
- what injected faults do (``Faults``): 5xx answers, dropped connections, bodies that are not
  JSON. The 429 of a configured rate or concurrency limit is listed.
"""

from __future__ import annotations

from typing import Any, Final

from ._requests import DEFAULT_PAGE, MAX_CALLBACK_URL, MAX_CLIENT_REF, MAX_ITEMS, MAX_PAGE

Schema = dict[str, Any]

_DESCRIPTION: Final = (
    "The public /v1 routes of the runflow-frames emulator, a local fake of Runflow's batch API, "
    "as it answers them. Any non-empty bearer token is accepted unless the emulator was given "
    "api_keys. Not listed: the emulator's own /_emulator/ routes (accounting, what the models "
    "received), which have no access control, and what injected faults do (5xx answers, "
    "dropped connections, bodies that are not JSON)."
)

RUN_STATUSES: Final = ("queued", "dispatching", "running", "succeeded", "failed")
BATCH_STATUSES: Final = ("queued", "running", "succeeded", "failed", "partial_succeeded")
# The pattern of Runflow's decimal strings (its OpenAPI's, from Pydantic).
_DECIMAL: Final[Schema] = {"type": "string", "pattern": r"^(?!^[-+.]*$)[+-]?0*\d*\.?\d*$"}
_UUID: Final[Schema] = {"type": "string", "format": "uuid"}
_TIME: Final[Schema] = {"type": "string", "format": "date-time"}
_STRING: Final[Schema] = {"type": "string"}
_COUNT: Final[Schema] = {"type": "integer", "minimum": 0}
_OBJECT: Final[Schema] = {"type": "object"}


def _null(schema: Schema) -> Schema:
    """``schema`` or null."""
    nullable = {**schema, "type": [schema["type"], "null"]}
    if "enum" in schema:
        nullable["enum"] = [*schema["enum"], None]
    return nullable


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _closed(properties: dict[str, Schema], description: str | None = None) -> Schema:
    """An object that has exactly ``properties``, every one always present."""
    schema: Schema = {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }
    if description is not None:
        schema["description"] = description
    return schema


def _run() -> Schema:
    return _closed(
        {
            "id": _UUID,
            "model_id": _STRING,
            "target_type": {"type": "string", "enum": ["model"]},
            "status_code": {"type": "string", "enum": list(RUN_STATUSES)},
            "source_code": {"type": "string", "enum": ["api"]},
            "input": {**_OBJECT, "description": "The item as its model got it (no client_ref)."},
            "output": _null(_OBJECT),
            "duration_ms": _null(_COUNT),
            "cost": _null(_DECIMAL),
            "batch_id": _UUID,
            "client_ref": _null(_STRING),
            "created_at": _TIME,
            "started_at": _null(_TIME),
            "completed_at": _null(_TIME),
            "callback_url": _null(_STRING),
            "metadata": _null(_OBJECT),
            "failure_code": _null(
                {"type": "string", "enum": ["INPUT_VALIDATION_FAILED", "PREPROCESSING_FAILED"]}
            ),
            "failure_message": _null(_STRING),
            "failure_stage_code": _null({"type": "string", "enum": ["preprocess"]}),
            "links": _closed({"self": _STRING}),
        },
        "A batch's child run. cost: the model's price once succeeded, 0 once failed.",
    )


def _item_schemas() -> dict[str, Schema]:
    handle = _closed(
        {
            "id": _UUID,
            "sequence_index": _COUNT,
            "run_id": _UUID,
            "status_code": {"type": "string", "enum": list(RUN_STATUSES)},
            "client_ref": _null(_STRING),
        },
        "An item as the batch lists it (BatchItemHandle); sequence_index starts at 0.",
    )
    detail = _closed(
        {
            "id": _UUID,
            "batch_id": _UUID,
            "run_id": _UUID,
            "sequence_index": _COUNT,
            "created_at": _TIME,
            "started_at": _null(_TIME),
            "completed_at": _null(_TIME),
            "client_ref": _null(_STRING),
            "status_code": {"type": "string", "enum": list(RUN_STATUSES)},
            "input": _OBJECT,
            "cost": _null(_DECIMAL),
            "output": _null(_OBJECT),
            "error": _null(_closed({"code": _STRING, "message": _STRING})),
            "run": _ref("Run"),
        },
        "An item in full (BatchItemDetail).",
    )
    page = _closed(
        {
            "items": {"type": "array", "items": _ref("BatchItemDetail"), "maxItems": MAX_PAGE},
            "first": _STRING,
            "next": _null(_STRING),
            "previous": _null(_STRING),
            "next_pq": _null(_STRING),
            "prev_pq": _null(_STRING),
        },
        "A page of items in sequence_index order. The cursors are opaque pq values, under both "
        "names Runflow's docs use (next and next_pq, previous and prev_pq).",
    )
    return {"BatchItemHandle": handle, "BatchItemDetail": detail, "ItemsPage": page}


def _batch_fields() -> dict[str, Schema]:
    """What a create answers (BatchCreated); the detail adds ``_batch_detail_fields``."""
    outcome = _closed({"succeeded": _COUNT, "failed": _COUNT, "cancelled": _COUNT, "total": _COUNT})
    return {
        "id": _UUID,
        "target_type": {"type": "string", "enum": ["model"]},
        "target_id": _UUID,
        "status_code": {"type": "string", "enum": list(BATCH_STATUSES)},
        "items_total": {"type": "integer", "minimum": 1, "maximum": MAX_ITEMS},
        "items_succeeded": _COUNT,
        "items_failed": _COUNT,
        "items_cancelled": _COUNT,
        "items": {"type": "array", "items": _ref("BatchItemHandle")},
        "created_at": _TIME,
        "started_at": _null(_TIME),
        "completed_at": _null(_TIME),
        "output": outcome,
        "cost": _DECIMAL,
        "metadata": _null(_OBJECT),
        "callback_url": _null(_STRING),
    }


def _batch_detail_fields() -> dict[str, Schema]:
    return {
        "target_type_code": {"type": "string", "enum": ["model"]},
        "source_code": {"type": "string", "enum": ["api"]},
        "input": {
            "type": "array",
            "items": _OBJECT,
            "description": "The items as submitted, client_ref included.",
        },
        "duration_ms": _null(_COUNT),
        "failure_code": {"type": "null"},
        "failure_message": {"type": "null"},
        "failure_stage_code": {"type": "null"},
        "links": _closed({"self": _STRING, "items": _STRING}),
    }


def _callback_schemas() -> dict[str, Schema]:
    payload = _closed(
        {
            "event": _STRING,
            "batch_id": _UUID,
            "status": {"type": "string", "enum": list(BATCH_STATUSES)},
            "output": _closed(
                {
                    "items": {"type": "array", "items": _ref("BatchItemHandle")},
                    "succeeded": _COUNT,
                    "failed": _COUNT,
                    "cancelled": _COUNT,
                    "total": _COUNT,
                }
            ),
            "duration_ms": _null(_COUNT),
            "created_at": _TIME,
            "completed_at": _TIME,
            "metadata": _null(_OBJECT),
        },
        "The body POSTed to callback_url when the batch completes.",
    )
    attempt = _closed({"status_code": _null(_COUNT), "error_message": _null(_STRING)})
    delivery = _closed(
        {
            "id": _UUID,
            "batch_id": _UUID,
            "callback_url": _STRING,
            "payload_bytes": {**_STRING, "description": "The exact bytes sent (and signed)."},
            "status_code": {
                "type": "string",
                "enum": ["pending", "delivering", "succeeded", "failed"],
            },
            "attempt_count": _COUNT,
            "max_attempts": _COUNT,
            "attempts": {"type": "array", "items": attempt},
            "payload": payload,
        }
    )
    return {"CallbackDelivery": delivery}


def _request_schemas() -> dict[str, Schema]:
    item = {
        "type": "object",
        "properties": {"client_ref": {"type": "string", "maxLength": MAX_CLIENT_REF}},
        "description": "One run's input: the model's own fields, and client_ref, which is taken "
        "out before the model sees the item. An item that fails its model's declared inputs is "
        "created and fails as an item (INPUT_VALIDATION_FAILED); the batch is still created.",
    }
    create = {
        "type": "object",
        "required": ["input"],
        "properties": {
            "input": {"type": "array", "minItems": 1, "maxItems": MAX_ITEMS, "items": item},
            "metadata": _null(_OBJECT),
            "callback_url": _null({"type": "string", "maxLength": MAX_CALLBACK_URL}),
        },
    }
    problem = _closed(
        {
            "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
            "msg": _STRING,
            "type": _STRING,
        }
    )
    error = _closed(
        {
            "code": _STRING,
            "message": _STRING,
            "errors": _null({"type": "array", "items": problem}),
        },
        "Runflow's error envelope; errors[] lists a 422's field problems, else null.",
    )
    return {"CreateBatch": create, "ErrorResponse": error}


def _components() -> Schema:
    created = _closed(_batch_fields(), "The batch as created (201).")
    detail = _closed({**_batch_fields(), **_batch_detail_fields()}, "The batch, for polling (GET).")
    schemas: dict[str, Schema] = {
        **_request_schemas(),
        "Run": _run(),
        **_item_schemas(),
        "BatchCreated": created,
        "BatchDetail": detail,
        **_callback_schemas(),
        "Health": _closed({"status": {"type": "string", "enum": ["ok"]}}),
    }
    return {
        "schemas": schemas,
        "securitySchemes": {"HTTPBearer": {"type": "http", "scheme": "bearer"}},
    }


_REASONS: Final = {
    400: "The body is not JSON.",
    401: "No bearer token, or one the emulator was not told to accept.",
    402: "Not enough credit for the batch's runs (INSUFFICIENT_CREDIT).",
    404: "No such model, batch, item or run (or another key's).",
    409: "The Idempotency-Key was used before with another body (CONFLICT), or (with "
    "Faults.in_flight='conflict') belongs to a request still being processed "
    "(IDEMPOTENCY_KEY_IN_USE, with Retry-After).",
    422: "The request is invalid (VALIDATION_ERROR, with errors[]).",
    429: "A configured rate or concurrency limit refused the request (RATE_LIMITED).",
}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _answers(ok: int, schema: Schema, description: str, *errors: int) -> Schema:
    """An operation's responses: ``ok`` with ``schema``, then error envelopes."""
    responses = {str(ok): _json(schema, description)}
    for status in (401, *errors, 429):
        responses[str(status)] = _json(_ref("ErrorResponse"), _REASONS[status])
    responses["429"]["headers"] = {
        "Retry-After": {
            "description": "Seconds (or an HTTP date) to wait, when configured.",
            "schema": _STRING,
        }
    }
    return responses


def _path(name: str, description: str, example: str | None = None) -> Schema:
    parameter = {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": _STRING,
    }
    if example is not None:
        parameter["example"] = example
    return parameter


def _batch_routes() -> dict[str, Schema]:
    batch_id = _path("batch_id", "The batch's id.")
    list_params = [
        batch_id,
        {
            "name": "limit",
            "in": "query",
            "description": f"Items per page, ASCII digits only (default {DEFAULT_PAGE}).",
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
        },
        {
            "name": "pq",
            "in": "query",
            "description": "The cursor of a page, from first, next or previous.",
            "schema": _STRING,
        },
    ]
    return {
        "/v1/batches/{batch_id}": {
            "get": {
                "operationId": "getBatch",
                "summary": "Get batch detail",
                "parameters": [batch_id],
                "responses": _answers(200, _ref("BatchDetail"), "The batch.", 404),
            }
        },
        "/v1/batches/{batch_id}/items": {
            "get": {
                "operationId": "listBatchItems",
                "summary": "List batch items with live execution state",
                "parameters": list_params,
                "responses": _answers(200, _ref("ItemsPage"), "A page of items.", 404, 422),
            }
        },
        "/v1/batches/{batch_id}/items/{item_id}": {
            "get": {
                "operationId": "getBatchItem",
                "summary": "Get one batch item",
                "parameters": [batch_id, _path("item_id", "The item's id.")],
                "responses": _answers(200, _ref("BatchItemDetail"), "The item.", 404),
            }
        },
        "/v1/batches/{batch_id}/callback": {
            "get": {
                "operationId": "getBatchCallbackHistory",
                "summary": "Get batch callback delivery history",
                "parameters": [batch_id],
                "responses": _answers(
                    200,
                    {"type": "array", "items": _ref("CallbackDelivery"), "maxItems": 1},
                    "The batch's delivery: none until a batch with a callback_url completes.",
                    404,
                ),
            }
        },
    }


def _create_route() -> Schema:
    return {
        "post": {
            "operationId": "createBatch",
            "summary": "Create and dispatch a batch",
            "description": "A model id may have more segments than owner/slug "
            "(acme/image/edit): each one percent-encoded, joined by '/'. The built-in models "
            "are acme/echo, acme/uppercase, acme/image/edit and acme/solo (not batch-capable: "
            "422).",
            "parameters": [
                _path("owner", "The model id's first segment.", "acme"),
                _path("slug", "The model id's last segment.", "uppercase"),
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "description": "Replays the first 201 for the same body; 409 for another.",
                    "schema": _STRING,
                },
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("CreateBatch")}},
            },
            "responses": _answers(
                201, _ref("BatchCreated"), "The batch, created.", 400, 402, 404, 409, 422
            ),
        }
    }


def openapi_document() -> Schema:
    """The OpenAPI 3.1 document of the emulator's public routes (a new dict each call)."""
    health = {
        "get": {
            "operationId": "health",
            "summary": "Health check",
            "security": [],
            "responses": {"200": _json(_ref("Health"), "The emulator is up.")},
        }
    }
    run = {
        "get": {
            "operationId": "getRun",
            "summary": "Get a run",
            "parameters": [_path("run_id", "The run's id.")],
            "responses": _answers(200, _ref("Run"), "The run.", 404),
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Runflow API (runflow-frames emulator)",
            "version": "0.1.0",
            "description": _DESCRIPTION,
        },
        "security": [{"HTTPBearer": []}],
        "paths": {
            "/v1/health": health,
            "/v1/models/{owner}/{slug}/batches": _create_route(),
            **_batch_routes(),
            "/v1/runs/{run_id}": run,
        },
        "components": _components(),
    }
