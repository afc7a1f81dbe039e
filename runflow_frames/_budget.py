"""A budget the job cannot overrun: what it spent, what it committed, and whether a chunk may go.

Runflow reports a run's cost only once the run is over, so the price is learned while the job
sends: ``watch`` polls the job's batches (oldest first, a few at a time, through the job's own
throttle) and ``Budget`` keeps the account (pure: no I/O, no clock):

- **spent**: the cost the batches report (their finished runs'); **over**: their runs that
  ended (succeeded, failed or cancelled); the **price** is spent per succeeded run (a failed
  run costs nothing, so this is the dearer estimate).
- **committed**: every row sent whose run is not over yet, at that price.
- A chunk may start when ``spent + committed + its rows x price`` stays within ``max_cost``.
  Until a first run has succeeded (no price yet), no more than one round of chunks
  (``first_round``) may have runs still going: the next waits for the price.
- Once a chunk would cross the line, no chunk starts again: the requests in flight finish and
  the job stops (``_job`` raises ``BudgetExceeded``).

A resumed job registers the batches its checkpoint recorded as sent: their cost counts against
the budget as soon as they are polled, and until then they hold the next chunks back like a
round whose price is unknown.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Final

import anyio

from ._errors import InputError
from ._polling import batch_is_over

POLL_EVERY: Final = 0.5  # seconds between sweeps of the batches still running


def budget_of(value: Any, name: str = "max_cost") -> Decimal | None:
    """``value`` as a Decimal amount (None: none given); refuses what cannot be one, naming
    the option ``name``."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InputError(f"{name} must be an amount, got {value!r}")
    try:
        amount = Decimal(str(value)) if isinstance(value, float) else Decimal(value)
    except (InvalidOperation, TypeError, ValueError):
        raise InputError(f"{name} must be an amount, got {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise InputError(f"{name} must be a finite amount of 0 or more, got {value!r}")
    return amount


@dataclass
class _Seen:
    rows: int
    cost: Decimal = Decimal(0)
    succeeded: int = 0
    ended: int = 0
    over: bool = False


@dataclass
class Budget:
    """The account of one job (see the module docstring)."""

    max_cost: Decimal
    first_round: int
    batches: dict[str, _Seen] = field(default_factory=dict)  # in the order they were sent
    sending: int = 0  # rows of chunks started, not answered yet
    stopped: bool = False  # a chunk would have crossed the line
    # Totals over ``batches``, kept as they change: every chunk consults them.
    spent: Decimal = field(default=Decimal(0), init=False)
    _succeeded: int = field(default=0, init=False)
    _unended: int = field(default=0, init=False)  # rows of known batches whose runs go on

    @classmethod
    def of(cls, max_cost: Any, max_concurrency: int) -> Budget | None:
        """The budget a job's options ask for (None: no budget); refuses what cannot be one."""
        amount = budget_of(max_cost)
        return None if amount is None else cls(amount, first_round=max_concurrency)

    def sent(self, batch_id: str, rows: int) -> None:
        """A batch exists (answered now, or recorded by an earlier run)."""
        if batch_id not in self.batches:
            self.batches[batch_id] = _Seen(rows)
            self._unended += rows

    def seen(self, batch_id: str, batch: dict[str, Any]) -> None:
        """What a poll of the batch said."""
        entry = self.batches[batch_id]
        was = (entry.cost, entry.succeeded, entry.ended)
        entry.cost = _amount(batch.get("cost")) or entry.cost
        counts = [batch.get(k) for k in ("items_succeeded", "items_failed", "items_cancelled")]
        numbers = [c if isinstance(c, int) else 0 for c in counts]
        entry.succeeded, entry.ended = numbers[0], sum(numbers)
        entry.over = batch_is_over(batch)
        if entry.over:
            entry.ended = entry.rows
        self.spent += entry.cost - was[0]
        self._succeeded += entry.succeeded - was[1]
        self._unended -= entry.ended - was[2]

    def price(self) -> Decimal | None:
        """Spent per succeeded run, or None before the first."""
        return self.spent / self._succeeded if self._succeeded else None

    def going(self) -> int:
        """Rows sent (or being sent) whose runs are not over."""
        return self.sending + self._unended

    def committed(self) -> Decimal | None:
        """What the runs still going will cost at the price (None: no price yet)."""
        price = self.price()
        return None if price is None else self.going() * price

    def admit(self, rows: int) -> bool | None:
        """May a chunk of ``rows`` start: True, False (it would cross the line: stop), or None
        (no price yet and a round's runs still going: wait)."""
        if self.stopped:
            return False
        price = self.price()
        if price is None:  # a round of chunks like this one at most
            return True if self.going() + rows <= self.first_round * rows else None
        if self.spent + self.going() * price + rows * price > self.max_cost:
            self.stopped = True
            return False
        return True

    def to_json(self) -> dict[str, Any]:
        price, committed = self.price(), self.committed()
        return {
            "max_cost": str(self.max_cost),
            "spent": str(self.spent),
            "committed": None if committed is None else str(committed),
            "price_per_run": None if price is None else str(price),
            "stopped": self.stopped,
        }


class Guard:
    """A budget in a running job: the gate each chunk passes (``admit``), the account of
    what was answered (``answered``) and the poller (``watch``) that learns the costs."""

    def __init__(self, budget: Budget, show: Callable[..., None] | None = None) -> None:
        self.budget = budget
        self._changed = anyio.Event()
        self._show = show  # the progress bar's postfix

    async def admit(self, rows: int) -> bool:
        """Wait until the chunk may start (True) or must not (False: the job stops)."""
        while (verdict := self.budget.admit(rows)) is None:
            await self._changed.wait()
        if verdict:
            self.budget.sending += rows
        return verdict

    def answered(self, batch_id: str | None, rows: int) -> None:
        """A started chunk's POST ended: created (``batch_id``) or not (None)."""
        self.budget.sending -= rows
        if batch_id is not None:
            self.budget.sent(batch_id, rows)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()
        if self._show is not None:
            committed = self.budget.committed()
            self._show(
                spent=f"{self.budget.spent:f}",
                committed="?" if committed is None else f"{committed:.2f}",
                budget=f"{self.budget.max_cost:f}",
            )

    async def watch(self, get: Callable[[str], Awaitable[dict[str, Any]]]) -> None:
        """Poll the batches whose runs are not over, oldest first, one at a time (the creates
        keep the throttle's other places), until cancelled; a sweep stops at the first batch
        still running (younger ones are too, most likely)."""
        while True:
            for batch_id in [k for k, b in self.budget.batches.items() if not b.over]:
                self.budget.seen(batch_id, await get(batch_id))
                self._wake()
                if not self.budget.batches[batch_id].over:
                    break
            await anyio.sleep(POLL_EVERY)


def _amount(value: Any) -> Decimal | None:
    try:
        amount = Decimal(str(value)) if value is not None else None
    except InvalidOperation:
        return None
    return amount if amount is not None and amount.is_finite() else None
