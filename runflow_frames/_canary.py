"""A canary before the flood: a job's first rows, sent and waited for, judged before the rest.

Pure policy here (``judge``: what the canary's outcomes say); ``_api.submit_frame`` runs it.
The canary's rows are the job's own: with a checkpoint they are recorded like any other, so a
re-run does not send them again (it judges their outcomes again, read back from the checkpoint).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pandas as pd

from ._errors import InputError

SAMPLE: int = 3  # outputs shown in the report


@dataclass(frozen=True)
class Canary:
    """How many rows go first, and the share of them that may fail."""

    rows: int
    max_failed: float = 0.5

    @classmethod
    def of(cls, canary: int | bool, max_failed: float, chunk_size: int) -> Canary | None:
        """The canary a job's options ask for (``True``: one chunk), or None; refuses what
        cannot work before anything is sent."""
        if isinstance(canary, bool):
            canary = chunk_size if canary else 0
        if not isinstance(canary, int) or canary < 0:
            raise InputError(f"canary must be a number of rows (0 for none), got {canary!r}")
        if isinstance(max_failed, bool) or not isinstance(max_failed, int | float):
            raise InputError(f"canary_max_failed must be a share from 0 to 1, got {max_failed!r}")
        if not 0 <= max_failed <= 1:
            raise InputError(f"canary_max_failed must be a share from 0 to 1, got {max_failed!r}")
        return cls(canary, float(max_failed)) if canary else None


@dataclass(frozen=True)
class CanaryReport:
    """What the canary's runs came to."""

    rows: int
    succeeded: int
    max_failed: float
    cost_per_run: Decimal | None  # the mean cost of its succeeded runs; None when none had one
    failures: dict[str, int] = field(default_factory=dict)  # by code, most frequent first
    example: str | None = None  # the most frequent failure's first message
    sample: list[Any] = field(default_factory=list)  # a few outputs of succeeded runs

    @property
    def failed(self) -> int:
        return self.rows - self.succeeded

    @property
    def failed_share(self) -> float:
        return self.failed / self.rows if self.rows else 0.0

    @property
    def passed(self) -> bool:
        return self.failed_share <= self.max_failed

    def __str__(self) -> str:
        text = (
            f"canary of {self.rows:,} rows: {self.succeeded:,} succeeded, {self.failed:,} failed "
            f"({self.failed_share:.0%}; at most {self.max_failed:.0%} may fail)"
        )
        if self.cost_per_run is not None:
            text += f"; cost per run {self.cost_per_run.normalize():f}"
        if self.failures:
            code, count = next(iter(self.failures.items()))
            text += f"; failed most often with {code} ({count:,})"
            if self.example:
                text += f": {self.example}"
        return text

    def to_json(self) -> dict[str, Any]:
        """JSON-able (a frame's ``attrs``, the CLI's ``--json``)."""
        return {
            "rows": self.rows,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "max_failed": self.max_failed,
            "passed": self.passed,
            "cost_per_run": None if self.cost_per_run is None else str(self.cost_per_run),
            "failures": self.failures,
            "example_failure": self.example,
        }


def judge(outcomes: pd.DataFrame, max_failed: float) -> CanaryReport:
    """The report on the canary's rows (``outcomes``: its rows, collected). A row that did not
    succeed failed: a failed or cancelled run, or a row the server refused (no handle)."""
    status = outcomes["runflow_status"].astype("string")
    ok = (status == "succeeded").fillna(False).to_numpy(bool)
    codes: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for position in (~ok).nonzero()[0]:
        row = outcomes.iloc[position]
        code, message = _why(row)
        codes[code] += 1
        examples.setdefault(code, message)
    succeeded = outcomes["runflow_cost"][ok]
    priced = [c for c in succeeded if isinstance(c, Decimal)]  # a failed run costs nothing
    common = dict(codes.most_common())
    return CanaryReport(
        rows=len(outcomes),
        succeeded=int(ok.sum()),
        max_failed=max_failed,
        cost_per_run=sum(priced, Decimal(0)) / len(priced) if priced else None,
        failures=common,
        example=examples.get(next(iter(common))) if common else None,
        sample=list(outcomes["runflow_output"][ok][:SAMPLE]),
    )


def _why(row: pd.Series) -> tuple[str, str]:
    """A row's failure: its code and message (a row with no run: why it has no handle)."""
    if pd.isna(row.get("runflow_run_id")):
        return "NOT_SUBMITTED", str(row.get("runflow_error") or "no handle")
    code = row.get("runflow_failure_code")
    message = row.get("runflow_failure_message")
    status = row.get("runflow_status")
    return (
        str(code) if isinstance(code, str) else str(status or "unknown").upper(),
        str(message) if isinstance(message, str) else "",
    )
