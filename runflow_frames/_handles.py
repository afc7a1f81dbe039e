"""Handles -> frame, verified one to one (pure).

A create response must hand back exactly one item per submitted ``client_ref``; anything else
(missing, extra or repeated refs, items without ids) is a ``ProtocolError``, never a guess.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ._errors import InputError, ProtocolError


@dataclass(frozen=True, slots=True)
class Handles:
    """What the server gave back for one chunk, column by column, in the submitted rows' order
    (a Python object per row would cost more than everything else done with it)."""

    batch_id: str
    item_ids: list[str]
    run_ids: list[str]
    sequence_indexes: list[int | None]
    statuses: list[str | None]


# Output columns, in order: the client_ref sent, then the Handles fields.
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


def verify_handles(refs: Sequence[str], response: Mapping[str, Any]) -> Handles:
    """The handles of a create response, checked one to one against ``refs``, in their order."""
    batch_id = response.get("id")
    items = response.get("items")
    if not isinstance(batch_id, str) or not batch_id:
        raise ProtocolError("create response has no batch id", retryable=False)
    if not isinstance(items, list):
        raise ProtocolError(
            f"create response for batch {batch_id} has no items[] list", retryable=False
        )
    # Column by column with C-speed checks; the first bad item is looked for only on error.
    if not _all(dict, items):
        raise ProtocolError(f"batch {batch_id}: an item handle is not an object", retryable=False)
    got = [item.get("client_ref") for item in items]
    item_ids = [item.get("id") for item in items]
    run_ids = [item.get("run_id") for item in items]
    if not _all(str, got):
        raise ProtocolError(f"batch {batch_id}: an item handle has no client_ref", retryable=False)
    if len(set(got)) != len(got):
        twice = next(r for n, r in enumerate(got) if r in got[:n])
        raise ProtocolError(
            f"batch {batch_id}: client_ref {twice!r} came back twice", retryable=False
        )
    if not (_all(str, item_ids) and _all(str, run_ids)):
        bad = next(
            r for r, i, u in zip(got, item_ids, run_ids, strict=True) if not _all(str, (i, u))
        )
        raise ProtocolError(f"batch {batch_id}: item {bad!r} has no id or run_id", retryable=False)
    seqs = [item.get("sequence_index") for item in items]
    statuses = [item.get("status_code") for item in items]
    if not _all(int, seqs):
        seqs = [s if type(s) is int else None for s in seqs]
    if not _all(str, statuses):
        statuses = [s if type(s) is str else None for s in statuses]
    if len(set(refs)) != len(refs):
        raise ProtocolError("a chunk was submitted with repeated client_refs", retryable=False)
    if got != list(refs):
        if set(got) != set(refs):
            missing = sorted(set(refs) - set(got))
            extra = sorted(set(got) - set(refs))
            raise ProtocolError(
                f"batch {batch_id}: the handles do not match the submitted rows "
                f"(missing {missing[:5]}, unexpected {extra[:5]})",
                retryable=False,
            )
        position = {ref: n for n, ref in enumerate(got)}
        order = [position[ref] for ref in refs]
        item_ids, run_ids = [item_ids[n] for n in order], [run_ids[n] for n in order]
        seqs, statuses = [seqs[n] for n in order], [statuses[n] for n in order]
    return Handles(batch_id, item_ids, run_ids, seqs, statuses)


def _all(kind: type, values: Iterable[object]) -> bool:
    """Whether every value is exactly of ``kind`` (not a subclass: True is no sequence index)."""
    return set(map(type, values)) <= {kind}


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
    """Handles of many chunks, accumulated column by column (a chunk's batch id once)."""

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {
            name: [] for name in HANDLE_SCHEMA.names if name != "batch_id"
        }
        self._batches: list[str] = []
        self._sizes: list[int] = []

    def __len__(self) -> int:
        return len(self.columns["client_ref"])

    def add(self, refs: Sequence[str], handles: Handles) -> None:
        c = self.columns
        c["client_ref"] += refs
        c["item_id"] += handles.item_ids
        c["run_id"] += handles.run_ids
        c["sequence_index"] += handles.sequence_indexes
        c["status"] += handles.statuses
        self._batches.append(handles.batch_id)
        self._sizes.append(len(refs))

    def arrays(self) -> dict[str, Any]:
        """The columns, ``HANDLE_SCHEMA``'s; each batch id repeated at C speed (converting the
        repeated string row by row took as long as the other columns together)."""
        chunks = np.repeat(np.arange(len(self._batches)), self._sizes)
        columns = {**self.columns, "batch_id": pa.array(self._batches, pa.string()).take(chunks)}
        return {name: columns[name] for name in HANDLE_SCHEMA.names}

    def to_arrow(self) -> pa.Table:
        return pa.table(self.arrays(), schema=HANDLE_SCHEMA)


def in_chunk_order(handles: pa.Table, chunks: np.ndarray[Any, Any]) -> pa.Table:
    """``handles`` with its rows sorted by their chunk numbers ``chunks`` (stable: a chunk's
    rows keep their order); answers come back in the order they end."""
    if len(chunks) < 2 or bool((chunks[1:] >= chunks[:-1]).all()):
        return handles
    return handles.take(np.argsort(chunks, kind="stable"))


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
    joined = handles.select(HANDLE_SCHEMA.names)
    # Handles in chunk order are in frame order for a job sent in one go: no lookup then.
    if len(handles) != len(refs) or not handles["client_ref"].combine_chunks().equals(ref_array):
        where = pc.index_in(ref_array, value_set=handles["client_ref"])
        joined = joined.take(where)  # a null index: a null row
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
