"""run_batches / retry_failed: the public submit functions, thin. They turn their keyword
arguments into configuration values (``_config.py``), build a submit job (``_job.py``) over a
journal, run it, and collect when asked to wait."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import anyio.to_thread
import pandas as pd

from ._budget import Budget
from ._canary import Canary, CanaryReport, judge
from ._client import model_path
from ._collect import collect_frame
from ._config import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_MAX_INTENT_AGE,
    DEFAULT_TIMEOUT,
    Connection,
    Errors,
    JobOptions,
)
from ._errors import CanaryFailedError, InputError
from ._frames import to_pandas
from ._job import SubmitJob
from ._journal import Journal, Kind
from ._objectstore import inside
from ._pipeline import one_error
from ._polling import PollPolicy, Prefetch, is_result_column
from ._progress import ProgressOption
from ._retry import RetryPolicy
from ._rows import Missing
from ._sync import sync_twin

_log = logging.getLogger("runflow_frames.canary")
# wait=True polls the oldest batch sooner than collect() does: its runs were just created,
# and the user is waiting for them (at most one lean GET per 2 s while they run).
WAIT_POLL = PollPolicy(initial=0.25, max=2.0)

if TYPE_CHECKING:
    import httpx

# A pandas DataFrame, a pyarrow Table or a polars DataFrame: the result is of the same type.
Frame = TypeVar("Frame")
FAILED_STATUSES: Final = frozenset({"failed", "errored"})


async def arun_batches(
    df: Frame,
    owner: str,
    slug: str | None = None,
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
    canary: int | bool = False,
    canary_max_failed: float = 0.5,
    max_cost: Decimal | float | str | None = None,
    progress: ProgressOption = None,
    api_key: str | None = None,
    base_url: str | None = None,
    org_id: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    transport: httpx.AsyncBaseTransport | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Frame:
    """Submit every row of ``df`` to a Runflow model as batch items and join the handles back.

    Each row becomes one input item whose ``client_ref`` is the row's key; items go out in
    chunks of ``chunk_size``, ``max_concurrency`` requests at a time. ``run_batches`` works the
    same in a script and in a notebook cell (inside a running event loop); in async code,
    ``await arun_batches(...)`` takes the same arguments.

    Parameters
    ----------
    df : pandas.DataFrame, pyarrow.Table or polars.DataFrame
        One row per item. The result is of the same type (a Table or a polars frame has no
        index: rows are keyed by ``key``, or by their position).
    owner, slug : str
        The model, e.g. ``"acme", "echo"``; ``slug`` may contain ``/`` for longer model paths.
        Or the whole path as one argument, ``"acme/echo"``, as the command line takes it.
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
    canary : int or bool, default False
        Send this many first rows (``True``: one chunk), wait for their runs, and send the rest
        only when at most ``canary_max_failed`` of them failed; else CanaryFailedError, with
        nothing else sent. The canary's rows are part of the job: with ``checkpoint=`` a re-run
        does not send them again. The report (success rate, cost per run, failures by code) is
        logged and kept in the result's ``attrs["runflow"]["canary"]``.
    canary_max_failed : float, default 0.5
        The share of the canary's runs that may fail (failed, cancelled, or refused).
    max_cost : Decimal, number or decimal text, optional
        A budget, in the account's currency. While it sends, the job polls its batches for
        the cost of finished runs and starts no chunk that could take what was spent, what
        the runs still going will cost (at the price learned) and that chunk over it; until a
        first run has a price, one round of chunks at most. Then the requests in flight finish
        and BudgetExceeded says what was spent and committed. With ``checkpoint=``, what
        earlier runs sent counts against the budget of a re-run.
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
        ``runflow_sequence_index``, ``runflow_status`` and ``runflow_error`` (why a row has no
        handle). With ``wait=True`` also the outcome columns :func:`collect` adds.

    Raises
    ------
    InputError
        Before any request, for bad keys, unencodable values or impossible options.
    CheckpointError
        Before any request, when ``checkpoint`` is corrupted or belongs to another job.
    CanaryFailedError
        Too many of the canary's runs failed; nothing else was sent (a SubmissionError).
    BudgetExceeded
        The next chunk could have gone over ``max_cost`` (a SubmissionError).
    SubmissionError
        When the job stopped part-way (or its checkpoint could not be written); ``.result``
        holds every submitted row's handle.
    CollectError
        With ``wait=True``, when waiting for the runs failed; ``.result`` holds every row's
        handle and the outcomes collected so far (``DeadlineExceeded`` is one).
    JobInterrupted
        Ctrl-C, from synchronous code; ``.result`` holds every row that has a handle.

    Examples
    --------
    >>> import pandas as pd
    >>> from runflow_frames import run_batches
    >>> df = pd.DataFrame({"prompt": ["a cat", "a dog"]}, index=["r1", "r2"])
    >>> out = run_batches(df, "acme", "echo")  # doctest: +SKIP
    >>> out["runflow_run_id"].notna().all()  # doctest: +SKIP
    True
    """
    frame, back = to_pandas(df)
    options = JobOptions(
        key=key,
        columns=columns,
        chunk_size=chunk_size,
        max_concurrency=max_concurrency,
        metadata=metadata,
        callback_url=callback_url,
        missing=missing,
        errors=errors,
        max_intent_age=max_intent_age,
    )
    model = model_path(owner, slug)
    # Every public function keeps its keyword arguments and resolves them here, once: the
    # same call in each (the repetition is the keyword signature users' code relies on).
    connection = Connection.resolve(
        api_key=api_key,
        base_url=base_url,
        org_id=org_id,
        timeout=timeout,
        transport=transport,
        retry=retry,
        storage_options=storage_options,
    )
    result = await submit_frame(
        frame,
        model,
        options,
        connection,
        checkpoint=checkpoint,
        wait=wait,
        progress=progress,
        canary=Canary.of(canary, canary_max_failed, chunk_size),
        budget=Budget.of(max_cost, max_concurrency),
    )
    return cast(Frame, back(result))


async def submit_frame(
    frame: pd.DataFrame,
    model: str,
    options: JobOptions,
    connection: Connection,
    *,
    checkpoint: str | os.PathLike[str] | None,
    wait: bool,
    progress: ProgressOption,
    kind: Kind = "frame",
    canary: Canary | None = None,
    budget: Budget | None = None,
) -> pd.DataFrame:
    """One submit job over ``frame`` (after its canary, if any), then, with ``wait``, its
    outcomes (every face's path)."""
    job = SubmitJob(frame, model, options, connection)
    opened: Journal | None = await job.open(checkpoint, kind)
    memory = opened if checkpoint is None else None  # one for the canary and the rest

    async def journal() -> Journal:
        nonlocal opened
        if memory is not None:
            return memory
        if opened is not None:
            first, opened = opened, None
            return first
        # Opening a checkpoint reads it (and on object storage may wait for a lease): off
        # the event loop, which an async caller's other tasks share.
        return await anyio.to_thread.run_sync(job.journal, checkpoint, kind)

    report = None
    if canary is not None:
        report = await _fly(job, canary, connection, await journal(), checkpoint, progress, budget)
    if not wait:
        result = await job.run(await journal(), progress, budget=budget)
    else:  # outcomes are collected while the job still sends, the rest after it
        poll = replace(WAIT_POLL, sent_at=time.monotonic())
        prefetch = Prefetch(connection.client(), poll, connection.retry)
        with one_error():
            async with prefetch.client, anyio.create_task_group() as collecting:
                collecting.start_soon(prefetch.run)
                result = await job.run(
                    await journal(), progress, budget=budget, on_submitted=prefetch.sent
                )
                prefetch.stop()
        result = await collect_frame(
            result,
            connection,
            checkpoint=checkpoint,
            progress=progress,
            poll=poll,
            prefetched=prefetch.rows.frame(),
        )
    if report is not None:
        result.attrs.setdefault("runflow", {})["canary"] = report.to_json()
    return result


async def _fly(
    job: SubmitJob,
    canary: Canary,
    connection: Connection,
    journal: Journal,
    checkpoint: str | os.PathLike[str] | None,
    progress: ProgressOption,
    budget: Budget | None,
) -> CanaryReport:
    """Send the canary's rows, wait for their runs and judge them: CanaryFailedError when too
    many failed (nothing else sent), else the report."""
    rows = min(canary.rows, len(job.refs))
    poll = replace(WAIT_POLL, sent_at=time.monotonic())
    sent = await job.run(journal, progress, limit=rows, budget=budget)
    head = await collect_frame(
        sent.iloc[:rows], connection, checkpoint=checkpoint, progress=progress, poll=poll
    )
    report = judge(head, canary.max_failed)
    if report.passed:
        _log.info("%s: sending the rest", report)
        return report
    result = sent.copy()  # the rows after the canary's were not sent: no handle, no outcome
    for column in head.columns:
        if column not in sent.columns or is_result_column(column):
            result[column] = head[column].reindex(result.index)
    resume = (
        f"with checkpoint={os.fspath(checkpoint)!r}, re-running sends no canary row again"
        if checkpoint is not None
        else "pass checkpoint= to keep the canary's runs when you re-run"
    )
    raise CanaryFailedError(
        f"{report}. Nothing else was sent: fix the cause (or raise canary_max_failed) and "
        f"re-run; {resume}. This error's .canary holds the canary's rows and outcomes",
        result=result,
        canary=head,
        report=report,
    )


run_batches = sync_twin(arun_batches)


async def aretry_failed(
    df: Any,
    owner: str,
    slug: str | None = None,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    wait: bool = False,
    **options: Any,
) -> Any:
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
    df, back = to_pandas(df)  # pandas, polars or Arrow: the same comes back
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
        return back(out)
    attempt = int(attempts[failed].max()) + 1
    inputs = df.loc[failed, [c for c in df.columns if not str(c).startswith("runflow_")]]
    # Each attempt is its own exactly-once job, with its own sub-checkpoint: calling this again
    # after a crash resumes the same attempt instead of sending the rows a third time.
    sub = None if checkpoint is None else inside(checkpoint, f"attempt-{attempt}")
    again = await arun_batches(inputs, owner, slug, checkpoint=sub, wait=wait, **options)
    again["runflow_attempt"] = attempt
    # The retried rows' old outcome is no longer theirs: clear it, then put in what is new.
    stale = [c for c in out.columns if is_result_column(c)]
    out[stale] = out[stale].mask(pd.Series(failed, index=out.index), None)
    for column in (c for c in again.columns if str(c).startswith("runflow_")):
        if column not in out.columns:
            out[column] = pd.Series(pd.NA, index=out.index, dtype=again[column].dtype)
        out.loc[failed, column] = again[column].to_numpy()
    return back(out)


retry_failed = sync_twin(aretry_failed)
