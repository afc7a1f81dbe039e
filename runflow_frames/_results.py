"""Polling batches until they end, and collecting every row's outcome.

Pure parts first (when a batch is over, where the next page is, what a row's outcome is), then
the async loop: batches are polled with bounded concurrency through the same retry policy and
shared throttle as submission, at intervals that grow; only unfinished batches are polled; a
finished batch's items are paged through once and joined onto the rows by item id.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import anyio
import orjson
import pandas as pd

from ._client import AsyncRunflowClient
from ._errors import APIError, ProtocolError, RunflowError
from ._pipeline import job_gate
from ._retry import RetryPolicy, retrying

# Statuses that end a batch or an item. Both spellings of cancelled occur (Part B5 of the
# contract); "errored" is seen in Runflow's own client code.
TERMINAL: Final = frozenset(
    {"succeeded", "failed", "partial_succeeded", "canceled", "cancelled", "errored"}
)
PAGE_SIZE: Final = 500
DEFAULT_POLL_INITIAL: Final = 1.0
DEFAULT_POLL_MAX: Final = 15.0

# Result columns, in order, added by collect().
RESULT_COLUMNS: Final = (
    "runflow_status",
    "runflow_output",
    "runflow_cost",
    "runflow_failure_code",
    "runflow_failure_message",
    "runflow_created_at",
    "runflow_started_at",
    "runflow_completed_at",
)


def is_result_column(name: object) -> bool:
    """A column collect() fills in (and replaces when it runs again)."""
    return isinstance(name, str) and (name in RESULT_COLUMNS or name.startswith("runflow_output."))


class DeadlineExceeded(RunflowError):  # noqa: N818 - reads as what happened
    """Some batches were still running when ``deadline`` passed.

    ``result`` holds what was collected: finished rows have their outcome, the others their
    last known status. Collect again later (from the frame or the checkpoint) to finish.
    """

    def __init__(self, message: str, *, result: pd.DataFrame) -> None:
        super().__init__(message)
        self.result = result


def batch_is_over(batch: Mapping[str, Any]) -> bool:
    """A terminal status, a ``completed_at``, or counters that add up to the total. Unknown
    statuses are not terminal (keep polling until the deadline)."""
    if batch.get("status_code") in TERMINAL or batch.get("completed_at"):
        return True
    total = batch.get("items_total")
    counts = [batch.get(k) for k in ("items_succeeded", "items_failed", "items_cancelled")]
    if isinstance(total, int) and total > 0 and all(isinstance(c, int) for c in counts):
        return sum(counts) >= total  # type: ignore[arg-type]
    return False


def next_cursor(page: Mapping[str, Any]) -> str | None:
    """The next page's cursor: ``next_pq``, else ``next`` (a bare cursor, or a URL or query
    string carrying ``pq``)."""
    value = page.get("next_pq") or page.get("next")
    if not isinstance(value, str) or not value:
        return None
    if "pq=" in value:
        query = urlsplit(value).query or value.lstrip("?")
        found = parse_qs(query).get("pq")
        return found[0] if found else None
    return value


def _decimal(value: Any) -> Decimal | None:
    if value is None or value == "":
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return None


def outcome(item: Mapping[str, Any]) -> dict[str, Any]:
    """One item's outcome as result-column values (every field optional)."""
    run: Mapping[str, Any] = item["run"] if isinstance(item.get("run"), dict) else {}
    error: Mapping[str, Any] = item["error"] if isinstance(item.get("error"), dict) else {}
    output = item.get("output")
    if output is None:
        output = run.get("output")
    return {
        "runflow_status": item.get("status_code") or run.get("status_code"),
        "runflow_output": output,
        "runflow_cost": _decimal(item.get("cost", run.get("cost"))),
        "runflow_failure_code": error.get("code") or run.get("failure_code"),
        "runflow_failure_message": error.get("message") or run.get("failure_message"),
        "runflow_created_at": item.get("created_at") or run.get("created_at"),
        "runflow_started_at": item.get("started_at") or run.get("started_at"),
        "runflow_completed_at": item.get("completed_at") or run.get("completed_at"),
    }


@dataclass(frozen=True)
class PollPolicy:
    """How collection polls: intervals that grow from ``initial`` to ``max`` seconds, at most
    ``max_concurrency`` requests at once, and an overall ``deadline`` (None: no limit)."""

    initial: float = DEFAULT_POLL_INITIAL
    max: float = DEFAULT_POLL_MAX
    growth: float = 1.5
    max_concurrency: int = 4
    deadline: float | None = None


async def collect_items(
    client: AsyncRunflowClient,
    batch_ids: Iterable[str],
    *,
    poll: PollPolicy,
    retry: RetryPolicy,
    on_batch: Callable[[str, list[dict[str, Any]]], None],
    statuses: dict[str, str] | None = None,
    expected: Mapping[str, set[str]] | None = None,
) -> list[str]:
    """Wait for ``batch_ids`` (in creation order) to end, page through each one's items once
    and hand them to ``on_batch``. Returns the batches still unfinished at the deadline.

    Requests are spent where they tell something. Batches made close together end close
    together, so while waiting only the oldest unfinished batch is polled (the lean
    ``GET /v1/batches/{id}``). Once it is over, the others are swept in order through their item
    lists, ``max_concurrency`` at a time; a batch whose items have all ended is collected by that
    same request, and the sweep stops at the first window in which none had. A finished batch
    thus costs one request (a page of up to 500 items), plus one poll per waiting round.

    ``statuses`` receives the last seen status of each batch. ``expected`` gives the item ids we
    hold for a batch: pages that lack one (a cursor that repeats, a page that goes missing) are
    a ProtocolError, never a silently short result.
    """
    pending = list(dict.fromkeys(batch_ids))
    throttle = job_gate(poll.max_concurrency)
    rng = random.Random()  # noqa: S311 - jitter, not secrets
    started = time.monotonic()
    interval = poll.initial
    seen = statuses if statuses is not None else {}

    async def call(fn: Callable[[], Any]) -> Any:
        return await retrying(
            fn, policy=retry, gate=throttle, clock=anyio.current_time, sleep=anyio.sleep, rng=rng
        )

    async def page_items(batch_id: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        cursors: set[str] = set()
        while True:

            async def one_page(c: str | None = cursor) -> dict[str, Any]:
                return await client.list_batch_items(batch_id, limit=PAGE_SIZE, cursor=c)

            page = await call(one_page)
            got = page.get("items")
            if not isinstance(got, list):
                raise ProtocolError(f"batch {batch_id}: an items page has no items[] list")
            items += got
            cursor = next_cursor(page)
            if cursor is None or not got or cursor in cursors:
                break  # the end, or a server handing a cursor back: never loop on it
            cursors.add(cursor)
        return items

    errors: list[APIError] = []

    async def sweep(batch_id: str, finished: list[str]) -> None:
        try:
            items = await page_items(batch_id)
        except APIError as error:  # surfaces after the window, alone, not in an ExceptionGroup
            errors.append(error)
            return
        states = [outcome(i)["runflow_status"] for i in items]
        lacking = (expected or {}).get(batch_id, set()) - {i.get("id") for i in items}
        if lacking:
            errors.append(
                ProtocolError(
                    f"batch {batch_id}: its pages lack {len(lacking)} of our items (e.g. "
                    f"{sorted(lacking)[:3]}): a cursor repeated or a page went missing",
                    retryable=False,
                )
            )
            return
        if items and all(
            state in TERMINAL or i.get("completed_at")
            for state, i in zip(states, items, strict=True)
        ):
            seen[batch_id] = "over"
            on_batch(batch_id, items)
            finished.append(batch_id)
        else:
            seen[batch_id] = next((str(x) for x in states if x not in TERMINAL), "unknown")

    probe_over = False
    while pending:
        if not probe_over:
            oldest = pending[0]

            async def probe(b: str = oldest) -> dict[str, Any]:
                return await client.get_batch(b)

            batch = await call(probe)
            seen[pending[0]] = str(batch.get("status_code"))
            probe_over = batch_is_over(batch)
        if probe_over:
            finished: list[str] = []
            for start in range(0, len(pending), poll.max_concurrency):
                window = pending[start : start + poll.max_concurrency]
                before = len(finished)
                async with anyio.create_task_group() as tg:
                    for batch_id in window:
                        tg.start_soon(sweep, batch_id, finished)
                if errors:
                    raise errors[0]
                if len(finished) == before:
                    break  # a whole window still running: the rest is younger, wait
            done = set(finished)
            pending = [b for b in pending if b not in done]
            probe_over = False
            if not pending:
                break
        left = math.inf if poll.deadline is None else poll.deadline - (time.monotonic() - started)
        if left <= 0:
            break
        await anyio.sleep(min(interval, left))
        interval = min(poll.max, interval * poll.growth)
    return pending


def item_key(batch_id: str, item_id: str) -> str:
    """Where an item's outcome is filed: ids are opaque and maybe unique only in their batch."""
    return f"{batch_id}/{item_id}"


def results_frame(batch_id: str, items: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Item outcomes indexed by ``item_key`` (result columns, still raw: see ``finish_columns``),
    with the ``client_ref`` each item came back with, to check the join."""
    rows = {
        item_key(batch_id, item["id"]): {**outcome(item), "client_ref": item.get("client_ref")}
        for item in items
        if isinstance(item.get("id"), str)
    }
    return pd.DataFrame.from_dict(rows, orient="index", columns=[*RESULT_COLUMNS, "client_ref"])


def finish_columns(df: pd.DataFrame, *, flatten: bool) -> pd.DataFrame:
    """Typed result columns: timestamps as UTC datetimes, cost as Decimal (object), and the
    output dict spread into ``runflow_output.<key>`` columns when ``flatten``."""
    for col in ("runflow_created_at", "runflow_started_at", "runflow_completed_at"):
        df[col] = pd.to_datetime(df[col], utc=True, format="ISO8601")
    for col in ("runflow_status", "runflow_failure_code", "runflow_failure_message"):
        df[col] = df[col].astype("string")
    if flatten:
        outputs = [o if isinstance(o, dict) else {} for o in df["runflow_output"]]
        spread = pd.json_normalize(outputs).set_axis(df.index)
        spread.columns = [f"runflow_output.{c}" for c in spread.columns]
        at = list(df.columns).index("runflow_output")
        df = pd.concat([df.iloc[:, :at], spread, df.iloc[:, at + 1 :]], axis=1)
    return df


def encode_outputs(outputs: Iterable[Any]) -> list[str | None]:
    """Outputs as JSON text, for storing in a checkpoint."""
    return [None if o is None else orjson.dumps(o).decode() for o in outputs]


def decode_outputs(texts: Iterable[str | None]) -> list[Any]:
    return [None if t is None else orjson.loads(t) for t in texts]
