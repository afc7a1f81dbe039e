"""One throttle for a whole Dask cluster: it lives on the scheduler, every worker asks it.

Partitions run as tasks on many workers, each with its own pipeline; the server's limits are
for all of them together. So a job's ``Throttle`` (the same class a single process uses: the
pace and concurrency cap learned from 429s, AIMD and the shared pause on 503s) lives in a
scheduler plugin, and each try of each request on any worker first takes a *lease* from it
(one RPC) and hands it back with the outcome (one more, not awaited). The 429s of every worker
therefore teach one pace that all of them keep, and the number of requests in flight
cluster-wide never exceeds ``max_concurrency``.

Leases are kept per worker: when a worker dies, the scheduler hands its leases back, so a
killed worker does not shrink the cap for the rest of the job.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, Final, cast

import anyio
from distributed import get_worker
from distributed.diagnostics.plugin import SchedulerPlugin

from ._admission import Outcome, Pace, Ticket
from ._errors import APIError
from ._pipeline import Throttle, hold_of, outcome_of

PLUGIN: Final = "runflow-frames"
_log = logging.getLogger("runflow_frames")


class Coordinator(SchedulerPlugin):
    """The scheduler side: one Throttle per job, and who holds its leases."""

    name = PLUGIN

    def __init__(self) -> None:
        self.throttles: dict[str, Throttle] = {}
        self.leases: dict[str, dict[str, tuple[str, Ticket]]] = {}  # job -> lease -> holder
        self.dropped: set[str] = set()  # leases handed back before they were granted
        self.scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        scheduler.handlers["runflow_acquire"] = self.acquire
        scheduler.handlers["runflow_release"] = self.release

    async def acquire(
        self, job: str, max_concurrency: int, lease: str, worker: str, pace: Pace | None = None
    ) -> tuple[int, Pace]:
        """Wait for the job's throttle (made with ``pace`` when this is its first request) to
        admit one more request; returns its strikes and what it learned."""
        throttle = self.throttles.get(job)
        if throttle is None:
            throttle = Throttle(
                max_concurrency, pace=pace, clock=anyio.current_time, sleep=anyio.sleep
            )
            self.throttles[job] = throttle
            self.leases[job] = {}
        ticket = await throttle.acquire()
        if lease in self.dropped or worker not in self.scheduler.workers:
            # The asker gave up (cancelled) or died while it waited: nobody will hand it back.
            self.dropped.discard(lease)
            throttle.settle(ticket, "failed")
        else:
            self.leases[job][lease] = (worker, ticket)
        return throttle.strikes, throttle.pace()

    def release(self, job: str, lease: str, outcome: Outcome, wait: float | None) -> None:
        held = self.leases.get(job, {}).pop(lease, None)
        if held is None:
            self.dropped.add(lease)
            return
        self.throttles[job].settle(held[1], outcome, wait)

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:  # noqa: ARG002
        for job, leases in self.leases.items():
            for lease, (holder, ticket) in list(leases.items()):
                if holder == worker:
                    del leases[lease]
                    self.throttles[job].settle(ticket, "failed")


def ensure_coordinator(client: Any) -> None:
    """Install the Coordinator on the client's scheduler, once (installing it again would
    drop the throttles of jobs running now)."""

    def installed(dask_scheduler: Any) -> bool:
        return PLUGIN in dask_scheduler.plugins

    if not client.run_on_scheduler(installed):
        client.register_plugin(Coordinator())


class ClusterGate:
    """The worker side: a ``Gate`` (see ``_retry``) whose leases come from the scheduler.

    Our pipeline runs its own event loop in the task's thread; the RPCs run on the worker's
    loop, and this loop awaits them without blocking.
    """

    def __init__(self, job: str, max_concurrency: int) -> None:
        worker = get_worker()
        self._job = job
        self._max = max_concurrency
        self._scheduler = worker.scheduler
        self._address = worker.address
        self._loop: asyncio.AbstractEventLoop = cast(Any, worker.loop).asyncio_loop
        self.strikes = 0
        self._pace: Pace = {"rate": None, "cap": None}  # as of the last lease
        self._start: Pace | None = None

    def _call(self, coroutine: Coroutine[Any, Any, Any]) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    async def acquire(self) -> str:
        lease = uuid.uuid4().hex
        call = self._scheduler.runflow_acquire(
            job=self._job,
            max_concurrency=self._max,
            lease=lease,
            worker=self._address,
            pace=self._start,
        )
        try:
            self.strikes, self._pace = await asyncio.wrap_future(self._call(call))
        except BaseException:
            self._send_release(lease, "failed", None)  # cancelled while waiting: give it back
            raise
        return lease

    def release(self, ticket: str, error: APIError | None, wait: float | None = None) -> None:
        self._send_release(ticket, outcome_of(error), hold_of(error, wait))

    def pace(self) -> Pace:
        return self._pace

    def start_from(self, pace: Pace | None) -> None:
        """The scheduler's throttle starts from it, if this is the job's first request."""
        self._start = pace

    def _send_release(self, lease: str, outcome: Outcome, wait: float | None) -> None:
        call = self._scheduler.runflow_release(
            job=self._job, lease=lease, outcome=outcome, wait=wait
        )
        self._call(call).add_done_callback(_log_failure)


def _log_failure(future: Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        _log.warning("could not hand a lease back to the scheduler: %s", future.exception())
