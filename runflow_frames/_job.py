"""The submit job: plan -> chunks -> run -> join. The exactly-once protocol in one place.

Every face goes through it: ``run_batches`` (with or without a checkpoint, ``wait`` or not),
each block of ``run_batches_file`` and the command line, ``retry_failed`` and each Dask
partition. What it records goes to a ``Journal`` (``_journal.py``): in memory, or a checkpoint
directory; the job never asks which.

1. **Plan** (``SubmitJob(...)``, then ``open``): every row is keyed, and its values hashed or
   else encoded, before anything is sent, so every refusal (bad keys, values JSON cannot carry)
   happens while nothing is sent (``_items.py``: a frame that can be hashed cannot fail to
   encode). The rows to send are encoded as their chunks are made, a block at a time, so the
   first request does not wait for the whole frame.
2. **Chunks**: the journal's pending intents first, byte for byte under their recorded keys,
   then the rows never sent, ``chunk_size`` at a time under fresh keys.
3. **Run**: ``submit_chunks`` keeps ``max_concurrency`` requests in flight; each group of chunks
   is made durable (``journal.intend``) before any of its POSTs; answers are recorded as they
   come; a chunk that surely created nothing gives its rows back.
4. **Join**: every handle the journal holds, old and new, onto a copy of the frame. However the
   run stops, the error carries that frame as ``.result``: no submitted row's handle is lost.
"""

from __future__ import annotations

import logging
import os
import random
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread
import pandas as pd
import pyarrow as pa

from ._budget import Budget, Guard
from ._client import AsyncRunflowClient
from ._config import Connection, JobOptions, fingerprint
from ._errors import APIStatusError, BudgetExceeded, CheckpointError, SubmissionError
from ._handles import Handles, check_no_collision, join_handles
from ._items import Items
from ._journal import MANIFEST, DirectoryJournal, Journal, Kind, MemoryJournal, Resume
from ._objectstore import ObjectJournal, is_url
from ._pipeline import ChunkFailure, ends_the_job, job_gate, one_error, submit_chunks
from ._progress import ProgressOption, Reporter
from ._retry import Gate, retrying
from ._rows import Chunk, body_suffix, chunk_body, client_refs, item_columns
from ._sync import keep_partial

_log = logging.getLogger("runflow_frames")

# Chunks whose intents are written (and fsync'd) together, ahead of their POSTs: one fsync per
# 16 chunks cost 1.8 us of CPU per row against a local server, one per 64 about 1 us.
INTENT_GROUP: Final = 64
ENCODE_AHEAD: Final = 4096  # rows encoded at once, at most, while a job runs (about 4 ms)


class SubmitJob:
    """One submit job over a pandas frame. Made, it has checked the columns and the batch
    options; ``open`` works out its rows' keys (``refs``) and ``items`` (values hashed, or
    encoded), off the event loop."""

    refs: list[str]
    items: Items

    def __init__(
        self, frame: pd.DataFrame, model: str, options: JobOptions, connection: Connection
    ) -> None:
        check_no_collision(list(frame.columns))
        # Its own view: rows are read as they are sent, and a change the caller makes to
        # ``frame`` meanwhile copies the caller's data, not this one's (pandas 3's copy on
        # write; pandas 2 does so with ``pd.options.mode.copy_on_write = True``).
        self.frame = frame.copy(deep=False)
        self.model = model
        self.options = options
        self.connection = connection
        self.fields = item_columns(frame, options.key, options.columns)
        self.suffix = body_suffix(options.metadata, options.callback_url)

    def _check_rows(self) -> None:
        self.refs = client_refs(self.frame, self.options.key)
        # Values that hash can all be encoded: they are encoded as they are sent (``_chunks``),
        # so the first request leaves without waiting for the whole frame. Others are now.
        self.items = Items(self.frame, self.refs, self.fields, self.options.missing)

    async def open(self, checkpoint: str | os.PathLike[str] | None, kind: Kind) -> Journal:
        """Check the rows (keys, values) and open the journal, both before anything is sent and
        in threads. A checkpoint directory that exists is read meanwhile: on a big resume that
        is a third of the time to the first request. A new checkpoint is made only once the
        rows passed, so a refused frame leaves none behind."""
        if not _is_directory_checkpoint(checkpoint):
            await anyio.to_thread.run_sync(self._check_rows)
            return await anyio.to_thread.run_sync(self.journal, checkpoint, kind)
        with ThreadPoolExecutor(1, thread_name_prefix="runflow-checkpoint") as pool:
            opening = pool.submit(self.journal, checkpoint, kind)
            try:
                await anyio.to_thread.run_sync(self._check_rows)
            except BaseException:
                if opening.exception() is None:  # waits for it
                    opening.result().close()
                raise
            return await anyio.to_thread.run_sync(opening.result)

    def journal(self, checkpoint: str | os.PathLike[str] | None, kind: Kind = "frame") -> Journal:
        """Where this job records: in memory, or the checkpoint at ``checkpoint`` (refused
        before anything is sent when it holds another job)."""
        if checkpoint is None:
            return MemoryJournal()
        job = fingerprint(self.model, self.connection, self.options, self.fields, self.suffix)
        age, key = self.options.max_intent_age, self.connection.key_fingerprint
        if is_url(checkpoint):
            storage = self.connection.storage_options
            return ObjectJournal.open(checkpoint, kind, job, key, age, storage)
        return DirectoryJournal.open(checkpoint, kind, job, key, age)

    async def run(
        self,
        journal: Journal,
        progress: ProgressOption = None,
        *,
        limit: int | None = None,
        budget: Budget | None = None,
        on_submitted: Callable[[str, Sequence[str]], None] | None = None,
    ) -> pd.DataFrame:
        """Send what the journal does not have yet (of the first ``limit`` rows only, when
        given: a canary; within ``budget``, when given); the joined frame. Closes the journal.

        Raises SubmissionError (``.result``: every handle) when chunks failed and ``errors``
        says stop, or when the checkpoint could not be written; any other way out (Ctrl-C)
        leaves that frame with the sync bridge (``keep_partial``)."""
        started = time.monotonic()
        try:
            resume = await anyio.to_thread.run_sync(self._plan, journal, limit)
        except BaseException:
            journal.close()  # refused before anything was sent
            raise
        reporter = Reporter(progress, total=len(self.refs), desc="submitted")
        try:
            reporter.advance(resume.submitted)
            failures = await self._send(journal, resume, reporter, budget, on_submitted)
        except BaseException as exc:
            reporter.close()
            result, _ = self._join(journal, [], exc)
            if isinstance(exc, CheckpointError):  # a write failed mid-run
                raise _stopped(exc, [], result, journal, started) from exc
            keep_partial(result)  # Ctrl-C: the sync bridge hands it over
            raise
        reporter.close()
        result, closing_failed = self._join(journal, failures)
        if closing_failed is not None:  # every answer is in the journal; the frame is here
            raise _stopped(closing_failed, failures, result, journal, started) from closing_failed
        if budget is not None and budget.stopped:
            raise _over_budget(budget, result, journal)
        errors = self.options.errors
        if failures and (errors == "raise" or any(ends_the_job(f.error) for f in failures)):
            error = failures[0].error
            raise _stopped(error, failures, result, journal, started) from error
        if failures:
            _log.warning(
                "%d of %d rows failed; their runflow_error column says why. %s",
                sum(len(f.chunk.refs) for f in failures),
                len(self.refs),
                _summary(failures),
            )
        return result

    async def _send(
        self,
        journal: Journal,
        resume: Resume,
        reporter: Reporter,
        budget: Budget | None,
        tell: Callable[[str, Sequence[str]], None] | None,
    ) -> list[ChunkFailure]:
        guard = None if budget is None else _guard(budget, journal, reporter.note)
        # Who hears of each chunk's POST ending: its batch, or None when it failed.
        heard: list[Callable[[Chunk, Handles | None], None]] = []
        if guard is not None:
            heard.append(
                lambda c, h: guard.answered(None if h is None else h.batch_id, len(c.refs))
            )
        if tell is not None:
            heard.append(lambda _c, h: None if h is None else tell(h.batch_id, h.item_ids))

        def on_failed(failure: ChunkFailure) -> None:
            # A refused chunk created nothing: its rows go back to unsent, so a resume sends
            # them again (maybe fixed). An uncertain one stays pending, to be re-sent as is.
            if not failure.maybe_created:
                journal.created_nothing(failure.chunk)
            reporter.advance(len(failure.chunk.refs))
            for listener in heard:
                listener(failure.chunk, None)

        def on_unsent(chunk: Chunk) -> None:
            # Intended ahead of its POST, never sent (the job stopped): unsent again.
            if not chunk.resent:
                journal.created_nothing(chunk)

        concurrency = self.options.max_concurrency
        gate = job_gate(concurrency, journal.pace())

        def on_submitted(chunk: Chunk, handles: Handles) -> None:
            journal.answered(chunk, handles)
            journal.remember_pace(gate.pace())
            reporter.advance(len(chunk.refs))
            for listener in heard:
                listener(chunk, handles)

        async def admit(chunk: Chunk) -> bool:
            assert guard is not None
            return await guard.admit(len(chunk.refs))

        with one_error():
            async with self.connection.client() as client, anyio.create_task_group() as syncing:
                syncing.start_soon(journal.keep_syncing)
                if guard is not None:
                    syncing.start_soon(guard.watch, _poller(client, gate, self.connection))
                failures = await submit_chunks(
                    client,
                    self.model,
                    self._chunks(resume),
                    max_concurrency=concurrency,
                    on_submitted=on_submitted,
                    on_failed=on_failed,
                    on_unsent=on_unsent,
                    before_send=journal.intend,
                    group=self._group(),
                    errors=self.options.errors,
                    policy=self.connection.retry,
                    gate=gate,
                    admit=None if guard is None else admit,
                )
                syncing.cancel_scope.cancel()
        return failures

    def _plan(self, journal: Journal, limit: int | None) -> Resume:
        """What the journal says is left to send (of the first ``limit`` rows), its pending
        intents encoded."""
        resume = journal.plan(self.refs, self.items)
        if limit is not None:  # unsent is in frame order
            resume = replace(resume, unsent=resume.unsent[: bisect_left(resume.unsent, limit)])
        self.items.encode([r for _, rows in resume.pending for r in rows])
        return resume

    def _group(self) -> int:
        """Chunks whose intents are written together."""
        return max(INTENT_GROUP, 2 * self.options.max_concurrency)

    def _chunks(self, resume: Resume) -> Iterator[Chunk]:
        """Pending intents first, byte for byte and with their recorded keys; then the rows
        never sent, encoded ahead in whole chunks, a block at a time: one chunk, then as many
        rows as were made so far, up to ``ENCODE_AHEAD`` (the first request waits for its own
        rows only, and no block holds the event loop long)."""
        items, suffix, refs = self.items, self.suffix, self.refs
        for intent, rows in resume.pending:
            body = chunk_body(items.take(rows), suffix)
            yield Chunk(intent.chunk, tuple(rows), intent.refs, body, intent.key, resent=True)
        size, unsent, encoded = self.options.chunk_size, resume.unsent, 0
        for n, start in enumerate(range(0, len(unsent), size)):
            if start >= encoded:
                encoded = start + size * max(1, min(ENCODE_AHEAD, start) // size)
                items.encode(_as_run(unsent[start:encoded]))
            rows = list(unsent[start : start + size])
            number = resume.first_chunk + n
            body = chunk_body(items.take(rows), suffix)
            key = f"rff-{resume.job_id}-{number}"
            yield Chunk(number, tuple(rows), tuple(refs[i] for i in rows), body, key)

    def _join(
        self,
        journal: Journal,
        failures: Sequence[ChunkFailure],
        stopped_by: BaseException | None = None,
    ) -> tuple[pd.DataFrame, CheckpointError | None]:
        """Every handle the journal holds onto the frame, while the journal closes in a thread
        (writing Parquet and fsyncing release the GIL); and the error closing it, if any (noted
        on ``stopped_by`` instead when the run already failed)."""
        handles = journal.handles()
        with ThreadPoolExecutor(1, thread_name_prefix="runflow-checkpoint") as pool:
            closing = pool.submit(journal.close)
            result = join_handles(self.frame, self.refs, handles, _error_messages(failures))
            try:
                closing.result()
            except CheckpointError as also:
                if stopped_by is None:
                    return result, also
                # The first error is the one to see.
                stopped_by.add_note(f"closing the checkpoint failed too: {also!r}")
        return result, None


def _as_run(rows: Sequence[int]) -> Sequence[int]:
    """Rows in frame order (``Resume.unsent``) as a range when they are one run, which
    ``Items.encode`` encodes by slices of the frame."""
    if rows and rows[-1] - rows[0] == len(rows) - 1:
        return range(rows[0], rows[-1] + 1)
    return rows


def _poller(
    client: AsyncRunflowClient, gate: Gate, connection: Connection
) -> Callable[[str], Awaitable[dict[str, Any]]]:
    """``GET /v1/batches/{id}`` with the job's retries, through its throttle."""
    rng = random.Random()  # noqa: S311 - jitter, not secrets

    async def get(batch_id: str) -> dict[str, Any]:
        return await retrying(
            lambda: client.get_batch(batch_id),
            policy=connection.retry,
            gate=gate,
            clock=anyio.current_time,
            sleep=anyio.sleep,
            rng=rng,
        )

    return get


def _stopped(
    cause: BaseException,
    failures: Sequence[ChunkFailure],
    result: pd.DataFrame,
    journal: Journal,
    started: float,
) -> SubmissionError:
    rows = len(result)  # a row per frame row
    submitted = int(result["runflow_run_id"].notna().sum())
    uncertain = sum(len(f.chunk.refs) for f in failures if f.maybe_created)
    if journal.where is not None:
        how = (
            f"re-run the same call with checkpoint={os.fspath(journal.where)!r} to send the "
            "rest (nothing is sent twice)"
        )
    elif uncertain:
        how = (
            f"{uncertain} of the rows without a handle may have been created all the same "
            "(no answer came back): re-sending them could run them twice. Use checkpoint= "
            "to make jobs resumable"
        )
    else:
        how = "to send the rest, pass df[err.result['runflow_run_id'].isna()]"
    what = f"Failed: {_summary(failures)}; first error" if failures else "Stopped by"
    head = (
        f"all {rows} rows were submitted, but"
        if submitted == rows
        else f"{rows - submitted} of {rows} rows were not submitted after "
        f"{time.monotonic() - started:.1f} s. {what}:"
    )
    return SubmissionError(
        f"{head} {cause}. The {submitted} submitted rows' handles are in this error's "
        f".result (runflow_error says why a row failed); {how}.",
        result=result,
        submitted=submitted,
        not_submitted=rows - submitted,
        uncertain=uncertain,
    )


def _over_budget(budget: Budget, result: pd.DataFrame, journal: Journal) -> BudgetExceeded:
    submitted, rows = int(result["runflow_run_id"].notna().sum()), len(result)
    again = (
        f"re-run the same call with checkpoint={os.fspath(journal.where)!r} and a higher "
        "max_cost to send the rest (what was spent counts against it; nothing is sent twice)"
        if journal.where is not None
        else "to send the rest, pass df[err.result['runflow_run_id'].isna()] with a budget "
        "for it (use checkpoint= to make a job resumable)"
    )
    return BudgetExceeded(
        f"the next chunk could take the job over its budget of {budget.max_cost}: spent "
        f"{budget.spent} (runs over), committed about {budget.committed()} more (runs still "
        f"going, at {budget.price()} per run); {rows - submitted} of {rows} rows were not "
        f"sent. The {submitted} submitted rows' handles are in this error's .result; {again}.",
        result=result,
        budget=budget.to_json(),
    )


def _guard(budget: Budget, journal: Journal, show: Callable[..., None]) -> Guard:
    """The budget's guard for a run; what earlier runs sent counts against it."""
    for batch_id, rows in _rows_by_batch(journal.handles()).items():
        budget.sent(batch_id, rows)
    return Guard(budget, show)


def _rows_by_batch(handles: pa.Table) -> dict[str, int]:
    """Rows per batch of a handle table, in the order the batches first appear."""
    counts: dict[str, int] = {}
    for batch_id in handles.column("batch_id").to_pylist():
        counts[batch_id] = counts.get(batch_id, 0) + 1
    return counts


def _error_messages(failures: Sequence[ChunkFailure]) -> dict[str, str]:
    """The runflow_error of each row of a failed chunk."""
    return {ref: f.message() for f in failures for ref in f.chunk.refs}


def _is_directory_checkpoint(checkpoint: str | os.PathLike[str] | None) -> bool:
    """Whether ``checkpoint`` is a checkpoint directory that exists (one stat)."""
    return not (checkpoint is None or is_url(checkpoint)) and Path(checkpoint, MANIFEST).exists()


def _summary(failures: Sequence[ChunkFailure]) -> str:
    """Failures by kind: "2 chunk(s) (200 rows): RequestRejectedError 422 VALIDATION_ERROR"."""
    kinds: dict[str, list[int]] = {}
    for f in failures:
        e = f.error
        kind = type(e).__name__
        if isinstance(e, APIStatusError):
            kind += f" {e.status_code}" + (f" {e.code}" if e.code else "")
        counts = kinds.setdefault(kind, [0, 0])
        counts[0] += 1
        counts[1] += len(f.chunk.refs)
    return "; ".join(f"{c} chunk(s) ({r} rows): {k}" for k, (c, r) in kinds.items())
