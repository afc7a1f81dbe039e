"""Shared fixtures: an emulator per test, served over real loopback HTTP or mounted in-process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn

from runflow_frames.emulator import Emulator, create_app, serve

API_KEY = "rf_live_test_secret_0123456789"
# Read once, before the autouse fixture below hides it from every other test.
LIVE_API_KEY = os.environ.get("RUNFLOW_API_KEY")
# The console script pip installed next to this Python.
SCRIPT = str(Path(sys.executable).with_name("runflow-frames"))


def interruptible() -> None:
    """``preexec_fn`` of a child a test sends SIGINT to: a shell that runs the suite in the
    background (``cmd &``, nohup) hands its children SIGINT ignored, and Python then installs
    no KeyboardInterrupt handler; Ctrl-C at a terminal is what the test means."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args: str, key: str | None = API_KEY, **env: str) -> subprocess.CompletedProcess[str]:
    """``runflow-frames *args`` in a subprocess, with no RUNFLOW_* variable but ``env`` and the
    API key (``key=None``: none), stdin closed (no prompt)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RUNFLOW_")}
    if key is not None:
        environment["RUNFLOW_API_KEY"] = key
    environment.update(env)
    return subprocess.run(
        [SCRIPT, *args],
        capture_output=True,
        text=True,
        env=environment,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--live", action="store_true", help="also run tests that call the real api.runflow.io"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--live"):
        return
    skip = pytest.mark.skip(reason="talks to the real API: pass --live and set RUNFLOW_API_KEY")
    for item in items:
        if "live" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_runflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never reach api.runflow.io by accident through a developer's environment.
    for name in ("RUNFLOW_API_KEY", "RUNFLOW_BASE_URL", "RUNFLOW_ORG_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def emulator() -> Emulator:
    return Emulator(seed=1)


@pytest.fixture
def base_url(emulator: Emulator) -> Iterator[str]:
    """The emulator served on a free loopback port: real server, real sockets."""
    with serve(emulator) as url:
        yield url


@pytest.fixture
def asgi(emulator: Emulator) -> httpx.ASGITransport:
    """The emulator mounted in-process, for fast tests."""
    return httpx.ASGITransport(app=create_app(emulator))


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    """A raw HTTP client on the served emulator, authenticated, for contract tests."""
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


# -- events instead of wall-clock windows ----------------------------------------------------------
#
# A test that sleeps for a while and then counts what happened measures the machine, not the
# code: on a loaded machine the window holds less (or more). These helpers wait for the event
# itself; their timeouts only keep a broken test from hanging, they are never what is measured.

GUARD = 30.0  # seconds: long enough never to be reached when things work, even on a busy machine


def wait_until(condition: Callable[[], object], what: str, timeout: float = GUARD) -> None:
    """Return once ``condition()`` is true; fail (naming ``what``) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.005)


async def await_until(condition: Callable[[], object], what: str, timeout: float = GUARD) -> None:
    """``wait_until`` for async code: polls without blocking the event loop (what it waits
    for, files on disk or another thread's work, sets no event)."""
    with anyio.move_on_after(timeout):
        while not condition():  # noqa: ASYNC110 - nothing to wait on but the condition itself
            await anyio.sleep(0.005)
        return
    raise AssertionError(f"{what} did not happen within {timeout} s")


class FirstWave:
    """ASGI middleware in front of the emulator's app: holds the first create requests until
    ``size`` of them have arrived together, then lets every request through, and counts the
    most creates it saw in flight at once.

    A test of "the client keeps N requests in flight" then does not depend on N requests
    overlapping by chance: while the first ones are held, the client can only show how many it
    sends at once. The guard opens the gate for good when the client never gets there (the
    count then says how far it got).
    """

    def __init__(self, app: Any, size: int, guard: float = 10.0) -> None:
        self.app, self.size, self.guard = app, size, guard
        self.in_flight = self.most_in_flight = 0
        self._open: anyio.Event | None = None  # made in the server's event loop

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self._open is None:
            self._open = anyio.Event()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        finished = False

        def finish() -> None:
            nonlocal finished
            if not finished:
                finished = True
                self.in_flight -= 1

        async def answer(message: Any) -> None:
            # Out of flight before the answer leaves, as for the emulator's own count: the
            # client can only send its next request after this one counts as done.
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finish()
            await send(message)

        try:
            if self.in_flight >= self.size:
                self._open.set()
            with anyio.move_on_after(self.guard):
                await self._open.wait()
            self._open.set()
            await self.app(scope, receive, answer)
        finally:
            finish()


def _loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # As the emulator's serve() does: without it a response written as headers then body
    # waits ~40 ms for the client's delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """Serve any ASGI app (the emulator's behind a test middleware) on a free loopback port,
    in a background thread, as ``emulator.serve`` does; yields the base URL."""
    sock = _loopback_socket()
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=30
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), "the server's start")
        assert server.started, "the server did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 API (moto's server) on loopback for the session; the standard AWS variables
    point every client at it, this process's and its children's."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    variables = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield url
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture
def bucket(s3_server: str, request: pytest.FixtureRequest) -> str:
    """A new, empty bucket on the session's S3 server: ``s3://<name>``."""
    import boto3

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50]
    name = f"{name.rstrip('-')}-{time.monotonic_ns() % 10**9}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


def objects(url: str) -> list[str]:
    """Every object under ``url`` (an s3:// prefix), relative to it, read from the server."""
    import boto3

    bucket_name, _, prefix = url.removeprefix("s3://").partition("/")
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket_name, Prefix=prefix)
    start = len(prefix) + 1 if prefix else 0
    return sorted(o["Key"][start:] for o in listed.get("Contents", []))


def read_object(url: str) -> bytes:
    """The bytes of the object at ``url`` (s3://bucket/key), read from the server."""
    import boto3

    bucket_name, _, key = url.removeprefix("s3://").partition("/")
    return bytes(boto3.client("s3").get_object(Bucket=bucket_name, Key=key)["Body"].read())
