"""What the emulator has seen, counted: what tests assert on, not what the client believes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any


@dataclass(frozen=True)
class Accounting:
    """What the emulator has seen; tests assert on this, not on what the client believes."""

    batches_created: int
    runs_by_client_ref: dict[str, int]
    requests_by_idempotency_key: dict[str, int]
    requests_by_route: dict[str, int]
    responses_by_status: dict[int, int]
    idempotent_replays: int
    max_creates_in_flight: int
    faults: dict[str, int]
    # (time.monotonic(), created) of every batch created and every create refused by a limit
    timeline: list[tuple[float, bool]] = field(default_factory=list)
    # What the runs created bill once they are over: the price of each that succeeds (a
    # failed run costs nothing), whether it is over yet or not.
    billed: Decimal = Decimal(0)

    def duplicate_refs(self) -> dict[str, int]:
        """client_refs that got more than one run."""
        return {r: n for r, n in self.runs_by_client_ref.items() if n > 1}

    def to_json(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["responses_by_status"] = {str(k): v for k, v in self.responses_by_status.items()}
        data["billed"] = str(self.billed)
        return data


@dataclass
class Ledger:
    """The running counts behind ``Accounting``. Not locked on its own: the emulator updates
    and reads it under its lock."""

    batches_created: int = 0
    runs_by_ref: Counter[str] = field(default_factory=Counter)
    requests_by_key: Counter[str] = field(default_factory=Counter)
    requests_by_route: Counter[str] = field(default_factory=Counter)
    responses_by_status: Counter[int] = field(default_factory=Counter)
    replays: int = 0
    creates_in_flight: int = 0
    max_creates_in_flight: int = 0
    faults_struck: Counter[str] = field(default_factory=Counter)
    timeline: list[tuple[float, bool]] = field(default_factory=list)
    billed: Decimal = Decimal(0)

    def create_started(self) -> None:
        self.creates_in_flight += 1
        self.max_creates_in_flight = max(self.max_creates_in_flight, self.creates_in_flight)

    def snapshot(self) -> Accounting:
        return Accounting(
            batches_created=self.batches_created,
            runs_by_client_ref=dict(self.runs_by_ref),
            requests_by_idempotency_key=dict(self.requests_by_key),
            requests_by_route=dict(self.requests_by_route),
            responses_by_status=dict(self.responses_by_status),
            idempotent_replays=self.replays,
            max_creates_in_flight=self.max_creates_in_flight,
            faults=dict(self.faults_struck),
            timeline=list(self.timeline),
            billed=self.billed,
        )
