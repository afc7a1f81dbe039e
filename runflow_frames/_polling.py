"""Polling batches until they end, and collecting every row's outcome.

Pure parts first (when a batch is over, where the next page is, what a row's outcome is), then
the async loop: batches are polled with bounded concurrency through the same retry policy and
shared throttle as submission, at intervals that grow; only unfinished batches are polled; a
finished batch's items are paged through once and joined onto the rows by item id.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from operator import itemgetter
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import anyio
import orjson
import pandas as pd

from ._client import AsyncRunflowClient, redact
from ._errors import APIError, ProtocolError
from ._heap import keeping, settle
from ._pipeline import job_gate
from ._retry import Gate, RetryPolicy, retrying

# Statuses that end a batch or an item. Both spellings of cancelled occur (Part B5 of the
# contract); "errored" is seen in Runflow's own client code.
TERMINAL: Final = frozenset(
    {"succeeded", "failed", "partial_succeeded", "canceled", "cancelled", "errored"}
)
PAGE_SIZE: Final = 500
DEFAULT_POLL_INITIAL: Final = 1.0
DEFAULT_POLL_MAX: Final = 15.0
# The timestamps of an item answer, and of the run it carries.
TIMESTAMP_FIELDS: Final = ("created_at", "started_at", "completed_at")
# Years inside what pandas' datetime64[ns] holds (1677-09-21 to 2262-04-11).
_YEARS: Final = range(1678, 2262)
_log = logging.getLogger("runflow_frames")

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


# What is kept of each item: the result columns, a note on a malformed answer
# (``runflow_error``), and the client_ref it came back with, to check the join.
STORED_COLUMNS: Final = (*RESULT_COLUMNS, "runflow_error", "client_ref")


def is_result_column(name: object) -> bool:
    """A column collect() fills in (and replaces when it runs again)."""
    return isinstance(name, str) and (name in RESULT_COLUMNS or name.startswith("runflow_output."))


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


def _parse_decimal(value: Any) -> Decimal | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise TypeError("a boolean")
    number = Decimal(str(value))
    if not number.is_finite():
        raise ValueError("not finite")
    return number


def canonical_timestamp(value: Any) -> str | None:
    """An ISO 8601 / RFC 3339 timestamp as canonical UTC text (``2024-05-01T12:00:00.123000Z``);
    None for None or ``""``. Anything else raises ValueError (TypeError, OverflowError): what is
    not a timestamp, and years pandas cannot hold. A time without an offset is taken as UTC, as
    pandas takes it."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise TypeError(f"not text but {type(value).__name__}")
    when = datetime.fromisoformat(value)
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    if when.year not in _YEARS:
        raise ValueError("a year pandas cannot hold")
    return when.isoformat(timespec="microseconds")[:-6] + "Z"  # strftime: 3x slower


class _Seen(dict[str, Any]):
    """Well-formed server texts already parsed (timestamps, costs), by their text: an item and
    its run repeat each one, and a batch's items share most. Cleared when it grows past
    ``limit``. Only texts go in: ``True == 1``, so a number could hit another's entry."""

    def __init__(self, parse: Callable[[str], Any], limit: int = 4096) -> None:
        super().__init__()
        self.parse, self.limit = parse, limit

    def __missing__(self, text: str) -> Any:
        if len(self) >= self.limit:
            self.clear()
        value = self[text] = self.parse(text)
        return value


def _shown(value: Any) -> str:
    """A malformed server value, short and redacted, for a note."""
    return redact(repr(value[:100] if isinstance(value, str) else value), limit=80)


def _text(value: Any, scrub: Callable[[str], str] = redact) -> str | None:
    """Server text (a failure code or message) redacted; other JSON as its text."""
    if value is None:
        return None
    return scrub(value if isinstance(value, str) else orjson.dumps(value).decode())


def _unfiled(batch_id: str, items: Sequence[Any]) -> str | None:
    for n, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            return f"batch {batch_id}: malformed answer: item {n} has no string id"
    return None


def _repeated(batch_id: str, items: Sequence[Mapping[str, Any]]) -> str | None:
    ids: set[str] = set()
    for item in items:
        if item["id"] in ids:
            return f"batch {batch_id}: malformed answer: item id {_shown(item['id'])} repeats"
        ids.add(item["id"])
    return None


def _status(item: Mapping[str, Any]) -> Any:
    run = item.get("run")
    return item.get("status_code") or (run.get("status_code") if isinstance(run, dict) else None)


# What ``outcome_values`` gives, in order: the stored columns and the item's id.
OUTCOME_COLUMNS: Final = (*STORED_COLUMNS, "id")
_COST: Final = OUTCOME_COLUMNS.index("runflow_cost")
_ERROR: Final = OUTCOME_COLUMNS.index("runflow_error")
_NOTHING: Final[Mapping[str, Any]] = {}


def outcome_values(
    item: Mapping[str, Any], scrub: Callable[[str], str] = redact
) -> tuple[Any, ...]:
    """One item answer as the values collect keeps (``OUTCOME_COLUMNS``; every field optional):
    the result columns, ``runflow_error`` (what was malformed in the answer), the ``client_ref``
    it came back with and its ``id``.

    Timestamps (the item's, its run's, its error's) become canonical UTC text and costs finite
    Decimals; a malformed value is dropped (None) and noted. Failure texts go through ``scrub``
    and ``redact``. Outcomes are cached once fetched, so only checked values may reach the
    cache: one bad value must never fail this collect, nor every later one. One pass over only
    the fields an outcome uses (no copy of the answer), into a tuple: collect keeps a million."""
    run = item.get("run")
    run = run if isinstance(run, dict) else _NOTHING
    error = item.get("error")
    error = error if isinstance(error, dict) else _NOTHING
    notes: list[str] = []
    times: dict[str, str | None] = {}
    costs: dict[str, Decimal | None] = {}
    for where, answer in (("", item), ("run.", run), ("error.", error)):
        if not answer:
            continue
        for name in TIMESTAMP_FIELDS:
            if name in answer:
                value = _checked_time(answer[name], where, name, notes)
                if where != "error.":  # an error's times are checked, never shown
                    times[name] = times.get(name) or value
        if "cost" in answer:
            costs[where] = _checked_cost(answer["cost"], where, notes)
    output = item.get("output")
    if error or run.get("failure_code") is not None or run.get("failure_message") is not None:
        code = _text(error.get("code"), scrub) or _text(run.get("failure_code"), scrub)
        message = _text(error.get("message"), scrub) or _text(run.get("failure_message"), scrub)
        code, message = _text(code), _text(message)
    else:
        code = message = None
    return (
        _status(item),
        run.get("output") if output is None else output,
        costs[""] if "" in costs else costs.get("run."),
        code,
        message,
        times.get("created_at"),
        times.get("started_at"),
        times.get("completed_at"),
        f"malformed answer: {'; '.join(notes)}" if notes else None,
        item.get("client_ref"),
        item.get("id"),
    )


_TIMES: Final = _Seen(canonical_timestamp)
_COSTS: Final = _Seen(_parse_decimal)


def _checked_cost(value: Any, where: str, notes: list[str]) -> Decimal | None:
    try:
        return _COSTS[value] if value.__class__ is str else _parse_decimal(value)
    except (InvalidOperation, ValueError, TypeError):
        notes.append(f"{where}cost {_shown(value)} is not a decimal number")
        return None


def _checked_time(value: Any, where: str, name: str, notes: list[str]) -> str | None:
    try:
        return _TIMES[value] if value.__class__ is str else canonical_timestamp(value)
    except (ValueError, TypeError, OverflowError):
        notes.append(f"{where}{name} {_shown(value)} is not a timestamp")
        return None


# Rounds the oldest unfinished batch may be seen running before the younger ones are swept
# all the same (a batch stuck behind one slow item must not hold back every other one).
STUCK_ROUNDS: Final = 3
# Seconds to the next round after one that found batches over: batches made close together
# end close together, so the rest follow; a grown interval would leave them waiting.
FOLLOW: Final = 0.2


# When the batches' age is known, no wait between polls longer than this share of it.
AGE_SHARE: Final = 0.1


@dataclass(frozen=True)
class PollPolicy:
    """How collection polls: intervals that grow from ``initial`` to ``max`` seconds, at most
    ``max_concurrency`` requests at once, and an overall ``deadline`` (None: no limit).

    ``sent_at`` (``time.monotonic()`` when the batches were sent, known to ``wait=True``) keeps
    each wait under ``AGE_SHARE`` of their age: runs that take seconds are seen ending within a
    tenth of that, and runs of minutes are polled at ``max`` all the same. Without it, where
    the runs' end falls between two polls decides how late their outcomes come."""

    initial: float = DEFAULT_POLL_INITIAL
    max: float = DEFAULT_POLL_MAX
    growth: float = 1.5
    max_concurrency: int = 4
    deadline: float | None = None
    sent_at: float | None = None

    def wait(self, interval: float) -> float:
        """Seconds to the next poll, ``interval`` being the one grown so far."""
        if self.sent_at is None:
            return interval
        age = time.monotonic() - self.sent_at
        return min(interval, max(self.initial, AGE_SHARE * age))


async def collect_items(
    client: AsyncRunflowClient,
    batch_ids: Iterable[str],
    *,
    poll: PollPolicy,
    retry: RetryPolicy,
    on_batch: Callable[[str, list[tuple[Any, ...]]], None],
    statuses: dict[str, str] | None = None,
    expected: Mapping[str, set[str]] | None = None,
    on_malformed: Callable[[str, str], None] | None = None,
) -> list[str]:
    """Wait for ``batch_ids`` (in creation order) to end, page through each one's items once
    and hand them to ``on_batch``. Returns the batches still unfinished at the deadline.

    Requests are spent where they tell something. Batches made close together end close
    together, so while waiting only the oldest unfinished batch is polled (the lean
    ``GET /v1/batches/{id}``). Once it is over, the others are swept in order through their item
    lists, ``max_concurrency`` at a time; a batch whose items have all ended is collected by that
    same request, and the sweep stops at the first window in which none had. A finished batch
    thus costs one request (a page of up to 500 items), plus one poll per waiting round; after
    a round that found batches over, the next comes ``FOLLOW`` seconds later. When
    the oldest is still running after ``STUCK_ROUNDS`` rounds, the younger ones are swept all
    the same, each round; at the deadline every batch is looked at once more, so every row that
    finished is returned.

    ``statuses`` receives the last seen status of each batch. ``expected`` gives the item ids we
    hold for a batch: pages that lack one (a cursor that repeats, a page that goes missing) are
    a ProtocolError, never a silently short result. An API error whose retries are spent raises.

    ``on_batch`` gets each finished batch's items as outcome values (``outcome_values``): no
    malformed value.
    A batch whose items cannot be filed by id (an item without a string id, an id that repeats)
    never reaches ``on_batch``: ``on_malformed(batch_id, message)`` hears of it, and it counts
    as done (not polled again by this call), so the other batches are still collected. Without
    ``on_malformed`` it is a ProtocolError.
    """
    pending = list(dict.fromkeys(batch_ids))
    sweeper = _Sweeper(
        client,
        poll,
        retry,
        on_batch,
        on_malformed,
        seen=statuses if statuses is not None else {},
        expected=expected or {},
    )
    started = time.monotonic()
    interval = poll.initial
    waited = 0  # rounds the oldest batch has been seen running
    while pending:
        if await sweeper.probe(pending[0]):
            waited = 0
            done = set(await sweeper.sweep_all(pending))
        elif (waited := waited + 1) >= STUCK_ROUNDS:
            # The oldest runs on: the younger ones may be done all the same.
            done = set(await sweeper.sweep_all(pending[1:]))
        else:
            done = set()
        pending = [b for b in pending if b not in done]
        if not pending:
            break
        left = math.inf if poll.deadline is None else poll.deadline - (time.monotonic() - started)
        if left <= 0:  # a last look at every batch: every row that finished is returned
            done = set(await sweeper.sweep_all(pending, until_idle=False))
            return [b for b in pending if b not in done]
        if done:  # batches are ending now: the next ones end soon after
            await anyio.sleep(min(FOLLOW, left))
            interval = poll.initial
            continue
        await anyio.sleep(min(poll.wait(interval), left))
        interval = min(poll.max, interval * poll.growth)
    return pending


@dataclass
class _Sweeper:
    """What one ``collect_items`` call shares: one gate, retry policy and jitter for all its
    requests, where swept batches go, and the errors of the current sweep window."""

    client: AsyncRunflowClient
    poll: PollPolicy
    retry: RetryPolicy
    on_batch: Callable[[str, list[tuple[Any, ...]]], None]
    on_malformed: Callable[[str, str], None] | None
    seen: dict[str, str]
    expected: Mapping[str, set[str]]
    errors: list[APIError] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.gate: Gate = job_gate(self.poll.max_concurrency)
        self.rng = random.Random()  # noqa: S311 - jitter, not secrets

    async def call(self, fn: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        return await retrying(
            fn,
            policy=self.retry,
            gate=self.gate,
            clock=anyio.current_time,
            sleep=anyio.sleep,
            rng=self.rng,
        )

    async def probe(self, batch_id: str) -> bool:
        """Poll one batch (the lean ``GET /v1/batches/{id}``): is it over?"""

        async def get() -> dict[str, Any]:
            return await self.client.get_batch(batch_id)

        batch = await self.call(get)
        self.seen[batch_id] = str(batch.get("status_code"))
        return batch_is_over(batch)

    async def sweep_all(self, pending: list[str], *, until_idle: bool = True) -> list[str]:
        """Sweep ``pending`` in order, ``max_concurrency`` at a time (the next starts as soon as
        one ends: the server serves one page while the client reads another), until that many
        in a row found their batch still running (the rest is younger: wait), or through all of
        them; returns the batches done."""
        finished: list[str] = []
        size = self.poll.max_concurrency
        queue = iter(pending)
        running = 0  # sweeps in a row that found their batch still running

        async def worker() -> None:
            nonlocal running
            for batch_id in queue:
                if self.errors or (until_idle and running >= size):
                    return
                before = len(finished)
                await self.sweep(batch_id, finished)
                running = 0 if batch_id in finished[before:] else running + 1

        async with anyio.create_task_group() as tg:
            for _ in range(min(size, len(pending))):
                tg.start_soon(worker)
        if self.errors:
            raise self.errors[0]
        return finished

    async def page_items(self, batch_id: str) -> list[Any]:
        items: list[Any] = []
        cursor: str | None = None
        cursors: set[str] = set()
        while True:

            async def one_page(c: str | None = cursor) -> dict[str, Any]:
                return await self.client.list_batch_items(batch_id, limit=PAGE_SIZE, cursor=c)

            page = await self.call(one_page)
            got = page.get("items")
            if not isinstance(got, list):
                raise ProtocolError(f"batch {batch_id}: an items page has no items[] list")
            items += got
            cursor = next_cursor(page)
            if cursor is None or not got or cursor in cursors:
                break  # the end, or a server handing a cursor back: never loop on it
            cursors.add(cursor)
        return items

    async def sweep(self, batch_id: str, finished: list[str]) -> None:
        try:
            items = await self.page_items(batch_id)
        except APIError as error:  # surfaces after the window, alone, not in an ExceptionGroup
            self.errors.append(error)
            return
        # Pages that lack our items (a paging fault) are told apart from a malformed list.
        malformed = _unfiled(batch_id, items)
        if malformed is None:
            lacking = self.expected.get(batch_id, set()) - {i["id"] for i in items}
            if lacking:
                self.errors.append(
                    ProtocolError(
                        f"batch {batch_id}: its pages lack {len(lacking)} of our items (e.g. "
                        f"{sorted(lacking)[:3]}): a cursor repeated or a page went missing",
                        retryable=False,
                    )
                )
                return
            malformed = _repeated(batch_id, items)
        if malformed is not None:
            self.malformed(batch_id, malformed, finished)
            return
        states = [_status(i) for i in items]
        if items and all(
            state in TERMINAL or i.get("completed_at")
            for state, i in zip(states, items, strict=True)
        ):
            self.seen[batch_id] = "over"
            self.on_batch(batch_id, self.checked(batch_id, items))
            finished.append(batch_id)
        else:
            self.seen[batch_id] = next((str(x) for x in states if x not in TERMINAL), "unknown")

    def malformed(self, batch_id: str, message: str, finished: list[str]) -> None:
        """A batch whose items cannot be filed: reported, and done for this call."""
        if self.on_malformed is None:
            self.errors.append(ProtocolError(message, retryable=False))
            return
        self.seen[batch_id] = "malformed"
        self.on_malformed(batch_id, message)
        finished.append(batch_id)

    def checked(self, batch_id: str, items: list[Any]) -> list[tuple[Any, ...]]:
        """``items`` as outcome values (``outcome_values``, redacting this client's key too);
        malformed values are logged once per batch."""
        rows = _rows_of(items, self.client.redact)
        noted = [r for r in rows if r[_ERROR]]
        if noted:
            _log.warning(
                "batch %s: %d item answer(s) malformed, their bad values dropped; e.g. item %s: %s",
                batch_id,
                len(noted),
                noted[0][-1],
                noted[0][_ERROR].removeprefix("malformed answer: "),
            )
        return rows


def _rows_of(
    items: Sequence[Mapping[str, Any]], scrub: Callable[[str], str]
) -> list[tuple[Any, ...]]:
    """The outcome values of the items that have a string id."""
    return [outcome_values(item, scrub) for item in items if isinstance(item.get("id"), str)]


class Prefetch:
    """Outcomes collected while the job still sends (``wait=True``): batches are added as they
    are created (``sent``), and ``run`` sweeps the oldest ones as they end, the way
    ``collect_items`` does, until ``stop`` (it ends after the round under way: a page asked
    for is never thrown away). What it gathered (``rows``) the final collect does not fetch
    again; a batch it could not file, or an API error, is left to that collect."""

    def __init__(self, client: AsyncRunflowClient, poll: PollPolicy, retry: RetryPolicy) -> None:
        self.client = client
        self.rows = ResultRows()
        self.expected: dict[str, set[str]] = {}  # in creation order
        self.done: set[str] = set()
        self._sweeper = _Sweeper(
            client, poll, retry, self.rows.add, lambda _b, _m: None, seen={}, expected=self.expected
        )
        self._stop = anyio.Event()

    def sent(self, batch_id: str, item_ids: Sequence[str]) -> None:
        """A batch was created with these items."""
        self.expected.setdefault(batch_id, set()).update(item_ids)

    def stop(self) -> None:
        """The job has sent everything: end after the round under way."""
        self._stop.set()

    async def run(self) -> None:
        with keeping():
            try:
                await self._rounds()
            except APIError as error:  # the final collect tries again, and reports
                _log.info(
                    "collecting while sending stopped (%s); collecting after it instead", error
                )

    async def _rounds(self) -> None:
        poll = self._sweeper.poll
        interval = poll.initial
        while not self._stop.is_set():
            pending = [b for b in self.expected if b not in self.done]
            done: set[str] = set()
            if pending and await self._sweeper.probe(pending[0]):
                done = set(await self._sweeper.sweep_all(pending))
                self.done |= done
            with anyio.move_on_after(FOLLOW if done or not pending else poll.wait(interval)):
                await self._stop.wait()
            interval = FOLLOW if done else min(poll.max, interval * poll.growth)


def item_key(batch_id: str, item_id: str) -> str:
    """Where an item's outcome is filed: ids are opaque and maybe unique only in their batch."""
    return f"{batch_id}/{item_id}"


def cost_of(rows: Iterable[tuple[Any, ...]]) -> Decimal:
    """What the runs of these outcome values cost, in all (a missing cost counts nothing)."""
    return sum((row[_COST] for row in rows if row[_COST] is not None), Decimal(0))


class ResultRows:
    """Item outcomes gathered batch by batch (``outcome_values``' tuples), made one frame at
    the end (a frame per batch cost more than fetching the batch)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.rows: list[tuple[Any, ...]] = []

    def add(self, batch_id: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """A batch's outcome values (``_Sweeper.checked``'s)."""
        self.keys += [item_key(batch_id, row[-1]) for row in rows]
        self.rows += rows
        settle()  # kept to the end: out of the collector's full passes (see _heap)

    def frame(self) -> pd.DataFrame:
        """Indexed by ``item_key`` (result columns, still raw: see ``finish_columns``), with the
        ``client_ref`` each item came back with, to check the join."""
        # Column by column at C speed; raw (object) columns, typed once by finish_columns.
        columns = {
            name: list(map(itemgetter(n), self.rows)) for n, name in enumerate(STORED_COLUMNS)
        }
        return pd.DataFrame(columns, index=pd.Index(self.keys, dtype=object), dtype=object)


def results_frame(batch_id: str, items: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One batch's ``ResultRows`` frame, from its item answers."""
    rows = ResultRows()
    rows.add(batch_id, _rows_of(items, redact))
    return rows.frame()


def finish_columns(df: pd.DataFrame, *, flatten: bool) -> pd.DataFrame:
    """Typed result columns: timestamps as UTC datetimes, cost as Decimal (object), and the
    output dict spread into ``runflow_output.<key>`` columns when ``flatten``."""
    for col in ("runflow_created_at", "runflow_started_at", "runflow_completed_at"):
        # Values were checked before they were kept (outcome_values); coerce is a last defence.
        df[col] = pd.to_datetime(df[col], utc=True, format="ISO8601", errors="coerce")
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
