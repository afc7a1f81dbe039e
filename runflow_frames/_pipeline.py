"""The async scheduler: a continuous pipeline of chunk submissions behind one shared throttle.

``max_concurrency`` workers share one source of chunks; each takes the next chunk the moment its
previous one is done, so requests stay in flight until the input runs out (no waves waiting for
their slowest request). Every try of every request passes the ``Throttle``: the async shell of
``_admission.Admission``, which paces tries once the server has refused some with 429 (the pace
learned by ``_rate.RateController``), caps the requests in flight when the 429s come from a
cap on them, and halves the concurrency on a 503 (AIMD, as TCP does) while everyone waits out
the pause it called for. A 429 holds back only the request that got it (its ``Retry-After``).

Chunks leave the source in groups: ``before_send`` sees each group before any of its chunks is
handed to a worker, which is where the checkpoint makes their intents durable (one fsync per
group, not per chunk). The next group is prepared in a task of its own while half of the
current one is still waiting, so workers do not stall on it. The first group is one chunk per
worker, and each next one twice the last, up to ``group``: the first request does not wait for
a whole group to be made.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import islice

import anyio
import anyio.abc
import anyio.lowlevel

from ._admission import Admission, Outcome, Pace, Ticket
from ._client import AsyncRunflowClient
from ._config import Errors
from ._errors import (
    APIError,
    AuthenticationError,
    InsufficientCreditError,
    PermissionDeniedError,
    ProtocolError,
    RateLimitError,
    RequestInProgressError,
    RequestRejectedError,
)
from ._handles import Handles, verify_handles
from ._retry import Gate, RetryPolicy, not_created, overloaded, retrying
from ._rows import Chunk

_log = logging.getLogger("runflow_frames")


@dataclass(frozen=True, slots=True)
class ChunkFailure:
    """A chunk whose submission failed for good, and why.

    ``maybe_created`` is True when some try of it may have been processed: one got no usable
    answer (a timeout, a lost connection, a 5xx, an unreadable 201, a 409), or the chunk was
    left pending by an earlier run (whose tries this run never saw). Only a chunk first sent in
    this run and refused with a 4xx on every try surely created nothing.
    """

    chunk: Chunk
    error: APIError
    maybe_created: bool

    def message(self) -> str:
        """The ``runflow_error`` of its rows."""
        if self.maybe_created and not_created(self.error):
            return f"{self.error} (an earlier try got no answer: the server may have it)"
        return str(self.error)


def ends_the_job(error: APIError) -> bool:
    """Errors every further request would get too: a bad key, no credit, no permission, a
    model that does not exist or takes no batches."""
    if isinstance(error, AuthenticationError | InsufficientCreditError | PermissionDeniedError):
        return True
    return isinstance(error, RequestRejectedError) and (
        error.code in ("MODEL_NOT_FOUND", "MODEL_NOT_BATCH_CAPABLE") or error.status_code == 404
    )


def hold_of(error: APIError | None, wait: float | None) -> float | None:
    """The wait a throttle imposes on everyone after ``error``: a 503's, and a 429's only when
    its ``Retry-After`` is precise (see ``_admission``)."""
    if isinstance(error, RateLimitError):
        return error.retry_after if error.retry_after_precise else None
    return wait


def outcome_of(error: APIError | None) -> Outcome:
    """What a throttle needs to know of how a try went."""
    if error is None:
        return "ok"
    if isinstance(error, RateLimitError):
        return "rate_limited"
    return "overloaded" if overloaded(error) else "failed"


class Throttle:
    """Admission for every try of every request of a job (``_admission.Admission``: the pace
    learned from 429s, a concurrency cap learned from them, AIMD on 503s), on a clock.

    ``acquire`` waits until a try may leave and returns its ticket; ``release`` hands the ticket
    back with how the try went. One Throttle serves a job; a file job's blocks share one, and a
    Dask cluster's scheduler holds one for every worker (``_cluster``).
    """

    def __init__(
        self,
        max_concurrency: int,
        *,
        pace: Pace | None = None,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self.admission = Admission(max_concurrency, **(pace or {}))
        self._clock = clock
        self._sleep = sleep
        self._changed = anyio.Event()

    @property
    def strikes(self) -> int:
        return self.admission.strikes

    def pace(self) -> Pace:
        """What was learned, to start a resumed job from (kept in its checkpoint)."""
        return self.admission.learned()

    def start_from(self, pace: Pace | None) -> None:
        """Start from ``pace`` unless something was learned already (a shared throttle that
        served another block or partition)."""
        fresh = self.admission.learned() == {"rate": None, "cap": None}
        if pace and fresh and not self.admission.in_flight:
            self.admission = Admission(self.admission.max, **pace)

    async def acquire(self) -> Ticket:
        while True:
            hold = self.admission.wait(self._clock())
            if hold is None:
                await self._changed.wait()
            elif hold > 0:
                await self._sleep(hold)
            else:
                return self.admission.take(self._clock())

    def release(self, ticket: Ticket, error: APIError | None, wait: float | None = None) -> None:
        self.settle(ticket, outcome_of(error), hold_of(error, wait))

    def settle(self, ticket: Ticket, outcome: Outcome, wait: float | None = None) -> None:
        """``release`` by kind of outcome (what a throttle in another process is sent)."""
        self.admission.settle(ticket, outcome, self._clock(), wait)
        changed, self._changed = self._changed, anyio.Event()
        changed.set()


# The gate every request made in this context passes instead of a job's own Throttle: set to a
# cluster-wide one (``_cluster.ClusterGate``) while a Dask task runs a partition.
SHARED_GATE: ContextVar[Gate | None] = ContextVar("runflow_frames_shared_gate", default=None)


@contextmanager
def one_error() -> Iterator[None]:
    """A task group that failed because of one exception (a checkpoint write, Ctrl-C) raises
    that exception itself, not an ExceptionGroup around it."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def job_gate(max_concurrency: int, pace: Pace | None = None) -> Gate:
    """The context's shared gate, else a Throttle of the job's own (starting from ``pace``)."""
    shared = SHARED_GATE.get()
    if shared is not None:
        shared.start_from(pace)
        return shared
    return Throttle(max_concurrency, pace=pace, clock=anyio.current_time, sleep=anyio.sleep)


async def submit_chunks(
    client: AsyncRunflowClient,
    path: str,
    chunks: Iterable[Chunk],
    *,
    max_concurrency: int,
    on_submitted: Callable[[Chunk, Handles], None],
    on_failed: Callable[[ChunkFailure], None] | None = None,
    on_unsent: Callable[[Chunk], None] | None = None,
    before_send: Callable[[Sequence[Chunk]], Awaitable[None]] | None = None,
    group: int = 1,
    errors: Errors = "raise",
    policy: RetryPolicy | None = None,
    rng: random.Random | None = None,
    gate: Gate | None = None,
    admit: Callable[[Chunk], Awaitable[bool]] | None = None,
) -> list[ChunkFailure]:
    """POST every chunk with retries; ``on_submitted`` gets verified handles (in the chunk's row
    order), ``on_failed`` each chunk that failed for good, ``on_unsent`` each chunk taken
    ahead (``before_send`` saw it) but never sent because the job stopped. ``admit`` (a
    budget) may hold a chunk back before its first POST, or refuse it: then no chunk starts
    again.

    With ``errors="raise"`` the first failure stops new chunks; with ``"keep"`` only an error
    that ends the job does (``ends_the_job``). Requests in flight always finish. Returns the
    failures.
    """
    sender = _Sender(
        client,
        path,
        iter(chunks),
        group=group,
        first=max_concurrency,
        before_send=before_send,
        policy=policy or RetryPolicy(),
        rng=rng or random.Random(),  # noqa: S311 - jitter, not secrets
        throttle=gate or job_gate(max_concurrency),
        admit=admit,
    )

    def failed(failure: ChunkFailure) -> None:
        if on_failed is not None:
            on_failed(failure)
        if errors == "raise" or ends_the_job(failure.error):
            sender.stopped = True

    with one_error():
        async with anyio.create_task_group() as tg:
            for _ in range(max_concurrency):
                tg.start_soon(sender.worker, tg, on_submitted, failed)
    # Chunks taken ahead (their intents written) that no worker sent before the job stopped.
    while sender.ready and on_unsent is not None:
        on_unsent(sender.ready.popleft())
    return sender.failures


class _Sender:
    """One ``submit_chunks`` call: the chunk source, the chunks made ready ahead, the workers.

    Chunks leave the source in groups, made ready only once ``before_send`` has returned for
    the group (its intents durable); the next group is prepared in a task of its own while half
    of the current one is still ready, so no worker waits for its intents to be written.
    """

    def __init__(
        self,
        client: AsyncRunflowClient,
        path: str,
        source: Iterator[Chunk],
        *,
        group: int,
        first: int,
        before_send: Callable[[Sequence[Chunk]], Awaitable[None]] | None,
        policy: RetryPolicy,
        rng: random.Random,
        throttle: Gate,
        admit: Callable[[Chunk], Awaitable[bool]] | None = None,
    ) -> None:
        self.client, self.path, self.source = client, path, source
        self.group, self.before_send, self.admit = group, before_send, admit
        self.size = max(1, min(group, first))  # of the next group
        self.policy, self.rng, self.throttle = policy, rng, throttle
        self.ready: deque[Chunk] = deque()
        self.failures: list[ChunkFailure] = []
        self.stopped = False
        self.exhausted = self.refilling = False
        self.refilled = anyio.Event()

    async def refill(self) -> None:
        # Making a group takes milliseconds: first let the request that started this refill go
        # out (aiohttp writes a body in a task of its own, queued behind this one).
        await anyio.lowlevel.checkpoint()
        size, self.size = self.size, min(self.group, 2 * self.size)
        batch = list(islice(self.source, size))
        if batch and self.before_send is not None:
            await self.before_send(batch)
        self.ready.extend(batch)
        self.exhausted = len(batch) < size
        self.refilling = False
        self.refilled.set()
        self.refilled = anyio.Event()

    async def take(self, tg: anyio.abc.TaskGroup) -> Chunk | None:
        while not self.stopped:
            if not (self.refilling or self.exhausted) and len(self.ready) <= self.size // 2:
                self.refilling = True
                tg.start_soon(self.refill)
            if self.ready:
                return self.ready.popleft()
            if self.exhausted and not self.refilling:
                return None
            await self.refilled.wait()
        return None

    async def worker(
        self,
        tg: anyio.abc.TaskGroup,
        on_submitted: Callable[[Chunk, Handles], None],
        on_failed: Callable[[ChunkFailure], None],
    ) -> None:
        while not self.stopped and (chunk := await self.take(tg)) is not None:
            if self.admit is not None and not (await self.admit(chunk) and not self.stopped):
                self.ready.appendleft(chunk)  # never sent: on_unsent has it
                self.stopped = True
                return
            outcome = await self.send(chunk)
            if isinstance(outcome, ChunkFailure):
                self.failures.append(outcome)
                on_failed(outcome)
            else:
                on_submitted(chunk, outcome)

    async def send(self, chunk: Chunk) -> Handles | ChunkFailure:
        """The chunk's verified handles, or why it failed for good."""

        async def post() -> Handles:
            body = await self.client.create_batch(self.path, chunk.body, idempotency_key=chunk.key)
            try:
                return verify_handles(chunk.refs, body)
            except ProtocolError as exc:  # its text quotes the server's answer: redact it
                raise ProtocolError(self.client.redact(str(exc)), retryable=exc.retryable) from None

        tries: list[APIError] = []
        try:
            return await retrying(
                post,
                policy=self.policy,
                gate=self.throttle,
                clock=anyio.current_time,
                sleep=anyio.sleep,
                rng=self.rng,
                on_retry=lambda error, wait: self._retried(chunk, tries, error, wait),
            )
        except APIError as error:
            tries.append(error)
            maybe_created = chunk.resent or any(not not_created(e) for e in tries)
            return ChunkFailure(chunk, error, maybe_created)

    def _retried(self, chunk: Chunk, tries: list[APIError], error: APIError, wait: float) -> None:
        tries.append(error)
        if isinstance(error, RequestInProgressError):
            _log.warning(
                "chunk %d (%d rows): the server is still processing its first POST (the "
                "client's timeout is %g s); asking again in %.2f s with the same "
                "Idempotency-Key, until it answers with that batch",
                chunk.number,
                len(chunk.refs),
                self.client.timeout,
                wait,
            )
            return
        _log.info(
            "chunk %d (%d rows), try %d: %s; trying again in %.2f s with the same Idempotency-Key",
            chunk.number,
            len(chunk.refs),
            len(tries),
            error,
            wait,
        )
