"""Handles -> frame, verified one to one (pure).

A create response must hand back exactly one item per submitted ``client_ref``; anything else
(missing, extra or repeated refs, items without ids) is a ``ProtocolError``, never a guess.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Final, NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ._errors import InputError, ProtocolError


class Handle(NamedTuple):
    """What the server gave back for one submitted row."""

    batch_id: str
    item_id: str
    run_id: str
    sequence_index: int | None
    status: str | None


# Output columns, in order: the client_ref sent, then the Handle fields.
CLIENT_REF_COLUMN: Final = "runflow_client_ref"
HANDLE_COLUMNS: Final = (
    CLIENT_REF_COLUMN,
    "runflow_batch_id",
    "runflow_item_id",
    "runflow_run_id",
    "runflow_sequence_index",
    "runflow_status",
    "runflow_error",
)


def check_no_collision(columns: Sequence[Hashable]) -> None:
    """Refuse an input that already has one of the output columns (we never rename silently)."""
    clash = [c for c in HANDLE_COLUMNS if c in set(columns)]
    if clash:
        raise InputError(
            f"the frame already has output column(s) {clash}; drop or rename them first "
            "(for example df.drop(columns=[c for c in df if c.startswith('runflow_')]))",
            column=clash[0],
        )


def verify_handles(refs: Sequence[str], response: Mapping[str, Any]) -> dict[str, Handle]:
    """The handles of a create response, keyed by client_ref, checked against ``refs``."""
    batch_id = response.get("id")
    items = response.get("items")
    if not isinstance(batch_id, str) or not batch_id:
        raise ProtocolError("create response has no batch id", retryable=False)
    if not isinstance(items, list):
        raise ProtocolError(
            f"create response for batch {batch_id} has no items[] list", retryable=False
        )
    handles: dict[str, Handle] = {}
    for item in items:
        if not isinstance(item, dict):
            raise ProtocolError(
                f"batch {batch_id}: an item handle is not an object", retryable=False
            )
        ref, item_id, run_id = item.get("client_ref"), item.get("id"), item.get("run_id")
        if not isinstance(ref, str):
            raise ProtocolError(
                f"batch {batch_id}: an item handle has no client_ref", retryable=False
            )
        if ref in handles:
            raise ProtocolError(
                f"batch {batch_id}: client_ref {ref!r} came back twice", retryable=False
            )
        if not isinstance(item_id, str) or not isinstance(run_id, str):
            raise ProtocolError(
                f"batch {batch_id}: item {ref!r} has no id or run_id", retryable=False
            )
        seq = item.get("sequence_index")
        status = item.get("status_code")
        handles[ref] = Handle(
            batch_id,
            item_id,
            run_id,
            seq if isinstance(seq, int) else None,
            status if isinstance(status, str) else None,
        )
    expected = set(refs)
    if len(expected) != len(refs):
        raise ProtocolError("a chunk was submitted with repeated client_refs", retryable=False)
    if handles.keys() != expected:
        missing = sorted(expected - handles.keys())
        extra = sorted(handles.keys() - expected)
        raise ProtocolError(
            f"batch {batch_id}: the handles do not match the submitted rows "
            f"(missing {missing[:5]}, unexpected {extra[:5]})",
            retryable=False,
        )
    return handles


HANDLE_SCHEMA: Final = pa.schema(
    [
        ("client_ref", pa.string()),
        ("batch_id", pa.string()),
        ("item_id", pa.string()),
        ("run_id", pa.string()),
        ("sequence_index", pa.int64()),
        ("status", pa.string()),
    ]
)


class HandleTable:
    """Handles accumulated column by column (a million Handle tuples would cost seconds)."""

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {name: [] for name in HANDLE_SCHEMA.names}

    def __len__(self) -> int:
        return len(self.columns["client_ref"])

    def add(self, refs: Sequence[str], handles: Sequence[Handle]) -> None:
        c = self.columns
        c["client_ref"] += refs
        c["batch_id"] += [h.batch_id for h in handles]
        c["item_id"] += [h.item_id for h in handles]
        c["run_id"] += [h.run_id for h in handles]
        c["sequence_index"] += [h.sequence_index for h in handles]
        c["status"] += [h.status for h in handles]

    def to_arrow(self) -> pa.Table:
        return pa.table(self.columns, schema=HANDLE_SCHEMA)


def join_handles(
    df: pd.DataFrame,
    refs: Sequence[str],
    handles: pa.Table,
    errors: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """A new frame: the input (index, order, columns) plus the handle columns.

    ``handles`` has the columns of ``HANDLE_SCHEMA``, one row per submitted ``client_ref``; rows
    of ``df`` without a handle (not submitted) get nulls. ``errors`` gives the
    ``runflow_error`` of rows that failed.
    """
    ref_array = pa.array(refs, type=pa.string())
    where = pc.index_in(ref_array, value_set=handles["client_ref"])
    joined = handles.take(where)  # a null index gives a null row
    out = df.copy(deep=False)
    out[CLIENT_REF_COLUMN] = pd.arrays.ArrowStringArray(ref_array)
    for name, field in zip(HANDLE_COLUMNS[1:-1], HANDLE_SCHEMA.names[1:], strict=True):
        column = joined[field].combine_chunks()
        out[name] = (
            pd.array(column.to_pandas(types_mapper=pd.ArrowDtype), dtype="Int64")
            if field == "sequence_index"
            else pd.arrays.ArrowStringArray(column)
        )
    messages = [errors.get(r) for r in refs] if errors else [None] * len(refs)
    out["runflow_error"] = pd.arrays.ArrowStringArray(pa.array(messages, type=pa.string()))
    return out
