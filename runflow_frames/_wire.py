"""What carries a request: aiohttp on asyncio, httpx where a transport is given.

httpx is the seam users and tests see (``transport=``: ``MockTransport``, ASGI transports). When
none is given and the job runs on asyncio, requests go through aiohttp instead: measured by
``benchmarks/bench_http.py`` against the same bare server, httpx 0.29 with httpcore's pool costs
the client about 1 ms of CPU per request (it rescans its pool on every request, encode/httpcore
#1035), aiohttp about 0.3 ms; on a 100-item page of outcomes (100 KB), 1.6 ms against 0.6.
On another event loop (trio), httpx with its own pool.

A wire sends one request and hands back the status, headers and body, read no further than a
cap. It translates nothing: ``TIMEOUTS``, ``BROKEN`` and ``MALFORMED`` name the exceptions of
both libraries for the one boundary in ``_client.py``.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Final, Protocol
from urllib.parse import urlsplit

import aiohttp
import httpx
import yarl

from ._errors import ProtocolError

# Exceptions by what they mean, most specific first (aiohttp's timeouts are also connection
# errors; httpx's are also transport errors).
TIMEOUTS: Final = (httpx.TimeoutException, asyncio.TimeoutError)
BROKEN: Final = (httpx.TransportError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
MALFORMED: Final = (httpx.HTTPError, aiohttp.ClientError)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One request: ``what`` names it in errors; its answer is read for at most
    ``read_timeout`` seconds at a time and no further than ``max_bytes``."""

    method: str
    url: str
    headers: Mapping[str, str] | None
    content: bytes | None
    read_timeout: float
    max_bytes: int
    what: str


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: Mapping[str, str]  # case-insensitive
    body: bytes


class Wire(Protocol):
    async def send(self, out: Outgoing) -> Answer: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds: ``connect`` to open a connection, ``io`` for sending and each read unless a
    request says otherwise."""

    connect: float
    io: float


def open_wire(
    base_url: str,
    headers: Mapping[str, str],
    timeouts: Timeouts,
    transport: httpx.AsyncBaseTransport | None,
) -> Wire:
    """The wire for this client, inside its event loop: aiohttp on asyncio without a given
    transport, else httpx (over ``transport`` when given)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio
        on_asyncio = False
    else:
        on_asyncio = True
    if transport is None and on_asyncio:
        return AiohttpWire(base_url, headers, timeouts)
    return HttpxWire(headers, timeouts, transport)


def env_proxy(url: str) -> str | None:
    """The proxy ``HTTPS_PROXY`` / ``HTTP_PROXY`` (or ``ALL_PROXY``) names for ``url``, unless
    ``NO_PROXY`` exempts its host."""
    parts = urlsplit(url)
    if parts.hostname is None or urllib.request.proxy_bypass(parts.hostname):
        return None
    proxies = urllib.request.getproxies()
    return proxies.get(parts.scheme) or proxies.get("all")


def too_big(out: Outgoing) -> ProtocolError:
    return ProtocolError(
        f"{out.what}: the answer is over {out.max_bytes / 2**20:g} MiB; far more than the API "
        "sends, so it was not read to its end",
        retryable=False,
    )


async def _capped(pieces: AsyncIterator[bytes], out: Outgoing) -> bytes:
    body = bytearray()
    async for piece in pieces:
        body += piece
        if len(body) > out.max_bytes:
            raise too_big(out)
    return bytes(body)


class AiohttpWire:
    """One aiohttp session: a keep-alive pool without a limit (the pipeline bounds what is in
    flight), no redirects followed and the proxy from the environment (as httpx)."""

    def __init__(self, base_url: str, headers: Mapping[str, str], timeouts: Timeouts) -> None:
        self.timeouts = timeouts
        secure = base_url.startswith("https:")
        # httpx's verified context (certifi, or SSL_CERT_FILE / SSL_CERT_DIR): the same trust
        # as through httpx. Loading the CA bundle costs ~20 ms, which loopback never needs.
        tls = httpx.create_ssl_context() if secure else True
        self.session = aiohttp.ClientSession(
            headers=dict(headers),
            connector=aiohttp.TCPConnector(limit=0, ssl=tls),
            # Not trust_env: it reads ~/.netrc and the proxy settings in a worker thread on
            # every request (two thread hops each). The proxy is looked up once, here.
            proxy=env_proxy(base_url),
            cookie_jar=aiohttp.DummyCookieJar(),  # the API sets none
        )

    async def send(self, out: Outgoing) -> Answer:
        connect, io = self.timeouts.connect, self.timeouts.io
        # Each read may take ``read_timeout``; the whole exchange at most that plus a
        # connection and a send (aiohttp has no timeout of its own for sending).
        timeout = aiohttp.ClientTimeout(
            total=connect + io + out.read_timeout, connect=connect, sock_read=out.read_timeout
        )
        async with self.session.request(
            out.method,
            yarl.URL(out.url, encoded=True),  # our path segments are percent-encoded already
            data=out.content,
            headers=out.headers,
            timeout=timeout,
            allow_redirects=False,
        ) as response:
            if (response.content_length or 0) > out.max_bytes:
                raise too_big(out)
            body = await _capped(response.content.iter_any(), out)
            return Answer(response.status, response.headers, body)

    async def aclose(self) -> None:
        await self.session.close()


class HttpxWire:
    """One httpx client over ``transport`` (httpx's own pool when None)."""

    def __init__(
        self,
        headers: Mapping[str, str],
        timeouts: Timeouts,
        transport: httpx.AsyncBaseTransport | None,
    ) -> None:
        self.timeouts = timeouts
        self.client = httpx.AsyncClient(headers=dict(headers), transport=transport)

    async def send(self, out: Outgoing) -> Answer:
        timeout = httpx.Timeout(
            self.timeouts.io, connect=self.timeouts.connect, read=out.read_timeout
        )
        request = self.client.build_request(
            out.method, out.url, content=out.content, headers=out.headers, timeout=timeout
        )
        response = await self.client.send(request, stream=True)
        try:
            body = await _capped(response.aiter_bytes(), out)
        finally:
            await response.aclose()
        return Answer(response.status_code, response.headers, body)

    async def aclose(self) -> None:
        await self.client.aclose()
