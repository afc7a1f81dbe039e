"""The emulator's HTTP layer: Starlette routes that translate requests into ``Emulator`` calls."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Final
from urllib.parse import unquote

import anyio
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from ._faults import FaultMiddleware
from ._records import Answer, error_answer
from ._state import CREATE_ROUTE, Emulator

Handler = Callable[[Request, str], Awaitable[Answer]]


def _respond(answer: Answer) -> Response:
    return Response(
        answer.content(),
        status_code=answer.status,
        media_type="application/json",
        headers=answer.headers,
    )


# asyncio's timers wake late: epoll rounds its timeout up to a whole millisecond (0.78 ms late
# at the median, measured here). At a 20 ms service time that is a 4% slower server than the
# one asked for, so the emulator aims that much early. (Spinning to the exact deadline would
# be closer, but at high concurrency it burns the CPU the client needs on a small machine.)
_TIMER_LATENESS: Final = 0.0008


async def _sleep_until(deadline: float) -> None:
    """Sleep until about ``deadline`` (event-loop time), on average on time."""
    wait = deadline - anyio.current_time() - _TIMER_LATENESS
    if wait > 0:
        await anyio.sleep(wait)


def create_app(emulator: Emulator) -> Starlette:
    """An ASGI app serving ``emulator`` (mount it in-process with ``httpx.ASGITransport``)."""

    latency_rng = random.Random(0)  # noqa: S311 - simulated latency, reproducible

    def route(
        template: str, handler: Handler, *, auth: bool = True, internal: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        # internal: the emulator's own endpoints, neither authenticated nor counted.
        async def endpoint(request: Request) -> Response:
            if auth and not internal:
                token = emulator.authenticate(request.headers.get("authorization"))
                if isinstance(token, Answer):
                    emulator.count(template, token.status)
                    return _respond(token)
            else:
                token = ""
            answer = await handler(request, token)
            if not internal:
                emulator.count(template, answer.status)
            return _respond(answer)

        return endpoint

    async def create_batch(request: Request, token: str) -> Answer:
        # Segments come from the raw path so that a %2F inside a segment stays in its segment.
        raw = request.scope.get("raw_path") or request.url.path.encode()
        segments = raw.split(b"?", 1)[0].decode("ascii", "replace").split("/")
        # ["", "v1", "models", *model, "batches"]
        model = [unquote(s) for s in segments[3:-1]]
        # A decoded "/" inside a segment would silently name another model: no such model.
        if segments[-1] != "batches" or len(model) < 2 or any("/" in m for m in model):
            return error_answer(404, "NOT_FOUND", f"no route {request.url.path}")
        emulator.create_started()
        # The service time runs from arrival to the answer, our own processing included, so
        # that C requests in flight make at most C / L answers a second (Little's law).
        answer_at = anyio.current_time() + emulator.timing.service_time(latency_rng)
        try:
            try:
                body = await request.body()
            except ClientDisconnect:
                # The client went away mid-body (killed, say): nothing was created; 499 is
                # what the access log shows, the client never sees it.
                return error_answer(499, "CLIENT_CLOSED_REQUEST", "client disconnected")
            answer = emulator.create_batch(
                token, "/".join(model), body, request.headers.get("idempotency-key")
            )
            await _sleep_until(answer_at)
            return answer
        finally:
            emulator.create_finished()

    async def get_batch(request: Request, token: str) -> Answer:
        return emulator.get_batch(token, request.path_params["batch_id"])

    async def list_items(request: Request, token: str) -> Answer:
        q = request.query_params
        return emulator.list_items(
            token, request.path_params["batch_id"], q.get("limit"), q.get("pq")
        )

    async def get_item(request: Request, token: str) -> Answer:
        p = request.path_params
        return emulator.get_item(token, p["batch_id"], p["item_id"])

    async def callback_history(request: Request, token: str) -> Answer:
        return emulator.callback_history(token, request.path_params["batch_id"])

    async def get_run(request: Request, token: str) -> Answer:
        return emulator.get_run(token, request.path_params["run_id"])

    async def health(_request: Request, _token: str) -> Answer:
        return Answer(200, {"status": "ok"})

    async def accounting(_request: Request, _token: str) -> Answer:
        return Answer(200, emulator.accounting().to_json())

    async def received(_request: Request, _token: str) -> Answer:
        return Answer(200, {"runs": emulator.received()})

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        code = "METHOD_NOT_ALLOWED" if status == 405 else "NOT_FOUND"
        return Response(
            orjson.dumps(
                {
                    "code": code,
                    "message": f"no route {request.method} {request.url.path}",
                    "errors": None,
                }
            ),
            status_code=status,
            media_type="application/json",
        )

    routes = [
        Route("/v1/health", route("GET /v1/health", health, auth=False), methods=["GET"]),
        Route(
            "/v1/models/{model_path:path}",
            route(CREATE_ROUTE, create_batch),
            methods=["POST"],
        ),
        Route("/v1/batches/{batch_id}", route("GET /v1/batches/{id}", get_batch), methods=["GET"]),
        Route(
            "/v1/batches/{batch_id}/items",
            route("GET /v1/batches/{id}/items", list_items),
            methods=["GET"],
        ),
        Route(
            "/v1/batches/{batch_id}/items/{item_id}",
            route("GET /v1/batches/{id}/items/{item_id}", get_item),
            methods=["GET"],
        ),
        Route(
            "/v1/batches/{batch_id}/callback",
            route("GET /v1/batches/{id}/callback", callback_history),
            methods=["GET"],
        ),
        Route("/v1/runs/{run_id}", route("GET /v1/runs/{id}", get_run), methods=["GET"]),
        # Not part of Runflow's API: what tests read to assert what the server saw.
        Route(
            "/_emulator/accounting",
            route("GET /_emulator/accounting", accounting, internal=True),
            methods=["GET"],
        ),
        Route(
            "/_emulator/received",
            route("GET /_emulator/received", received, internal=True),
            methods=["GET"],
        ),
    ]
    # Always installed: it reads emulator.faults per request, so faults can be set live.
    middleware = [
        Middleware(FaultMiddleware, faults=lambda: emulator.faults, on_fault=emulator.record_fault)
    ]
    return Starlette(
        routes=routes, middleware=middleware, exception_handlers={HTTPException: not_found}
    )
