"""The Runflow HTTP client: requests go out through a wire (``_wire.py``: aiohttp, or httpx).

Every exception of the wire's library and every error status is translated here, once, into the
tree of ``_errors.py``. The API key lives in one private attribute and in the Authorization header of
outgoing requests; it is never formatted into a message, a repr or a log line.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import quote

import httpx
import orjson

from ._config import DEFAULT_TIMEOUT, Connection
from ._errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    InputError,
    InsufficientCreditError,
    PermissionDeniedError,
    ProtocolError,
    RateLimitError,
    RequestInProgressError,
    RequestRejectedError,
    ServerError,
)
from ._retry import parse_retry_after
from ._version import __version__
from ._wire import BROKEN, MALFORMED, TIMEOUTS, Answer, Outgoing, Timeouts, Wire, open_wire

DEFAULT_CONNECT_TIMEOUT: Final = 10.0
# The most of an answer read: a create's for 100 items is tens of KB, a page of items with
# their outputs a few MB. More is a protocol error, reported before it fills memory.
MAX_CREATE_ANSWER: Final = 4 * 2**20
MAX_ANSWER: Final = 64 * 2**20

_log = logging.getLogger("runflow_frames")
_REQUEST_ID_HEADERS: Final = ("x-request-id", "runflow-request-id", "request-id")

REDACTED: Final = "[redacted]"
# Most characters of server-supplied text an error keeps (a proxy's error page can be long).
MAX_SERVER_TEXT: Final = 500
# Server text read at all: redaction runs before the cut, and never on megabytes.
_READ_SERVER_TEXT: Final = 64 * 1024
# Nesting of server-supplied errors[] kept; deeper is cut (and never recursed into).
_MAX_DEPTH: Final = 16
# What can carry a credential in text a server, or a proxy echoing our request, sends back: an
# Authorization header or field (its whole value), a Bearer token (8+ token characters, so that
# "missing bearer token" stays readable), anything shaped like a Runflow key.
_SECRETS: Final = re.compile(
    r"(?P<auth>authorization\\?[\"']?\s*[:=]\s*)(?:\"[^\"\r\n]*\"?|'[^'\r\n]*'?|[^\r\n]*)"
    r"|(?P<bearer>\bbearer\s+)[\w.~+/=-]{8,}"
    r"|(?<![A-Za-z0-9])rf_(?:live|svc|test)_\w+",
    re.IGNORECASE,
)


def model_path(owner: str, slug: str | None = None) -> str:
    """The percent-encoded model path for ``owner`` and ``slug`` (which may contain ``/``), or
    for ``owner`` alone when it is the whole path (``"acme/echo"``, as the command line takes).

    >>> model_path("google", "nano-banana-pro/edit")
    'google/nano-banana-pro/edit'
    >>> model_path("acme/echo")
    'acme/echo'
    """
    whole = owner if slug is None else f"{owner}/{slug}"
    segments = whole.split("/")
    if len(segments) < 2:
        raise InputError(
            f"model {whole!r} names no slug: give it as 'owner/slug' (e.g. 'acme/echo') or as "
            "owner, slug"
        )
    for segment in segments:
        if segment in ("", ".", ".."):
            raise InputError(f"model path {whole!r} has an empty, '.' or '..' segment")
    return "/".join(quote(s, safe="") for s in segments)


class AsyncRunflowClient:
    """Async client for the Runflow batch API.

    Parameters
    ----------
    api_key : str, optional
        Defaults to the ``RUNFLOW_API_KEY`` environment variable.
    base_url : str, optional
        Defaults to ``RUNFLOW_BASE_URL``, then ``https://api.runflow.io``.
    org_id : str, optional
        Sent as ``X-Organization-Id``; defaults to ``RUNFLOW_ORG_ID``.
    timeout : float
        Seconds a request may take (connecting takes at most 10 s of it).
    transport : httpx.AsyncBaseTransport, optional
        For tests: for example ``httpx.ASGITransport(app)`` to talk to an in-process emulator.

    Use it as an async context manager::

        async with AsyncRunflowClient() as client:
            batch = await client.get_batch(batch_id)
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        org_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        connection: Connection | None = None,
    ) -> None:
        if connection is None:
            connection = Connection.resolve(
                api_key=api_key,
                base_url=base_url,
                org_id=org_id,
                timeout=timeout,
                transport=transport,
            )
        self.connection = connection
        self.base_url = connection.base_url
        self.org_id = connection.org_id
        self.timeout = connection.timeout
        self.__key = connection.api_key.reveal()
        self._transport = connection.transport
        self._wire: Wire | None = None
        self.requests_made = 0

    def key_fingerprint(self, salt: str) -> str:
        """See :meth:`Connection.key_fingerprint`."""
        return self.connection.key_fingerprint(salt)

    def _redact(self, exc: Exception) -> str:
        return redact(f"{type(exc).__name__}: {exc}", key=self.__key)

    def redact(self, value: Any) -> Any:
        """Server-supplied ``value`` (text, or lists and dicts of it) as :func:`redact_value`
        leaves it, this client's API key included."""
        return redact_value(value, key=self.__key)

    def __repr__(self) -> str:
        return f"AsyncRunflowClient(base_url={self.base_url!r}, org_id={self.org_id!r})"

    async def __aenter__(self) -> Self:
        headers = {
            "Authorization": f"Bearer {self.__key}",
            "Accept": "application/json",
            "User-Agent": f"runflow-frames/{__version__}",
        }
        if self.org_id:
            headers["X-Organization-Id"] = self.org_id
        timeouts = Timeouts(connect=min(self.timeout, DEFAULT_CONNECT_TIMEOUT), io=self.timeout)
        self._wire = open_wire(self.base_url, headers, timeouts, self._transport)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._wire is not None:
            await self._wire.aclose()
            self._wire = None

    # -- endpoints -------------------------------------------------------------------------

    async def create_batch(
        self, path: str, body: bytes, *, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """``POST /v1/models/{path}/batches`` with an already-encoded body; returns the 201 body."""
        headers = {"Content-Type": "application/json"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        # Once the server has the request, its answer is waited for past ``timeout`` (up to
        # half the retry policy's time): a second POST while the server still processes the
        # first could meet a server that runs it again. Connecting and sending keep ``timeout``.
        patience = max(self.timeout, self.connection.retry.timeout / 2)
        return await self._request(
            "POST",
            f"/v1/models/{path}/batches",
            content=body,
            headers=headers,
            read_timeout=patience,
            max_bytes=MAX_CREATE_ANSWER,
        )

    async def get_batch(self, batch_id: str) -> dict[str, Any]:
        """``GET /v1/batches/{id}``: the batch with its lean ``items[]``."""
        return await self._request("GET", f"/v1/batches/{quote(batch_id, safe='')}")

    async def list_batch_items(
        self, batch_id: str, *, limit: int = 100, cursor: str | None = None
    ) -> dict[str, Any]:
        """One page of ``GET /v1/batches/{id}/items``."""
        query = f"limit={limit}" + ("" if cursor is None else f"&pq={quote(cursor, safe='')}")
        return await self._request("GET", f"/v1/batches/{quote(batch_id, safe='')}/items?{query}")

    async def get_batch_item(self, batch_id: str, item_id: str) -> dict[str, Any]:
        """``GET /v1/batches/{batch_id}/items/{id}``."""
        return await self._request(
            "GET", f"/v1/batches/{quote(batch_id, safe='')}/items/{quote(item_id, safe='')}"
        )

    async def get_run(self, run_id: str) -> dict[str, Any]:
        """``GET /v1/runs/{id}``."""
        return await self._request("GET", f"/v1/runs/{quote(run_id, safe='')}")

    async def health(self) -> dict[str, Any]:
        """``GET /v1/health``."""
        return await self._request("GET", "/v1/health")

    # -- the one boundary ------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        read_timeout: float | None = None,
        max_bytes: int = MAX_ANSWER,
    ) -> dict[str, Any]:
        if self._wire is None:
            raise RuntimeError("use the client as `async with AsyncRunflowClient() as client:`")
        what = f"{method} {path}"
        self.requests_made += 1
        waited = self.timeout if read_timeout is None else read_timeout
        out = Outgoing(method, self.base_url + path, headers, content, waited, max_bytes, what)
        send = functools.partial(self._wire.send, out)
        try:
            answer = await (self._watched(what, send) if waited > self.timeout else send())
        except TIMEOUTS as exc:
            raise APITimeoutError(f"{what} timed out after {waited:g} s") from exc
        except BROKEN as exc:
            raise APIConnectionError(f"{what} failed: {self._redact(exc)}") from exc
        except MALFORMED as exc:  # a body that cannot be decoded, a malformed answer...
            raise ProtocolError(f"{what}: {self._redact(exc)}") from exc
        status = answer.status
        _log.debug("%s -> %d", what, status)
        if 200 <= status < 300:
            try:
                data = orjson.loads(answer.body)
            except orjson.JSONDecodeError as exc:
                raise ProtocolError(f"{what}: the {status} body is not JSON") from exc
            if not isinstance(data, dict):
                raise ProtocolError(f"{what}: expected a JSON object, got {type(data).__name__}")
            return data
        raise _status_error(what, answer, key=self.__key)

    async def _watched(self, what: str, send: Callable[[], Awaitable[Answer]]) -> Answer:
        """``send()``, saying once if the answer takes longer than ``timeout``: the request is
        then still being processed on the server, and is waited for rather than sent again.
        The event loop's timer says it (a task per request cost a tenth of the round trip)."""
        started = time.monotonic()
        tell = functools.partial(
            _log.warning,
            "%s: no answer after the client's timeout (%g s); the server is still processing "
            "it, and it is waited for rather than sent again (a second POST could be run twice)",
            what,
            self.timeout,
        )
        try:
            said: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
                self.timeout, tell
            )
        except RuntimeError:  # another event loop than asyncio's: only the line after
            said = None
        try:
            answered = await send()
        finally:
            if said is not None:
                said.cancel()
        took = time.monotonic() - started
        if took > self.timeout:
            _log.warning(
                "%s: answered after %.2f s on the server, past the client's timeout (%g s), "
                "and sent once",
                what,
                took,
                self.timeout,
            )
        return answered


def redact(text: str, *, key: str | None = None, limit: int = MAX_SERVER_TEXT) -> str:
    """Server-supplied ``text`` made safe to show: ``key`` (the client's API key) verbatim, every
    Authorization value, Bearer token and Runflow-shaped key (``rf_live_...``, ``rf_svc_...``,
    ``rf_test_...``) become ``[redacted]``; then it is cut to ``limit`` characters.

    Every piece of text the API sends back passes here before it reaches a message, a column or
    a log line: a proxy in front of the API may echo our request, Authorization header included.
    """
    text = text[:_READ_SERVER_TEXT]
    if key:
        text = text.replace(key, REDACTED)
    text = _SECRETS.sub(_mask, text)
    return text if len(text) <= limit else text[:limit] + " [...]"


def _mask(match: re.Match[str]) -> str:
    return (match.group("auth") or match.group("bearer") or "") + REDACTED


def redact_value(value: Any, *, key: str | None = None, _depth: int = 0) -> Any:
    """``value`` with :func:`redact` applied to every string in it (dict keys too); the value of
    a key naming an Authorization header is dropped whole. Other scalars are kept."""
    if isinstance(value, str):
        return redact(value, key=key)
    if not isinstance(value, list | dict):
        return value
    if _depth >= _MAX_DEPTH:
        return "[...]"
    if isinstance(value, list):
        return [redact_value(v, key=key, _depth=_depth + 1) for v in value]
    return {
        redact(str(k), key=key): (
            REDACTED
            if "authorization" in str(k).lower()
            else redact_value(v, key=key, _depth=_depth + 1)
        )
        for k, v in value.items()
    }


def _status_error(what: str, answer: Answer, *, key: str | None = None) -> APIStatusError:
    """The exception for an error status. What the server said (code, message, errors[], request
    id) is redacted here, once, before it goes anywhere."""
    status, headers, content = answer.status, answer.headers, answer.body
    body = _json_or_none(content)
    code, message, errors = _parse_error_body(body, content)
    code = None if code is None else redact(code, key=key)
    message = None if message is None else redact(message, key=key)
    errors = None if errors is None else redact_value(errors, key=key)
    request_id = next((headers[h] for h in _REQUEST_ID_HEADERS if h in headers), None)
    request_id = None if request_id is None else redact(request_id, key=key, limit=200)
    text = (
        f"{what} -> {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    )
    if request_id:
        text += f" (request id {request_id})"
    cls: type[APIStatusError]
    if status == 401:
        cls = AuthenticationError
        text += "; check RUNFLOW_API_KEY or api_key="
    elif status == 402:
        cls = InsufficientCreditError
    elif status == 403:
        cls = PermissionDeniedError
    elif status == 429:
        cls = RateLimitError
    elif status == 409 and _in_progress(code, message):
        cls = RequestInProgressError
    elif status >= 500:
        cls = ServerError
    else:
        cls = RequestRejectedError
    header = headers.get("retry-after")
    retry_after = parse_retry_after(header, body, time.time())
    return cls(
        text,
        status_code=status,
        code=code,
        errors=errors,
        request_id=request_id,
        retry_after=retry_after,
        retry_after_precise=header is not None
        and re.fullmatch(r"\s*\d*\.\d*[1-9]\d*\s*", header) is not None,
    )


def _in_progress(code: str | None, message: str | None) -> bool:
    """Whether a 409 says the key's first request is still being processed (Stripe's
    ``idempotency_key_in_use``, "request in progress"...), not that the key was used with
    another body. A 409 that says neither is left a refusal, and counted as a request that may
    have been created (``_retry.not_created``): a resume re-sends it, never new rows."""
    said = f"{code or ''} {message or ''}".lower().replace("_", " ")
    return any(words in said for words in _IN_PROGRESS)


_IN_PROGRESS: Final = ("in use", "in progress", "being processed", "still processing")


def _json_or_none(content: bytes) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return None


def _parse_error_body(data: Any, content: bytes) -> tuple[str | None, str | None, list[Any] | None]:
    """Reads ``{code, message, errors}``, ``{"error": {...}}``, ``{"error": "..."}`` and
    FastAPI's ``{"detail": ...}``; falls back to the raw text. Unredacted: see ``redact``."""
    if data is None:
        text = content[:_READ_SERVER_TEXT].decode("utf-8", "replace").strip()
        return None, text or None, None
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict):
            data = inner
        elif isinstance(inner, str):
            return None, inner, None
        code = data.get("code")
        message = data.get("message", data.get("detail"))
        errors = data.get("errors")
        return (
            str(code) if code is not None else None,
            message
            if isinstance(message, str) or message is None
            else orjson.dumps(message).decode(),
            errors if isinstance(errors, list) else None,
        )
    return None, orjson.dumps(data).decode(), None
