"""The async scheduler: a continuous pipeline of chunk submissions.

``max_concurrency`` workers share one iterator of chunks; each takes the next chunk the moment
its previous request finishes, so the number of requests in flight stays at the limit until the
input runs out (no waves waiting for their slowest request).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import anyio

from ._client import AsyncRunflowClient
from ._errors import APIError
from ._join import Handle, verify_handles
from ._rows import Chunk


@dataclass(frozen=True, slots=True)
class ChunkFailure:
    """A chunk whose submission failed, and why."""

    chunk: Chunk
    error: APIError


def idempotency_key(job_id: str, chunk: Chunk) -> str:
    """The ``Idempotency-Key`` of a chunk: the same for every POST of that chunk in a job."""
    return f"rff-{job_id}-{chunk.number}"


async def submit_chunks(
    client: AsyncRunflowClient,
    path: str,
    chunks: Iterable[Chunk],
    *,
    job_id: str,
    max_concurrency: int,
    on_submitted: Callable[[Chunk, dict[str, Handle]], None],
) -> list[ChunkFailure]:
    """POST every chunk, ``max_concurrency`` at a time; ``on_submitted`` gets verified handles.

    After the first failure no new chunk is started; requests already in flight finish and
    their handles are delivered. Returns the failures (empty when every chunk went through).
    """
    pending = iter(chunks)
    failures: list[ChunkFailure] = []

    async def worker() -> None:
        # next() on the shared iterator never interleaves: tasks switch only at awaits.
        while not failures and (chunk := next(pending, None)) is not None:
            try:
                response = await client.create_batch(
                    path, chunk.body, idempotency_key=idempotency_key(job_id, chunk)
                )
                handles = verify_handles(chunk.refs, response)
            except APIError as exc:
                failures.append(ChunkFailure(chunk, exc))
                return
            on_submitted(chunk, handles)

    async with anyio.create_task_group() as tg:
        for _ in range(max_concurrency):
            tg.start_soon(worker)
    return failures
