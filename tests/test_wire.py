"""What carries a request (``_wire``): aiohttp on asyncio without a given transport, httpx with
one; the proxy from the environment, read once; redirects never followed."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from runflow_frames._client import AsyncRunflowClient
from runflow_frames._config import Connection
from runflow_frames._errors import APIStatusError
from runflow_frames._wire import AiohttpWire, HttpxWire, env_proxy

from .conftest import API_KEY


@pytest.mark.parametrize(
    ("env", "url", "proxy"),
    [
        ({"HTTPS_PROXY": "http://proxy:3128"}, "https://api.runflow.io", "http://proxy:3128"),
        (
            {"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "api.runflow.io"},
            "https://api.runflow.io",
            None,
        ),
        ({"HTTP_PROXY": "http://proxy:3128"}, "https://api.runflow.io", None),
        ({}, "https://api.runflow.io", None),
    ],
)
def test_the_proxy_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], url: str, proxy: str | None
) -> None:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert env_proxy(url) == proxy


async def _wire_of(transport: httpx.AsyncBaseTransport | None) -> type:
    connection = Connection.resolve(
        api_key=API_KEY, base_url="http://127.0.0.1:9", transport=transport
    )
    async with AsyncRunflowClient(connection=connection) as client:
        return type(client._wire)


def test_aiohttp_on_asyncio_and_httpx_for_a_given_transport() -> None:
    assert asyncio.run(_wire_of(None)) is AiohttpWire
    mock = httpx.MockTransport(lambda request: httpx.Response(200, json={}))
    assert asyncio.run(_wire_of(mock)) is HttpxWire


async def _redirected() -> tuple[int, list[bytes]]:
    """Against a server that answers every request with a redirect to /v1/health: the status
    the client raised, and the request heads the server saw."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /v1/health\r\n"
            b"Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connection = Connection.resolve(api_key=API_KEY, base_url=f"http://127.0.0.1:{port}")
    async with server, AsyncRunflowClient(connection=connection) as client:
        with pytest.raises(APIStatusError) as raised:
            await client.get_batch("b1")
    return raised.value.status_code, seen


def test_a_redirect_is_an_error_status_never_followed() -> None:
    status, seen = asyncio.run(_redirected())
    assert status == 307
    assert len(seen) == 1, "the redirect was followed"
    assert seen[0].startswith(b"GET /v1/batches/b1 ")
