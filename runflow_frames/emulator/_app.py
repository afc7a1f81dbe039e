"""The emulator's HTTP layer: Starlette routes that translate requests into ``Emulator`` calls."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Final, NamedTuple
from urllib.parse import unquote

import anyio
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._faults import FaultMiddleware
from ._openapi import openapi_document
from ._records import Answer, error_answer
from ._state import CREATE_ROUTE, Emulator

Endpoint = Callable[[Request], Awaitable[Response]]


def _respond(answer: Answer) -> Response:
    return Response(
        answer.content(),
        status_code=answer.status,
        media_type="application/json",
        headers=answer.headers,
    )


class _Waker:
    """Sleeps that end on time, on average. asyncio's timers wake late (epoll rounds its timeout
    up to a whole millisecond; under uvicorn, 1-2 ms late was measured here): at a 20 ms service
    time that is a server 5-10% slower than the one asked for. So each sleep aims early by how
    late the recent ones woke (a moving average). Spinning to the exact deadline would be closer,
    but at high concurrency it burns the CPU the client needs on a small machine.

    It also aims early by how long writing an answer took lately (``sent``): uvicorn writes the
    status line and the body in two socket writes, measured at 0.3 ms each on this machine, so
    an answer would otherwise be out 0.6-0.8 ms after its service time ended."""

    def __init__(self) -> None:
        self.lateness = 0.001
        self.sending = 0.0

    async def sleep_until(self, deadline: float) -> None:
        aimed = deadline - self.lateness - self.sending
        wait = aimed - anyio.current_time()
        if wait <= 0:
            return
        await anyio.sleep(wait)
        late = anyio.current_time() - aimed
        self.lateness += 0.1 * (min(late, 0.01) - self.lateness)

    def sent(self, seconds: float) -> None:
        """Writing an answer took ``seconds``, from its status line to its last byte."""
        self.sending += 0.1 * (min(seconds, 0.01) - self.sending)


_waker = _Waker()
_sleep_until = _waker.sleep_until
_ARRIVED: Final = "runflow.arrived"  # the scope key of a create's arrival time


class _CreateClock:
    """Stamps each create's arrival in its scope, before Starlette's routing, and tells the
    waker how long writing its answer took: the service time runs from the one to the end of
    the other."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope[_ARRIVED] = anyio.current_time()
        started = 0.0

        async def timed(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = anyio.current_time()
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                _waker.sent(anyio.current_time() - started)

        await self.app(scope, receive, timed)


async def _processed_at_the_end(
    emulator: Emulator, token: str, model: str, body: bytes, key: str, mode: str, answer_at: float
) -> Answer:
    """A create processed when its service time ends, as ``Faults.in_flight`` says a same-key
    request meets it meanwhile. The processing goes on if the client hangs up."""
    verdict = emulator.arrive(token, model, body, key, mode, answer_at - anyio.current_time())
    if isinstance(verdict, Answer):
        return verdict
    if verdict == "wait":
        # Polled: the first may be processed in another thread's event loop (a hang-up's).
        while emulator.in_flight(token, key):  # noqa: ASYNC110
            await anyio.sleep(0.01)
        return emulator.after_wait(token, model, body, key)
    with anyio.CancelScope(shield=True):  # the processing outlives a client that hangs up
        await _sleep_until(answer_at)
    return emulator.finish(token, model, body, key)


def _model_path(request: Request) -> list[str] | None:
    """The model path's segments in a create request's URL, or None when it names no model."""
    # Segments come from the raw path so that a %2F inside a segment stays in its segment.
    raw = request.scope.get("raw_path") or request.url.path.encode()
    segments = raw.split(b"?", 1)[0].decode("ascii", "replace").split("/")
    # ["", "v1", "models", *model, "batches"]
    model = [unquote(s) for s in segments[3:-1]]
    # A decoded "/" inside a segment would silently name another model: no such model.
    if segments[-1] != "batches" or len(model) < 2 or any("/" in m for m in model):
        return None
    return model


class _Handlers:
    """Each endpoint's work: a request (and the caller's token) in, an ``Answer`` out."""

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator
        self.latency_rng = random.Random(0)  # noqa: S311 - simulated latency, reproducible

    async def create_batch(self, request: Request, token: str) -> Answer:
        model = _model_path(request)
        if model is None:
            return error_answer(404, "NOT_FOUND", f"no route {request.url.path}")
        emulator = self.emulator
        emulator.create_started()
        # The service time runs from arrival to the answer, our own processing included, so
        # that C requests in flight make at most C / L answers a second (Little's law).
        arrived = request.scope.get(_ARRIVED, anyio.current_time())
        answer_at = arrived + emulator.timing.service_time(self.latency_rng)
        try:
            try:
                body = await request.body()
            except ClientDisconnect:
                # The client went away mid-body (killed, say): nothing was created; 499 is
                # what the access log shows, the client never sees it.
                return error_answer(499, "CLIENT_CLOSED_REQUEST", "client disconnected")
            key = request.headers.get("idempotency-key")
            mode = emulator.faults.in_flight if emulator.faults is not None else "done"
            if key is not None and mode != "done":
                return await _processed_at_the_end(
                    emulator, token, "/".join(model), body, key, mode, answer_at
                )
            answer = emulator.create_batch(token, "/".join(model), body, key)
            await _sleep_until(answer_at)
            return answer
        finally:
            emulator.create_finished()

    async def get_batch(self, request: Request, token: str) -> Answer:
        return self.emulator.get_batch(token, request.path_params["batch_id"])

    async def list_items(self, request: Request, token: str) -> Answer:
        q = request.query_params
        return self.emulator.list_items(
            token, request.path_params["batch_id"], q.get("limit"), q.get("pq")
        )

    async def get_item(self, request: Request, token: str) -> Answer:
        p = request.path_params
        return self.emulator.get_item(token, p["batch_id"], p["item_id"])

    async def callback_history(self, request: Request, token: str) -> Answer:
        return self.emulator.callback_history(token, request.path_params["batch_id"])

    async def get_run(self, request: Request, token: str) -> Answer:
        return self.emulator.get_run(token, request.path_params["run_id"])

    async def health(self, _request: Request, _token: str) -> Answer:
        return Answer(200, {"status": "ok"})

    async def openapi(self, _request: Request, _token: str) -> Answer:
        return Answer(200, raw=_OPENAPI)

    async def accounting(self, _request: Request, _token: str) -> Answer:
        return Answer(200, self.emulator.accounting().to_json())

    async def received(self, _request: Request, _token: str) -> Answer:
        return Answer(200, {"runs": self.emulator.received()})


Handler = Callable[[_Handlers, Request, str], Awaitable[Answer]]

_OPENAPI: Final = orjson.dumps(openapi_document())


class _Route(NamedTuple):
    method: str
    path: str
    handler: Handler
    counted_as: str | None  # the route template requests are counted under; None: uncounted
    auth: bool = True


_ROUTES: Final = (
    _Route("GET", "/v1/health", _Handlers.health, "GET /v1/health", auth=False),
    _Route("POST", "/v1/models/{model_path:path}", _Handlers.create_batch, CREATE_ROUTE),
    _Route("GET", "/v1/batches/{batch_id}", _Handlers.get_batch, "GET /v1/batches/{id}"),
    _Route(
        "GET", "/v1/batches/{batch_id}/items", _Handlers.list_items, "GET /v1/batches/{id}/items"
    ),
    _Route(
        "GET",
        "/v1/batches/{batch_id}/items/{item_id}",
        _Handlers.get_item,
        "GET /v1/batches/{id}/items/{item_id}",
    ),
    _Route(
        "GET",
        "/v1/batches/{batch_id}/callback",
        _Handlers.callback_history,
        "GET /v1/batches/{id}/callback",
    ),
    _Route("GET", "/v1/runs/{run_id}", _Handlers.get_run, "GET /v1/runs/{id}"),
    # The OpenAPI document of the routes above, as a framework serves its own: no key, uncounted.
    _Route("GET", "/openapi.json", _Handlers.openapi, None, auth=False),
    # Not part of Runflow's API: what tests read to assert what the server saw. The emulator's
    # own endpoints are neither authenticated nor counted.
    _Route("GET", "/_emulator/accounting", _Handlers.accounting, None, auth=False),
    _Route("GET", "/_emulator/received", _Handlers.received, None, auth=False),
)


def _endpoint(handlers: _Handlers, route: _Route) -> Endpoint:
    """The Starlette endpoint for ``route``: authenticates, answers, and counts the request."""
    emulator = handlers.emulator

    def counted(answer: Answer) -> Response:
        if route.counted_as is not None:
            emulator.count(route.counted_as, answer.status)
        return _respond(answer)

    async def endpoint(request: Request) -> Response:
        token = ""
        if route.auth:
            checked = emulator.authenticate(request.headers.get("authorization"))
            if isinstance(checked, Answer):
                return counted(checked)
            token = checked
        return counted(await route.handler(handlers, request, token))

    return endpoint


async def _no_route(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    code = "METHOD_NOT_ALLOWED" if status == 405 else "NOT_FOUND"
    # A 405 says which methods the route takes (RFC 9110's Allow; Starlette puts it on exc).
    headers = exc.headers if isinstance(exc, HTTPException) else None
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
        headers=headers,
    )


def create_app(emulator: Emulator) -> Starlette:
    """An ASGI app serving ``emulator`` (mount it in-process with ``httpx.ASGITransport``)."""
    handlers = _Handlers(emulator)
    routes = [Route(r.path, _endpoint(handlers, r), methods=[r.method]) for r in _ROUTES]
    # Always installed: it reads emulator.faults per request, so faults can be set live.
    middleware = [
        Middleware(_CreateClock),
        Middleware(FaultMiddleware, faults=lambda: emulator.faults, on_fault=emulator.record_fault),
    ]
    return Starlette(
        routes=routes, middleware=middleware, exception_handlers={HTTPException: _no_route}
    )
