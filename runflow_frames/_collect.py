"""collect / acollect and the job summary: the public collect functions, thin, over
``_polling.py`` (polling and paging) and a checkpoint's ``Results`` (``_stores.py``)."""

from __future__ import annotations

import html
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa

from ._config import DEFAULT_TIMEOUT, Connection
from ._errors import APIError, CollectError, DeadlineExceeded, InputError, ProtocolError
from ._frames import to_pandas
from ._heap import keeping
from ._polling import (
    STORED_COLUMNS,
    PollPolicy,
    ResultRows,
    collect_items,
    cost_of,
    decode_outputs,
    encode_outputs,
    finish_columns,
    is_result_column,
)
from ._progress import ProgressOption, Reporter
from ._retry import RetryPolicy
from ._stores import Results, Store, job_parts, read_manifest, recorded_rows, state_at, store_for
from ._sync import keep_partial, sync_twin

if TYPE_CHECKING:
    import httpx

    from ._client import AsyncRunflowClient

NEEDED = ("runflow_client_ref", "runflow_batch_id", "runflow_item_id")
_log = logging.getLogger("runflow_frames")


@dataclass
class Summary:
    """What a job came to: rows by status, total cost, failures by code, time and requests.

    Shown as text by ``repr`` and as a table in notebooks.
    """

    rows: int
    by_status: dict[str, int]
    total_cost: Decimal
    failures_by_code: dict[str, int]
    wall_time: float | None = None
    api_requests: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def _lines(self) -> list[tuple[str, str]]:
        lines = [("rows", f"{self.rows:,}")]
        lines += [(f"  {status}", f"{n:,}") for status, n in self.by_status.items()]
        lines.append(("total cost", f"{self.total_cost}"))
        lines += [(f"  failed: {code}", f"{n:,}") for code, n in self.failures_by_code.items()]
        if self.wall_time is not None:
            lines.append(("wall time", f"{self.wall_time:.1f} s"))
        if self.api_requests is not None:
            lines.append(("API requests", f"{self.api_requests:,}"))
        return lines

    def __repr__(self) -> str:
        width = max(len(k) for k, _ in self._lines())
        return "\n".join(f"{k:<{width}}  {v}" for k, v in self._lines())

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
            for k, v in self._lines()
        )
        return f"<table class='runflow-summary'>{rows}</table>"


def summarize(df: Any) -> Summary:
    """The summary of a collected frame: rows by status, total cost, failures by code, and the
    time and API requests the collection took.

    Examples
    --------
    >>> summarize(collected)  # doctest: +SKIP
    rows                   1,000
      succeeded              990
      failed                  10
    total cost             1.980
      failed: INPUT_VALIDATION_FAILED  10
    """
    df, _ = to_pandas(df)
    none = pd.Series(pd.NA, index=df.index, dtype="string")
    status = df.get("runflow_status", none).fillna("not collected")
    costs = [c for c in df.get("runflow_cost", []) if isinstance(c, Decimal)]
    codes = df.get("runflow_failure_code", none).dropna()
    return Summary(
        rows=len(df),
        by_status=dict(Counter(status.astype(str)).most_common()),
        total_cost=sum(costs, Decimal(0)),
        failures_by_code=dict(Counter(codes.astype(str)).most_common()),
        wall_time=df.attrs.get("runflow", {}).get("collect_seconds"),
        api_requests=df.attrs.get("runflow", {}).get("api_requests"),
    )


async def acollect(
    source: pd.DataFrame | str | os.PathLike[str],
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    flatten: bool = False,
    deadline: float | None = None,
    poll_interval: tuple[float, float] = (1.0, 15.0),
    max_concurrency: int = 4,
    retry: RetryPolicy | None = None,
    progress: ProgressOption = None,
    api_key: str | None = None,
    base_url: str | None = None,
    org_id: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    transport: httpx.AsyncBaseTransport | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Wait for submitted rows' runs to end and join each row's outcome.

    Polls ``GET /v1/batches/{id}`` for the unfinished batches only, at intervals growing from
    ``poll_interval[0]`` to ``poll_interval[1]`` seconds, at most ``max_concurrency`` requests
    at once, with the same retries and shared backoff as submission; then pages through each
    finished batch's items once.

    Parameters
    ----------
    source : DataFrame or path
        What ``run_batches`` returned, or a checkpoint directory (from any process, of a frame
        or a file job: the result is then indexed by ``client_ref``). A checkpoint's server is
        used only when it is the one this call is configured for (``base_url=``,
        ``RUNFLOW_BASE_URL``, the default): the API key never goes where a file says.
    checkpoint : path, optional
        With a frame as ``source``: where to keep collected outcomes, so that collecting again
        fetches only unfinished batches. A checkpoint ``source`` is used for this too.
    flatten : bool
        Spread the output dict into ``runflow_output.<key>`` columns.
    deadline : float, optional
        Seconds to wait in all; past it, ``DeadlineExceeded`` carries what was collected.
    progress : bool or callable, optional
        A progress bar of rows collected (tqdm; by default only in a terminal or notebook),
        ``False`` for none, or a callable called as ``progress(rows_done, rows_total)``.

    Returns
    -------
    pandas.DataFrame
        ``source`` plus ``runflow_status`` (final), ``runflow_output`` (dict),
        ``runflow_cost`` (Decimal), ``runflow_failure_code``, ``runflow_failure_message`` and
        ``runflow_created_at`` / ``_started_at`` / ``_completed_at`` (UTC).
        :func:`summarize` gives its :class:`Summary`.

    Raises
    ------
    CollectError
        Polling failed for good (retries exhausted, an API error); ``.result`` holds every
        row's handle and the outcomes collected so far.
    DeadlineExceeded
        ``deadline`` passed first (a CollectError).
    CheckpointError
        The checkpoint belongs to another server or organisation than this call's.

    Examples
    --------
    >>> out = run_batches(df, "acme", "echo", checkpoint="ckpt")  # doctest: +SKIP
    >>> done = collect(out)  # doctest: +SKIP
    >>> summarize(done)  # doctest: +SKIP
    """
    if max_concurrency < 1 or not 0 < poll_interval[0] <= poll_interval[1]:
        raise InputError("max_concurrency must be >= 1 and poll_interval (initial, max) positive")
    poll = PollPolicy(
        initial=poll_interval[0],
        max=poll_interval[1],
        max_concurrency=max_concurrency,
        deadline=deadline,
    )
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
    if not isinstance(source, str | os.PathLike):  # a frame: pandas, polars or Arrow
        frame, back = to_pandas(source)
        return back(  # type: ignore[no-any-return]
            await collect_frame(
                frame,
                connection,
                checkpoint=checkpoint,
                poll=poll,
                flatten=flatten,
                progress=progress,
            )
        )
    root = store_for(source, connection.storage_options)
    manifest = read_manifest(root)
    if manifest is not None and manifest.get("kind") == "file":
        connection.check_server(manifest, source)
    frames = []
    for part in job_parts(root):
        frame, unconfirmed = _frame_from_checkpoint(part)
        frames.append(
            await collect_frame(
                frame,
                connection,
                checkpoint=part.location(),
                poll=poll,
                flatten=flatten,
                progress=progress,
                unconfirmed=unconfirmed,
            )
        )
    return pd.concat(frames) if len(frames) > 1 else frames[0]


collect = sync_twin(acollect)


async def collect_frame(
    frame: pd.DataFrame,
    connection: Connection,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    poll: PollPolicy | None = None,
    flatten: bool = False,
    progress: ProgressOption = None,
    unconfirmed: pd.Series | None = None,
    prefetched: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """``frame``'s outcomes joined on (see :func:`collect`); ``unconfirmed`` marks rows a
    checkpoint recorded as sent without an answer; ``prefetched``, outcomes collected while the
    job sent (``_polling.Prefetch``), are not fetched again. However it stops, the error
    carries every row's handle and what was collected."""
    started = time.monotonic()
    missing = [c for c in NEEDED if c not in frame.columns]
    if missing:
        raise InputError(
            f"collect needs the frame run_batches returned (or a checkpoint path); it lacks "
            f"{missing}"
        )
    plan = _Plan(frame)
    store = None if checkpoint is None else Results(checkpoint, connection.storage_options)
    fresh: list[pd.DataFrame] = [] if prefetched is None or prefetched.empty else [prefetched]
    stopped: BaseException | None = None
    unfinished: list[str] = []
    client = connection.client()
    try:
        if store is not None:
            connection.check_server(store.manifest, checkpoint)
        cached = _from_store(store.read()) if store is not None else _empty_results()
        known = pd.concat([cached, *fresh]) if fresh else cached
        try:
            unfinished = await _fetch(client, plan, known, poll or PollPolicy(), progress, fresh)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, with what was collected
            stopped = exc
    finally:
        if store is not None:
            try:
                # Once per collect, whatever stopped it: what was fetched is never fetched again.
                if fresh:
                    store.record(_to_store(pd.concat(fresh)))
            finally:
                store.close()
    out = plan.join(cached, fresh, unfinished, unconfirmed, flatten=flatten)
    out.attrs["runflow"] = {  # JSON-able only: pandas writes attrs into Parquet metadata
        "collect_seconds": round(time.monotonic() - started, 3),
        "api_requests": client.requests_made,
    }
    if stopped is not None:
        if not isinstance(stopped, APIError):
            keep_partial(out)
            raise stopped
        raise CollectError(
            f"waiting for the runs stopped: {stopped}. The runs exist: .result holds every "
            "row's handle and the outcomes collected so far; collect again to finish",
            result=out,
        ) from stopped
    if unfinished:
        waiting = int(plan.batches.isin(unfinished).sum())
        raise DeadlineExceeded(
            f"{len(unfinished)} batch(es) ({waiting} rows) were still running after "
            f"{poll.deadline if poll else None:g} s; .result holds what was collected. Collect "
            "again later to finish.",
            result=out,
        )
    return out


class _Plan:
    """Which rows have a handle, the batches they are in, and how outcomes join back."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.out = frame.drop(columns=[c for c in frame.columns if is_result_column(c)])
        self.batches = self.out["runflow_batch_id"]
        self.handled = self.batches.notna() & self.out["runflow_item_id"].notna()
        self.keys = (self.batches + "/" + self.out["runflow_item_id"]).where(self.handled)
        self.expected: dict[str, set[str]] = {}
        for batch_id, item_id in zip(
            self.batches[self.handled], self.out.loc[self.handled, "runflow_item_id"], strict=True
        ):
            self.expected.setdefault(str(batch_id), set()).add(str(item_id))
        self.statuses: dict[str, str] = {}
        self.malformed: dict[str, str] = {}  # batches whose answers could not be filed

    def join(
        self,
        cached: pd.DataFrame,
        fresh: list[pd.DataFrame],
        unfinished: list[str],
        unconfirmed: pd.Series | None,
        *,
        flatten: bool,
    ) -> pd.DataFrame:
        out, handled, batches = self.out, self.handled, self.batches
        results = pd.concat([cached, *fresh])
        results = results[~results.index.duplicated(keep="last")]
        joined = results.reindex(self.keys.astype(object).where(handled, None)).set_axis(out.index)
        came_back = joined.pop("client_ref")
        notes = joined.pop("runflow_error").astype("string")
        wrong = handled & came_back.notna() & (came_back != out["runflow_client_ref"])
        if wrong.any():
            first = out.index[wrong.to_numpy()][0]
            raise ProtocolError(
                f"{int(wrong.sum())} item(s) came back with another row's client_ref (row "
                f"{first!r} got {came_back[first]!r}): refusing to join them"
            )
        # Rows of unfinished batches show the batch's last status, for now; rows a checkpoint
        # recorded as sent without an answer show "pending" (resume the job to settle them).
        if unfinished:
            waiting = batches.isin(unfinished)
            joined.loc[waiting.to_numpy(), "runflow_status"] = batches[waiting].map(self.statuses)
        if unconfirmed is not None and unconfirmed.any():
            joined.loc[unconfirmed.to_numpy(), "runflow_status"] = "pending"
            _log.warning(
                "%d row(s) were sent but their answer never came back: they show status "
                "'pending'; resume the job (the same call, same checkpoint) to settle them",
                int(unconfirmed.sum()),
            )
        # A row with a handle has no submission error: its runflow_error says what was wrong
        # with its answer, or with its batch's.
        if self.malformed:
            notes = notes.mask(batches.isin(self.malformed), batches.map(self.malformed))
        errors = out["runflow_error"] if "runflow_error" in out else notes.where(~handled)
        out = out.assign(runflow_error=errors.astype("string").where(~handled, notes))
        return pd.concat([out, finish_columns(joined, flatten=flatten)], axis=1)


async def _fetch(
    client: AsyncRunflowClient,
    plan: _Plan,
    cached: pd.DataFrame,
    poll: PollPolicy,
    progress: ProgressOption,
    fresh: list[pd.DataFrame],
) -> list[str]:
    """Collect the batches whose outcomes are not cached, into ``fresh``; the unfinished."""
    known = plan.keys.isin(cached.index)
    todo = plan.batches[plan.handled & ~known].unique().tolist()
    rows_in = plan.batches[plan.handled].value_counts()
    reporter = Reporter(progress, total=int(plan.handled.sum()), desc="collected")
    reporter.advance(int(known.sum()))

    rows = ResultRows()
    spent = [sum((c for c in cached["runflow_cost"] if isinstance(c, Decimal)), Decimal(0))]

    def on_batch(batch_id: str, batch_rows: list[tuple[Any, ...]]) -> None:
        rows.add(batch_id, batch_rows)
        spent[0] += cost_of(batch_rows)
        reporter.note(spent=f"{spent[0]:f}")
        reporter.advance(int(rows_in.get(batch_id, 0)))

    try:
        with keeping():
            async with client:
                return await collect_items(
                    client,
                    todo,
                    poll=poll,
                    retry=client.connection.retry,
                    on_batch=on_batch,
                    statuses=plan.statuses,
                    expected=plan.expected,
                    on_malformed=plan.malformed.__setitem__,
                )
    finally:
        if rows.keys:  # kept whatever stopped the collection
            fresh.append(rows.frame())
        reporter.close()


def _frame_from_checkpoint(part: Store) -> tuple[pd.DataFrame, pd.Series]:
    """A checkpoint's rows as a handle frame, and which of them are pending (sent, unanswered)."""
    recorded, _ = recorded_rows(state_at(part))
    recorded.insert(0, "runflow_client_ref", recorded.index.astype("string"))
    pending = recorded["state"] == "pending"
    frame = recorded.drop(columns=["state", "chunk", "intent_at", "submitted_at"])
    return frame, pending


def _empty_results() -> pd.DataFrame:
    return pd.DataFrame(columns=list(STORED_COLUMNS), index=pd.Index([], dtype=object))


def _to_store(raw: pd.DataFrame) -> pa.Table:
    """Raw outcomes as text, for the checkpoint."""
    data: dict[str, Any] = {"item_key": raw.index.tolist()}
    for col in STORED_COLUMNS:
        values = raw[col].tolist()
        if col == "runflow_output":
            data[col] = encode_outputs(values)
        else:
            data[col] = [None if v is None or v != v else str(v) for v in values]
    return pa.table(data)


def _from_store(table: pa.Table) -> pd.DataFrame:
    if not table.num_rows:
        return _empty_results()
    data = table.to_pydict()
    frame = pd.DataFrame(
        {col: data[col] for col in STORED_COLUMNS},
        index=pd.Index(data["item_key"], dtype=object),
    )
    frame["runflow_output"] = decode_outputs(data["runflow_output"])
    costs: list[Any] = [None if c is None else Decimal(c) for c in data["runflow_cost"]]
    frame["runflow_cost"] = costs
    return frame
