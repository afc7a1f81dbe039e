"""The async scheduler: a continuous pipeline of chunk submissions.

``max_concurrency`` workers share one source of chunks; each takes the next chunk the moment its
previous request finishes, so the number of requests in flight stays at the limit until the input
runs out (no waves waiting for their slowest request).

Chunks leave the source in groups: ``before_send`` sees each group before any of its chunks is
handed to a worker, which is where the checkpoint makes their intents durable (one fsync per
group, not per chunk).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice

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


async def submit_chunks(
    client: AsyncRunflowClient,
    path: str,
    chunks: Iterable[Chunk],
    *,
    max_concurrency: int,
    on_submitted: Callable[[Chunk, list[Handle]], None],
    before_send: Callable[[Sequence[Chunk]], None] | None = None,
    group: int = 1,
) -> list[ChunkFailure]:
    """POST every chunk, ``max_concurrency`` at a time; ``on_submitted`` gets verified handles
    (in the chunk's row order).

    After the first failure no new chunk is started; requests already in flight finish and
    their handles are delivered. Returns the failures (empty when every chunk went through).
    """
    source = iter(chunks)
    ready: deque[Chunk] = deque()
    failures: list[ChunkFailure] = []

    def take() -> Chunk | None:
        # Synchronous from start to end: tasks switch only at awaits, so workers never race here.
        if not ready:
            batch = list(islice(source, group))
            if batch and before_send is not None:
                before_send(batch)
            ready.extend(batch)
        return ready.popleft() if ready else None

    async def worker() -> None:
        while not failures and (chunk := take()) is not None:
            try:
                response = await client.create_batch(path, chunk.body, idempotency_key=chunk.key)
                handles = verify_handles(chunk.refs, response)
            except APIError as exc:
                failures.append(ChunkFailure(chunk, exc))
                return
            on_submitted(chunk, [handles[r] for r in chunk.refs])

    async with anyio.create_task_group() as tg:
        for _ in range(max_concurrency):
            tg.start_soon(worker)
    return failures
