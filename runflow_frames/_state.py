"""What a job has recorded, in memory (pure): intents, answered handles, refused chunks; and
what a resume must still do.

A row goes *unsent* -> *intended* -> *submitted*. Before a chunk's first POST, an intent (its
chunk number, Idempotency-Key, client_refs, a digest of each row's item bytes and a hash of
its values) is made durable; after the 201, its handles are recorded; a chunk the server
refused (nothing created) is marked so, and its rows are unsent again. ``_journal.py`` stores
these; this module only keeps and compares them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ._errors import CheckpointError
from ._handles import HANDLE_SCHEMA, Handles, HandleTable
from ._items import UNKNOWN, Hashes, Items

# Handle columns first: a segment table doubles as the handle table join_handles takes.
SEGMENT_SCHEMA: Final = pa.schema(
    [
        *HANDLE_SCHEMA,
        ("chunk", pa.int64()),
        ("digest", pa.int64()),
        ("value_hash", pa.int64()),  # 0: unknown (format 4, or a frame without value hashes)
        ("intent_at", pa.float64()),
        ("submitted_at", pa.float64()),
    ]
)


@dataclass(frozen=True, slots=True, eq=False)
class Intent:
    """A chunk about to be (or maybe already) sent."""

    chunk: int
    key: str
    at: float
    refs: tuple[str, ...]
    digests: Hashes  # row_digests of its rows, in order
    hashes: Hashes  # value hashes of its rows, in order


@dataclass(slots=True)
class State:
    """Everything a checkpoint records.

    Submitted rows are columnar: ``segments`` (one row each, from segment files or absorbed),
    and ``answered``, the handles of rows answered since, accumulated column by column as
    their chunks are answered (a chunk's Python objects would otherwise live until the end of
    the run, and their number alone made the garbage collector scan the whole heap), with
    their digests beside them. Only chunks without an answer are Python objects
    (``intents``), keyed by chunk number, which also deduplicates records written twice.
    """

    segments: pa.Table = field(default_factory=lambda: SEGMENT_SCHEMA.empty_table())
    written: int = 0  # leading rows of ``segments`` that are already in segment files
    intents: dict[int, Intent] = field(default_factory=dict)  # chunks without an answer
    answered: HandleTable = field(default_factory=HandleTable)
    answered_digests: list[Hashes] = field(default_factory=list)
    answered_hashes: list[Hashes] = field(default_factory=list)
    # The chunks in ``answered``, in order: rows, intent and answer times.
    answered_chunks: dict[int, tuple[int, float, float]] = field(default_factory=dict)
    rejected: set[int] = field(default_factory=set)  # refused chunks: numbers not to reuse

    def pending(self) -> list[Intent]:
        """Intents without handles: maybe sent, response unknown. Oldest first."""
        return [self.intents[c] for c in sorted(self.intents)]

    def next_chunk(self) -> int:
        seg = pc.max(self.segments["chunk"]).as_py() if self.segments.num_rows else None
        taken = [*self.intents, *self.answered_chunks, *self.rejected]
        return max([-1 if seg is None else seg, *taken]) + 1

    def answer(self, chunk: int, handles: Handles, at: float) -> None:
        """A chunk's handles (in its intent's row order) came back: its rows are submitted."""
        intent = self.intents.pop(chunk, None)
        if intent is None or len(handles.item_ids) != len(intent.refs):
            raise CheckpointError(f"checkpoint: chunk {chunk} has handles but no intent")
        self.answered.add(intent.refs, handles)
        self.answered_digests.append(intent.digests)
        self.answered_hashes.append(intent.hashes)
        # One value per chunk, repeated per row only when absorbed (numpy does it at C speed).
        self.answered_chunks[chunk] = (len(intent.refs), intent.at, at)

    def absorb(self) -> None:
        """Move answered rows into ``segments`` (in memory; :meth:`DirectoryJournal._compact`
        writes them out)."""
        if not self.answered_chunks:
            return
        sizes, intent_ats, submitted_ats = zip(*self.answered_chunks.values(), strict=True)
        columns = self.answered.arrays()
        for name, values in (
            ("chunk", list(self.answered_chunks)),
            ("intent_at", intent_ats),
            ("submitted_at", submitted_ats),
        ):
            columns[name] = np.repeat(np.array(values), sizes)
        columns["digest"] = np.concatenate(self.answered_digests)
        columns["value_hash"] = np.concatenate(self.answered_hashes)
        table = pa.table(columns, schema=SEGMENT_SCHEMA)
        self.segments = pa.concat_tables([self.segments, table])
        self.answered = HandleTable()
        self.answered_digests = []
        self.answered_hashes = []
        self.answered_chunks = {}

    def submitted(self) -> pa.Table:
        """Every submitted row's handle (``HANDLE_SCHEMA`` columns first)."""
        self.absorb()
        return self.segments

    def recorded(self) -> tuple[pa.Array, Hashes, Hashes]:
        """client_refs, digests and value hashes of every recorded row: submitted, then
        pending."""
        submitted = self.submitted()
        pending = self.pending()
        refs = pa.concat_arrays(
            [
                submitted["client_ref"].combine_chunks(),
                pa.array([r for i in pending for r in i.refs], type=pa.string()),
            ]
        )
        digests = np.concatenate([submitted["digest"].to_numpy(), *(i.digests for i in pending)])
        # A format 4 segment has no value hashes: read as null, they are UNKNOWN.
        kept = pc.fill_null(submitted["value_hash"], UNKNOWN).to_numpy()
        hashes = np.concatenate([kept, *(i.hashes for i in pending)])
        return refs, digests, hashes


def recorded_twice(where: str, refs: pa.Array) -> CheckpointError:
    """The error for a checkpoint that records a row in more than one chunk."""
    counts = pc.value_counts(refs)
    twice = [v["values"] for v in counts.to_pylist() if v["counts"] > 1][:5]
    return CheckpointError(
        f"checkpoint {where} records row(s) {twice} in more than one chunk; it is "
        "inconsistent and cannot be resumed safely"
    )


def plan_resume(
    state: State, refs: Sequence[str], items: Items, checkpoint: str
) -> tuple[list[tuple[Intent, list[int]]], Sequence[int]]:
    """What a run must still do: the pending intents to re-send (with their rows' positions),
    and the positions of the rows never recorded, in frame order.

    Refuses (CheckpointError) an input that lacks recorded rows, or whose recorded rows changed:
    a submitted row whose values now hash differently (or cannot be hashed) and whose bytes
    differ too, or a pending row whose bytes differ (its chunk must be re-sent byte for byte).
    The returned handles would not be for these values. Only the rows compared by their bytes
    are encoded here.
    """
    recorded, was, was_hash = state.recorded()
    if not len(recorded):
        return [], range(len(refs))  # a new job
    current = pa.array(refs, type=pa.string())
    where = pc.index_in(recorded, value_set=current)
    if where.null_count:
        missing = recorded.filter(pc.is_null(where)).to_pylist()
        raise CheckpointError(
            f"the input lacks {len(missing)} row(s) the checkpoint recorded, e.g. "
            f"{sorted(missing)[:5]}; resume with the same rows (new rows are fine)",
            changes=[f"missing row {r!r}" for r in missing],
        )
    positions = where.to_numpy()
    pending = state.pending()
    submitted = len(positions) - sum(len(i.refs) for i in pending)  # pending rows come last
    unproven = np.ones(len(positions), dtype=bool)
    if items.hashes is not None:  # an UNKNOWN recorded hash matches no row's
        unproven[:submitted] = items.hashes[positions[:submitted]] != was_hash[:submitted]
    differs = np.zeros(len(positions), dtype=bool)
    differs[unproven] = items.digests(positions[unproven].tolist()) != was[unproven]
    if differs.any():
        changed = sorted(recorded.filter(pa.array(differs)).to_pylist())
        raise CheckpointError(
            f"{len(changed)} row(s) already recorded for submission have different values now, "
            f"e.g. {changed[:5]}; restore their values, or give changed rows new keys",
            changes=[f"changed row {r!r}" for r in changed],
        )
    unsent = np.ones(len(refs), dtype=bool)
    unsent[positions] = False
    if np.count_nonzero(~unsent) != len(positions):  # a row recorded twice: one position twice
        raise recorded_twice(checkpoint, recorded)
    planned, offset = [], submitted
    for intent in pending:
        planned.append((intent, positions[offset : offset + len(intent.refs)].tolist()))
        offset += len(intent.refs)
    return planned, np.flatnonzero(unsent).tolist()
