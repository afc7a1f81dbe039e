"""run_batches / arun_batches: argument checks and the wiring of the parts."""

from __future__ import annotations

import logging
import os
import time
import uuid
import warnings
from collections.abc import Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import anyio
import pandas as pd

from ._checkpoint import Checkpoint, Intent, plan_resume, row_digests
from ._client import DEFAULT_TIMEOUT, AsyncRunflowClient, model_path
from ._collect import acollect
from ._errors import APIStatusError, InputError, StaleIntentWarning, SubmissionError
from ._frames import to_pandas
from ._join import Handles, HandleTable, check_no_collision, join_handles
from ._pipeline import ChunkFailure, Errors, ends_the_job, one_error, submit_chunks
from ._progress import ProgressOption, Reporter
from ._results import is_result_column
from ._retry import RetryPolicy
from ._rows import (
    MAX_CALLBACK_URL_LEN,
    MAX_CHUNK_SIZE,
    Chunk,
    Missing,
    body_suffix,
    chunk_body,
    client_refs,
    encode_rows,
    item_columns,
)
from ._sync import run_sync

if TYPE_CHECKING:
    import httpx

_log = logging.getLogger("runflow_frames")

DEFAULT_CHUNK_SIZE: Final = MAX_CHUNK_SIZE
# A pandas DataFrame, a pyarrow Table or a polars DataFrame: the result is of the same type.
Frame = TypeVar("Frame")
DEFAULT_MAX_CONCURRENCY: Final = 8
# Chunks whose intents are written (and fsync'd) together, ahead of their POSTs: one fsync per
# 16 chunks cost 1.8 us of CPU per row against a local server, one per 64 about 1 us.
INTENT_GROUP: Final = 64
# Longest time an answer waits in memory before its done record is written and fsync'd.
SYNC_INTERVAL: Final = 1.0
# Idempotency-Key retention is undocumented; a day is the common convention (Stripe's, e.g.).
DEFAULT_MAX_INTENT_AGE: Final = 24 * 3600.0


async def arun_batches(
    df: Frame,
    owner: str,
    slug: str,
    *,
    key: Hashable | None = None,
    columns: Sequence[Hashable] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    metadata: dict[str, Any] | None = None,
    callback_url: str | None = None,
    missing: Missing = "omit",
    checkpoint: str | os.PathLike[str] | None = None,
    max_intent_age: float = DEFAULT_MAX_INTENT_AGE,
    errors: Errors = "raise",
    retry: RetryPolicy | None = None,
    wait: bool = False,
    progress: ProgressOption = None,
    api_key: str | None = None,
    base_url: str | None = None,
    org_id: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Frame:
    """Async twin of :func:`run_batches`, for code already inside an event loop.

    Examples
    --------
    >>> result = await arun_batches(df, "acme", "echo")  # doctest: +SKIP
    """
    frame, back = to_pandas(df)
    _check_options(
        chunk_size, max_concurrency, missing, metadata, callback_url, max_intent_age, errors
    )
    path = model_path(owner, slug)
    check_no_collision(list(frame.columns))
    fields = item_columns(frame, key, columns)
    refs = client_refs(frame, key)
    # Encode everything before the first request: every refusal happens while nothing is sent.
    items = encode_rows(frame, refs, fields, missing=missing)
    suffix = body_suffix(metadata, callback_url)
    client = AsyncRunflowClient(
        api_key=api_key, base_url=base_url, org_id=org_id, timeout=timeout, transport=transport
    )

    ckpt: Checkpoint | None = None
    new_handles = HandleTable()
    reporter = Reporter(progress, total=len(refs), desc="submitted")
    try:
        if checkpoint is None:
            job_id, first_number = uuid.uuid4().hex, 0
            pending: list[tuple[Intent, list[int]]] = []
            unsent: Sequence[int] = range(len(refs))
        else:
            ckpt = Checkpoint.open(
                checkpoint,
                {
                    "model": path,
                    "base_url": client.base_url,
                    "org_id": client.org_id,
                    "key": None if key is None else str(key),
                    "columns": fields,
                    "missing": missing,
                    # As sent: the same dict with its keys in another order (or 1 for 1.0)
                    # would make other bytes, and a re-sent chunk a 409.
                    "metadata": None if metadata is None else suffix.decode(),
                    "callback_url": callback_url,
                },
                client.key_fingerprint,
            )
            digests = row_digests(items)
            pending, unsent = plan_resume(ckpt.state, refs, digests)
            ckpt.check_api_key(client.key_fingerprint(ckpt.job_id), pending=bool(pending))
            _warn_if_stale([intent for intent, _ in pending], max_intent_age)
            job_id, first_number = ckpt.job_id, ckpt.state.next_chunk()
            ckpt.start()
            reporter.advance(ckpt.state.submitted().num_rows)

        def chunks() -> Iterator[Chunk]:
            # Pending intents first, byte for byte and with their recorded keys.
            for intent, rows in pending:
                body = chunk_body([items[i] for i in rows], suffix)
                yield Chunk(intent.chunk, tuple(rows), intent.refs, body, intent.key, resent=True)
            for n, start in enumerate(range(0, len(unsent), chunk_size)):
                rows = list(unsent[start : start + chunk_size])
                number = first_number + n
                body = chunk_body([items[i] for i in rows], suffix)
                yield Chunk(
                    number,
                    tuple(rows),
                    tuple(refs[i] for i in rows),
                    body,
                    f"rff-{job_id}-{number}",
                )

        async def before_send(group: Sequence[Chunk]) -> None:
            if ckpt is None:
                return
            now = time.time()
            ckpt.intend(
                Intent(c.number, c.key, now, c.refs, digests.take(c.rows))
                for c in group
                if c.number not in ckpt.state.intents
            )
            # Durable before any of them is sent; the fsync waits in a thread, so answers to
            # the requests in flight are handled meanwhile.
            await anyio.to_thread.run_sync(ckpt.sync)
            ckpt.compact_in_background()

        def on_failed(failure: ChunkFailure) -> None:
            # A refused chunk created nothing: its rows go back to unsent, so a resume sends
            # them again (maybe fixed). An uncertain one stays pending, to be re-sent as is.
            if ckpt is not None and not failure.maybe_created:
                ckpt.reject(failure.chunk.number)
            reporter.advance(len(failure.chunk.refs))

        def on_unsent(chunk: Chunk) -> None:
            # Intended ahead of its POST, never sent (the job stopped): unsent again.
            if ckpt is not None and not chunk.resent:
                ckpt.reject(chunk.number)

        def on_submitted(chunk: Chunk, chunk_handles: Handles) -> None:
            if ckpt is not None:
                ckpt.record(chunk.number, chunk_handles)
            else:
                new_handles.add(chunk.refs, chunk_handles)
            reporter.advance(len(chunk.refs))

        started = time.monotonic()
        with one_error():
            async with client, anyio.create_task_group() as syncing:
                if ckpt is not None:
                    syncing.start_soon(_sync_answers, ckpt)
                failures = await submit_chunks(
                    client,
                    path,
                    chunks(),
                    max_concurrency=max_concurrency,
                    on_submitted=on_submitted,
                    on_failed=on_failed,
                    on_unsent=on_unsent,
                    before_send=before_send,
                    group=max(INTENT_GROUP, 2 * max_concurrency),
                    errors=errors,
                    policy=retry,
                )
                syncing.cancel_scope.cancel()
    except BaseException as exc:
        reporter.close()
        if ckpt is not None:
            try:
                ckpt.close()
            except Exception as also:  # noqa: BLE001 - the first error is the one to see
                exc.add_note(f"closing the checkpoint failed too: {also!r}")
        raise
    reporter.close()

    if ckpt is None:
        handles = new_handles.to_arrow()
        result = join_handles(frame, refs, handles, _error_messages(failures))
    else:
        # Every handle of a checkpointed job, old or new, is in its segments. Closing writes
        # them to Parquet and fsyncs, which release the GIL: in a thread, while they are joined.
        handles = ckpt.state.submitted()
        with ThreadPoolExecutor(1, thread_name_prefix="runflow-checkpoint") as pool:
            closing = pool.submit(ckpt.close)
            try:
                result = join_handles(frame, refs, handles, _error_messages(failures))
            finally:
                closing.result()
    if failures and (errors == "raise" or any(ends_the_job(f.error) for f in failures)):
        error = _submission_error(
            failures, result, len(refs), handles.num_rows, checkpoint, started
        )
        raise error from failures[0].error
    if failures:
        _log.warning(
            "%d of %d rows failed; their runflow_error column says why. %s",
            sum(len(f.chunk.refs) for f in failures),
            len(refs),
            _summary(failures),
        )
    if wait:
        result = await acollect(
            result,
            checkpoint=checkpoint,
            retry=retry,
            progress=progress,
            api_key=api_key,
            base_url=base_url,
            org_id=org_id,
            timeout=timeout,
            transport=transport,
        )
    return cast(Frame, back(result))


async def _sync_answers(ckpt: Checkpoint) -> None:
    """Answers are written with the next group's intents; when none comes for a while (after
    the last group, or from a slow server), at least every ``SYNC_INTERVAL`` seconds."""
    while True:
        await anyio.sleep(SYNC_INTERVAL)
        await anyio.to_thread.run_sync(ckpt.sync)


def _error_messages(failures: Sequence[ChunkFailure]) -> dict[str, str]:
    """The runflow_error of each row of a failed chunk."""
    return {ref: f.message() for f in failures for ref in f.chunk.refs}


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


def _submission_error(
    failures: Sequence[ChunkFailure],
    result: pd.DataFrame,
    rows: int,
    submitted: int,
    checkpoint: str | os.PathLike[str] | None,
    started: float,
) -> SubmissionError:
    first = failures[0].error
    uncertain = sum(len(f.chunk.refs) for f in failures if f.maybe_created)
    if checkpoint is not None:
        how = (
            f"re-run the same call with checkpoint={os.fspath(checkpoint)!r} to send the rest "
            "(nothing is sent twice)"
        )
    elif uncertain:
        how = (
            f"{uncertain} of the rows without a handle may have been created all the same "
            "(no answer came back): re-sending them could run them twice. Use checkpoint= to "
            "make jobs resumable"
        )
    else:
        how = "to send the rest, pass df[err.result['runflow_run_id'].isna()]"
    return SubmissionError(
        f"{rows - submitted} of {rows} rows were not submitted after "
        f"{time.monotonic() - started:.1f} s. Failed: {_summary(failures)}; first error: "
        f"{first}. The {submitted} submitted rows' handles are in this error's .result "
        f"(runflow_error says why a row failed); {how}.",
        result=result,
        submitted=submitted,
        not_submitted=rows - submitted,
        uncertain=uncertain,
    )


def _check_options(
    chunk_size: int,
    max_concurrency: int,
    missing: str,
    metadata: object,
    callback_url: object,
    max_intent_age: float,
    errors: str,
) -> None:
    if not (isinstance(chunk_size, int) and 1 <= chunk_size <= MAX_CHUNK_SIZE):
        raise InputError(
            f"chunk_size must be an integer from 1 to {MAX_CHUNK_SIZE}, got {chunk_size!r}"
        )
    if not (isinstance(max_concurrency, int) and max_concurrency >= 1):
        raise InputError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
    if missing not in ("omit", "null"):
        raise InputError(f"missing must be 'omit' or 'null', got {missing!r}")
    if metadata is not None and not isinstance(metadata, dict):
        raise InputError(f"metadata must be a dict, got {type(metadata).__name__}")
    if callback_url is not None and (
        not isinstance(callback_url, str) or len(callback_url) > MAX_CALLBACK_URL_LEN
    ):
        raise InputError(
            f"callback_url must be a string of at most {MAX_CALLBACK_URL_LEN} characters"
        )
    if errors not in ("raise", "keep"):
        raise InputError(f"errors must be 'raise' or 'keep', got {errors!r}")
    if not max_intent_age > 0:
        raise InputError(f"max_intent_age must be positive seconds, got {max_intent_age!r}")


def _warn_if_stale(pending: Sequence[Intent], max_age: float) -> None:
    now = time.time()
    stale = [i for i in pending if now - i.at > max_age]
    if stale:
        oldest = max(now - i.at for i in stale)
        warnings.warn(
            f"re-sending {len(stale)} chunk(s) ({sum(len(i.refs) for i in stale)} rows) whose "
            f"first POST may be up to {oldest / 3600:.1f} h old; if the server no longer "
            "remembers their Idempotency-Keys, rows it did receive then will run twice",
            StaleIntentWarning,
            stacklevel=3,
        )


def run_batches(
    df: Frame,
    owner: str,
    slug: str,
    *,
    key: Hashable | None = None,
    columns: Sequence[Hashable] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    metadata: dict[str, Any] | None = None,
    callback_url: str | None = None,
    missing: Missing = "omit",
    checkpoint: str | os.PathLike[str] | None = None,
    max_intent_age: float = DEFAULT_MAX_INTENT_AGE,
    errors: Errors = "raise",
    retry: RetryPolicy | None = None,
    wait: bool = False,
    progress: ProgressOption = None,
    api_key: str | None = None,
    base_url: str | None = None,
    org_id: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Frame:
    """Submit every row of ``df`` to a Runflow model as batch items and join the handles back.

    Each row becomes one input item whose ``client_ref`` is the row's key; items go out in
    chunks of ``chunk_size``, ``max_concurrency`` requests at a time. Works the same in a script
    and in a notebook cell (inside a running event loop).

    Parameters
    ----------
    df : pandas.DataFrame, pyarrow.Table or polars.DataFrame
        One row per item. The result is of the same type (a Table or a polars frame has no
        index: rows are keyed by ``key``, or by their position).
    owner, slug : str
        The model, e.g. ``"acme", "echo"``; ``slug`` may contain ``/`` for longer model paths.
    key : column label, optional
        Column whose values are the row keys; defaults to the index. Keys must be unique,
        non-null and at most 255 characters as strings.
    columns : list of column labels, optional
        Columns that become item fields; defaults to every column but the key.
    chunk_size : int, default 100
        Items per request, 1 to 100.
    max_concurrency : int, default 8
        Requests in flight at once.
    metadata : dict, optional
        Sent as the ``metadata`` of every batch.
    callback_url : str, optional
        Sent as the ``callback_url`` of every batch.
    missing : {"omit", "null"}, default "omit"
        Whether a missing value (None, NaN, NaT, pd.NA) leaves its field out of the item or
        sends it as ``null``.
    checkpoint : path, optional
        A directory where the job records, durably, what it is about to send and what the
        server answered. Re-running the same call with the same directory resumes: chunks
        whose answer was lost are re-sent byte for byte with their Idempotency-Key (the server
        replays them), rows never sent are sent, nothing is sent twice, and the result holds
        every row's handle. New rows added to the input are sent; a different model, server,
        key, columns or options, or changed values for recorded rows, are refused.
    max_intent_age : float, default 86400
        Seconds after which a resume warns (StaleIntentWarning) before re-sending a chunk
        whose answer was lost: the server may have forgotten its Idempotency-Key.
    errors : {"raise", "keep"}, default "raise"
        What a chunk that fails for good does (a 422, or retries exhausted). ``"raise"``: no new
        chunk starts, requests in flight finish, then SubmissionError says what failed, for
        how many rows, and how to resume. ``"keep"``: the job goes on, and the returned frame
        says in ``runflow_error`` why each failed row has no handle. Either way a 401, 402,
        403 or an unknown model stops the job at once (every request would fail), with
        nothing lost.
    retry : RetryPolicy, optional
        How hard each request tries (attempts, total time, backoff). Connection errors,
        timeouts, 429 and 5xx are retried; other 4xx never are. A 429 or 503 pauses every
        request, and concurrency adapts down and back up to ``max_concurrency``.
    wait : bool, default False
        Also wait for the runs to end and join their outcomes, as :func:`collect` does.
    progress : bool or callable, optional
        A progress bar of rows submitted (tqdm.auto: a widget in notebooks, a bar in terminals;
        by default shown only where someone can see it), ``False`` for none, ``True`` to force
        it, or a callable called as ``progress(rows_done, rows_total)``.
    api_key, base_url, org_id : str, optional
        Default to ``RUNFLOW_API_KEY``, ``RUNFLOW_BASE_URL`` (then ``https://api.runflow.io``)
        and ``RUNFLOW_ORG_ID``.
    timeout : float, default 60
        Seconds one request may take.
    transport : httpx.AsyncBaseTransport, optional
        For tests, e.g. ``httpx.ASGITransport(emulator.app)``.

    Returns
    -------
    pandas.DataFrame
        A new frame with ``df``'s index, order and columns, plus ``runflow_client_ref``,
        ``runflow_batch_id``, ``runflow_item_id``, ``runflow_run_id``,
        ``runflow_sequence_index`` and ``runflow_status``.

    Raises
    ------
    InputError
        Before any request, for bad keys, unencodable values or impossible options.
    CheckpointError
        Before any request, when ``checkpoint`` is corrupted or belongs to another job.
    SubmissionError
        When the job stopped part-way; ``.result`` holds every submitted row's handle.

    Examples
    --------
    >>> import pandas as pd
    >>> from runflow_frames import run_batches
    >>> df = pd.DataFrame({"prompt": ["a cat", "a dog"]}, index=["r1", "r2"])
    >>> out = run_batches(df, "acme", "echo")  # doctest: +SKIP
    >>> out["runflow_run_id"].notna().all()  # doctest: +SKIP
    True
    """

    async def job() -> Frame:
        return await arun_batches(
            df,
            owner,
            slug,
            key=key,
            columns=columns,
            chunk_size=chunk_size,
            max_concurrency=max_concurrency,
            metadata=metadata,
            callback_url=callback_url,
            missing=missing,
            checkpoint=checkpoint,
            max_intent_age=max_intent_age,
            errors=errors,
            retry=retry,
            wait=wait,
            progress=progress,
            api_key=api_key,
            base_url=base_url,
            org_id=org_id,
            timeout=timeout,
            transport=transport,
        )

    return run_sync(job)


FAILED_STATUSES: Final = frozenset({"failed", "errored"})


async def aretry_failed(
    df: pd.DataFrame,
    owner: str,
    slug: str,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    wait: bool = False,
    **options: Any,
) -> pd.DataFrame:
    """Async twin of :func:`retry_failed`."""
    if "runflow_status" not in df.columns:
        raise InputError("retry_failed needs a collected frame (collect() or wait=True first)")
    failed = df["runflow_status"].isin(FAILED_STATUSES).to_numpy()
    attempts = (
        df["runflow_attempt"].astype("Int64")
        if "runflow_attempt" in df.columns
        else pd.Series(1, index=df.index, dtype="Int64")
    )
    out = df.copy()
    out["runflow_attempt"] = attempts
    if not failed.any():
        return out
    attempt = int(attempts[failed].max()) + 1
    inputs = df.loc[failed, [c for c in df.columns if not str(c).startswith("runflow_")]]
    # Each attempt is its own exactly-once job, with its own sub-checkpoint: calling this again
    # after a crash resumes the same attempt instead of sending the rows a third time.
    sub = None if checkpoint is None else Path(checkpoint) / f"attempt-{attempt}"
    again = await arun_batches(inputs, owner, slug, checkpoint=sub, wait=wait, **options)
    again["runflow_attempt"] = attempt
    # The retried rows' old outcome is no longer theirs: clear it, then put in what is new.
    stale = [c for c in out.columns if is_result_column(c)]
    out[stale] = out[stale].mask(pd.Series(failed, index=out.index), None)
    for column in (c for c in again.columns if str(c).startswith("runflow_")):
        if column not in out.columns:
            out[column] = pd.Series(pd.NA, index=out.index, dtype=again[column].dtype)
        out.loc[failed, column] = again[column].to_numpy()
    return out


def retry_failed(
    df: pd.DataFrame,
    owner: str,
    slug: str,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    wait: bool = False,
    **options: Any,
) -> pd.DataFrame:
    """Submit again, as new items, only the rows whose runs failed.

    Takes a collected frame (``collect`` or ``wait=True``); rows whose ``runflow_status`` is
    ``failed`` are sent again with the same guarantees as ``run_batches`` (with ``checkpoint``,
    under ``<checkpoint>/attempt-<n>``, so a crash mid-retry resumes rather than re-sends).
    Returns the frame with those rows' handles (and, with ``wait=True``, outcomes) replaced and
    ``runflow_attempt`` counting the tries of each row. Other keyword options are those of
    ``run_batches``.

    Examples
    --------
    >>> done = run_batches(df, "acme", "uppercase", checkpoint="ckpt", wait=True)  # doctest: +SKIP
    >>> fixed = retry_failed(done, "acme", "uppercase", checkpoint="ckpt", wait=True)  # doctest: +SKIP
    """

    async def job() -> pd.DataFrame:
        return await aretry_failed(df, owner, slug, checkpoint=checkpoint, wait=wait, **options)

    return run_sync(job)
