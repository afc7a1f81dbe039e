"""Serving the emulator over real HTTP on loopback: in a background thread, or in the foreground."""

from __future__ import annotations

import gc
import ipaddress
import multiprocessing
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from ._app import create_app
from ._state import Emulator

_STARTUP_TIMEOUT = 10.0


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only: ``localhost``, 127.0.0.0/8 or ``::1``.

    Any other name is not, whatever it resolves to now: ``0.0.0.0`` and ``::`` listen on every
    interface, and a host name may resolve elsewhere tomorrow."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit TCP_NODELAY from the listening one. Without it, a response
    # written as headers then body waits ~40 ms for the client's delayed ACK (Nagle).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock


def _deliver_callbacks(emulator: Emulator, stop: threading.Event) -> None:
    """POST due callbacks until ``stop`` (in its own thread, beside the server)."""
    with httpx.Client(timeout=5.0) as http:
        while not stop.wait(0.05):
            for batch_id, url, body, headers in emulator.due_callbacks():
                try:
                    response = http.post(url, content=body, headers=headers)
                except httpx.HTTPError as exc:
                    emulator.delivered(batch_id, None, type(exc).__name__)
                else:
                    emulator.delivered(batch_id, response.status_code)


@contextmanager
def _callbacks(emulator: Emulator) -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(
        target=_deliver_callbacks, args=(emulator, stop), name="runflow-callbacks", daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=_STARTUP_TIMEOUT)


def _server(emulator: Emulator) -> uvicorn.Server:
    config = uvicorn.Config(
        create_app(emulator),
        log_level="warning",
        access_log=False,
        lifespan="off",
        # Clients keep connections alive across a whole job.
        timeout_keep_alive=30,
    )
    return uvicorn.Server(config)


@contextmanager
def serve(emulator: Emulator | None = None, *, port: int = 0) -> Iterator[str]:
    """Serve ``emulator`` on 127.0.0.1 in a background thread; yields the base URL.

    ``port=0`` picks a free port.

    Examples
    --------
    >>> from runflow_frames.emulator import Emulator, serve
    >>> emulator = Emulator()
    >>> with serve(emulator) as base_url:  # doctest: +SKIP
    ...     run_batches(df, "acme", "echo", base_url=base_url, api_key="test")
    """
    emulator = emulator if emulator is not None else Emulator()
    sock = _bind("127.0.0.1", port)
    bound = sock.getsockname()[1]
    server = _server(emulator)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="runflow-emulator", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + _STARTUP_TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the emulator's server did not start")
        time.sleep(0.005)
    try:
        with _callbacks(emulator):
            yield f"http://127.0.0.1:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=_STARTUP_TIMEOUT)
        sock.close()


def run_forever(
    emulator: Emulator | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    on_ready: Callable[[int], None] | None = None,
    workers: int = 1,
) -> None:
    """Serve in the foreground until interrupted (what ``runflow-frames emulator`` runs);
    ``on_ready`` hears the port once it is bound (an OSError when it cannot be).

    With ``workers`` > 1, that many processes (forked, so POSIX only) accept on the one socket,
    each with its own copy of ``emulator``: its state, limits and accounting are per worker.
    A create's answer is right, but a later GET, an idempotent retry or an accounting query
    lands on whichever worker accepts it: 404 for a batch another worker made, a second run for
    a retried create, a part of the counts. It suits create-only throughput sweeps, where one
    process would be the bottleneck.

    The ``/_emulator/`` routes have no access control: ``runflow-frames emulator`` refuses a
    ``host`` that :func:`is_loopback` does not accept unless given ``--allow-remote``."""
    emulator = emulator if emulator is not None else Emulator()
    with _bind(host, port) as sock:
        if workers > 1:
            sock.listen(2048)  # bound and listening before a worker forks, so none is missed
        if on_ready is not None:
            on_ready(sock.getsockname()[1])
        if workers == 1:
            _serve_on(emulator, sock)
            return
        # A SIGTERM ends the workers too (each runs uvicorn, which handles its own signals).
        signal.signal(signal.SIGTERM, _exit)
        context = multiprocessing.get_context("fork")
        procs = [
            context.Process(target=_work, args=(emulator, sock, n), name=f"emulator-{n}")
            for n in range(workers)
        ]
        for proc in procs:
            proc.start()
        try:
            for proc in procs:
                proc.join()
        finally:
            for proc in procs:
                proc.terminate()
                proc.join()


def _exit(signum: int, frame: object) -> None:  # noqa: ARG001 - a signal handler's signature
    raise SystemExit(128 + signum)


def _work(emulator: Emulator, sock: socket.socket, number: int) -> None:
    emulator.as_worker(number)
    _serve_on(emulator, sock)


def _serve_on(emulator: Emulator, sock: socket.socket) -> None:
    gc.callbacks.append(_freeze_survivors)
    with _callbacks(emulator):
        _server(emulator).run(sockets=[sock])


def _freeze_survivors(phase: str, info: dict[str, int]) -> None:
    """What survives a generation-1 collection moves out of the collector's sight (``gc.freeze``).

    The emulator keeps every batch and item it made. A full collection walks them all: 20-50 ms
    once it holds some 100,000 items, measured here, landing inside some create's service time
    (a server slower than the one asked for, by chance). Frozen, they are never walked again;
    cycles among them are never collected, which a test server can afford. Only the emulator's
    own process does this (``run_forever``), not ``serve`` in a caller's."""
    if phase == "stop" and info["generation"] == 1:
        gc.freeze()
