"""How the client uses connections, seen from a plain HTTP server that counts them."""

from __future__ import annotations

import threading
from collections.abc import Coroutine, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import anyio.to_thread
import pytest

from runflow_frames import AsyncRunflowClient

from .conftest import API_KEY, GUARD

BODY = b'{"id": "b1", "items": []}'


class Server(ThreadingHTTPServer):
    daemon_threads = True
    connections = 0
    stall_first = False
    # Answers wait until this many requests are in flight together (0: none wait), at most
    # GUARD seconds, so that a test of concurrent requests does not rely on them overlapping by
    # chance. After that, nothing waits.
    hold_until_in_flight = 0

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.lock = threading.Condition()
        self.in_flight = 0
        self.stalled = threading.Event()  # the first answer is stuck mid-body
        self.release = threading.Event()  # set when the test ends


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.server.stall_first:
            self.server.stall_first = False
            # Headers and a part of the body, then nothing until the test ends: the client
            # gives up mid-body.
            self.wfile.write(b"HTTP/1.1 201 Created\r\nContent-Length: 1000\r\n\r\n{")
            self.wfile.flush()
            self.server.stalled.set()
            self.server.release.wait(GUARD)
            self.close_connection = True
            return
        self.hold()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def hold(self) -> None:
        server = self.server
        with server.lock:
            server.in_flight += 1
            server.lock.notify_all()
            server.lock.wait_for(lambda: server.in_flight >= server.hold_until_in_flight, GUARD)
            server.hold_until_in_flight = 0  # the first wave is in: from now on, no waiting
            server.lock.notify_all()
            server.in_flight -= 1

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
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
    server.hold_until_in_flight = 6  # the first 6 requests are all in flight at once

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
            async with anyio.create_task_group() as tg:

                async def cancel_once_the_body_stalls() -> None:
                    assert await anyio.to_thread.run_sync(server.stalled.wait, GUARD)
                    tg.cancel_scope.cancel()

                tg.start_soon(cancel_once_the_body_stalls)
                await create(client)
            assert tg.cancel_scope.cancelled_caught
            # The next request must not wait for the half-read connection: the stuck one
            # would hold it for the 10 s timeout, a fresh one answers at once (5 s: a guard).
            with anyio.fail_after(5):
                await create(client)

    anyio.run(main)
    assert server.connections == 2
