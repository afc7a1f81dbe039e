"""Dry runs: what a job would send, and every row it would refuse, without sending anything."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ._client import model_path
from ._errors import InputError
from ._handles import check_no_collision
from ._rows import (
    MAX_CHUNK_SIZE,
    body_suffix,
    client_refs,
    column_values,
    item_columns,
)


@dataclass
class Plan:
    """What a job would do: rows, chunks (one request each, before retries), and refusals.

    ``refused`` lists ``(column or None, reason, keys)``: every problem found, not just the
    first. A job with refusals would be refused as a whole before its first request.
    """

    model: str
    rows: int
    chunks: int
    item_fields: list[str]
    refused: list[tuple[str | None, str, list[Any]]] = field(default_factory=list)
    empty: dict[str, int] = field(default_factory=dict)  # rows missing a value, by field

    @property
    def ok(self) -> bool:
        return not self.refused

    def __str__(self) -> str:
        lines = [
            f"model        {self.model}",
            f"rows         {self.rows:,}",
            f"item fields  {', '.join(self.item_fields) or '(none)'}",
            f"requests     {self.chunks:,} (one per chunk, before retries)",
        ]
        empty = {name: n for name, n in self.empty.items() if n}
        if empty:
            counts = ", ".join(f"{name} {n:,}" for name, n in empty.items())
            lines.append(
                f"empty        {counts} row(s): left out of their items (missing='null': sent as null)"
            )
        if self.ok:
            lines.append("refused      none: every row would be sent")
        for column, reason, keys in self.refused:
            where = f"column {column!r}" if column else "keys"
            shown = ", ".join(repr(k) for k in keys[:5]) + (" ..." if len(keys) > 5 else "")
            lines.append(f"refused      {where}: {len(keys)} row(s): {reason} [{shown}]")
        return "\n".join(lines)


def plan_job(
    df: pd.DataFrame,
    owner: str,
    slug: str | None = None,
    *,
    key: Hashable | None = None,
    columns: Sequence[Hashable] | None = None,
    chunk_size: int = MAX_CHUNK_SIZE,
    metadata: dict[str, Any] | None = None,
) -> Plan:
    """Validate every row as ``run_batches`` would, and say what it would send.

    Raises InputError only for problems with the call itself (model path, options, columns);
    problems with rows are collected in ``Plan.refused``.
    """
    model = model_path(owner, slug)  # refuses a bad path
    check_no_collision(list(df.columns))
    fields = item_columns(df, key, columns)
    body_suffix(metadata, None)
    refused: list[tuple[str | None, str, list[Any]]] = []
    try:
        refs = client_refs(df, key)
    except InputError as exc:
        refused.append((exc.column, str(exc), exc.keys))
        refs = [str(i) for i in range(len(df))]
    for name in fields:
        try:
            column_values(df[name], name, refs)
        except InputError as exc:
            refused.append((name, str(exc).split(": ", 1)[-1], exc.keys))
    chunks = -(-len(df) // chunk_size)
    empty = {name: int(df[name].isna().sum()) for name in fields}
    return Plan(model, len(df), chunks, fields, refused, empty)
