"""How the client uses connections, seen from a plain HTTP server that counts them."""

from __future__ import annotations

import threading
import time
from collections.abc import Coroutine, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import pytest

from runflow_frames import AsyncRunflowClient

from .conftest import API_KEY

BODY = b'{"id": "b1", "items": []}'


class Server(ThreadingHTTPServer):
    daemon_threads = True
    connections = 0
    stall_first = False
    in_flight_delay = 0.0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.server.stall_first:
            self.server.stall_first = False
            # Headers and a part of the body, then nothing: the client gives up mid-body.
            self.wfile.write(b"HTTP/1.1 201 Created\r\nContent-Length: 1000\r\n\r\n{")
            self.wfile.flush()
            time.sleep(3)
            self.close_connection = True
            return
        time.sleep(self.server.in_flight_delay)
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def url(srv: Server) -> str:
    host, port = srv.server_address[:2]
    return f"http://{host!s}:{port}"


def create(client: AsyncRunflowClient) -> Coroutine[Any, Any, dict[str, Any]]:
    return client.create_batch("acme/echo", b'{"input": [{"v": 1}]}', idempotency_key="k")


def test_sequential_requests_keep_one_connection_alive(server: Server) -> None:
    async def main() -> None:
        async with AsyncRunflowClient(api_key=API_KEY, base_url=url(server)) as client:
            for _ in range(20):
                await create(client)

    anyio.run(main)
    assert server.connections == 1


def test_concurrent_requests_get_a_connection_each_and_keep_them(server: Server) -> None:
    server.in_flight_delay = 0.05

    async def main() -> None:
        async with (
            AsyncRunflowClient(api_key=API_KEY, base_url=url(server)) as client,
            anyio.create_task_group() as tg,
        ):
            for _ in range(6):  # 6 workers, 5 requests each

                async def worker() -> None:
                    for _ in range(5):
                        await create(client)

                tg.start_soon(worker)

    anyio.run(main)
    assert server.connections == 6


def test_a_request_cancelled_mid_body_leaves_no_stuck_connection(server: Server) -> None:
    server.stall_first = True

    async def main() -> None:
        async with AsyncRunflowClient(api_key=API_KEY, base_url=url(server), timeout=10) as client:
            with anyio.move_on_after(0.3) as scope:
                await create(client)
            assert scope.cancelled_caught
            # The next request must not wait for the half-read connection (10 s timeout).
            with anyio.fail_after(2):
                await create(client)

    anyio.run(main)
    assert server.connections == 2
