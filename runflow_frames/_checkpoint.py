"""Checkpoints: the durable half of the exactly-once protocol. The only module that touches them.

A row goes *unsent* -> *intended* -> *submitted*. Before a chunk's first POST, an **intent**
record (its chunk number, Idempotency-Key, client_refs and a digest of each row's item bytes)
is fsync'd; after the 201, a **done** record holds its handles, written and fsync'd with the
next group of intents (or at close). A chunk the server refused (a 4xx: nothing created) gets a
**rejected** record: its rows are unsent again. Every POST of a chunk sends the same bytes with
the same key, so re-sending an intent whose response was lost (or whose done record was lost in
a crash) makes the server replay the first batch rather than create a second one.

Layout of a checkpoint directory::

    manifest.json           the job's fingerprint (model, server, key, columns, options), once
    journal-000007.log      append-only records of one run: intents, then done records
    segment-000003.parquet  done rows: written every SEGMENT_ROWS during a run, the rest at
                            close, and those of older journals at start

Journal records are framed as ``<u32 length><u64 xxh3><orjson payload>``. A frame that runs past
the end of the file, or fails its checksum with nothing valid after it, is a torn tail from a
crash and is ignored; a bad frame followed by valid ones is corruption and an error. Manifest
and segments are written to a temporary file, fsync'd, renamed into place and the directory
fsync'd, so they are whole or absent. Each run appends to a fresh journal; at start it carries
forward the intents that are still pending, folds the done records of older journals into a
segment and deletes those journals; a run that ends with nothing pending leaves no journal.
The same record may exist in a journal and a segment, or twice across journals, after a crash;
records are keyed by chunk number and loading deduplicates them.
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from ._errors import CheckpointError
from ._join import HANDLE_SCHEMA, Handles, HandleTable

FORMAT: Final = 3  # 3: xxh3 frame checksums (2 had crc32); 2: xxh3 row digests (1: blake2b)
MANIFEST: Final = "manifest.json"
LOCK: Final = ".lock"
# Answered rows that, once this many wait, go to a segment during the run, in a thread: a
# run's close then writes only the last few.
SEGMENT_ROWS: Final = 25_000
_FRAME: Final = struct.Struct("<IQ")
_JOURNAL_RE: Final = re.compile(r"journal-(\d{6})\.log")
_SEGMENT_RE: Final = re.compile(r"segment-(\d{6})\.parquet")
_RESULTS_RE: Final = re.compile(r"results-(\d{6})\.parquet")
# Collected outcomes of finished batches, as text (outputs as JSON, cost as a decimal string):
# written once per collect, read back so that a finished batch is never fetched again.
RESULTS_SCHEMA: Final = pa.schema(
    [
        ("item_key", pa.string()),  # batch id / item id: item ids may be unique per batch only
        ("runflow_status", pa.string()),
        ("runflow_output", pa.string()),
        ("runflow_cost", pa.string()),
        ("runflow_failure_code", pa.string()),
        ("runflow_failure_message", pa.string()),
        ("runflow_created_at", pa.string()),
        ("runflow_started_at", pa.string()),
        ("runflow_completed_at", pa.string()),
        ("client_ref", pa.string()),
    ]
)
# Fields of the manifest that must match for a resume: they decide the bytes of every item and
# where they go. chunk_size is not among them: it only shapes chunks not yet formed.
FINGERPRINT: Final = (
    "model",
    "base_url",
    "org_id",
    "key",
    "columns",
    "missing",
    "metadata",
    "callback_url",
)

# Handle columns first: a segment table doubles as the handle table join_handles takes.
_SEGMENT_SCHEMA: Final = pa.schema(
    [
        *HANDLE_SCHEMA,
        ("chunk", pa.int64()),
        ("digest", pa.int64()),
        ("intent_at", pa.float64()),
        ("submitted_at", pa.float64()),
    ]
)

# Dictionary pages only where values repeat (per chunk, or a few statuses): for unique ids they
# cost time and bytes. zstd halves the ids' hex text; statistics would never be read.
_SEGMENT_OPTIONS: Final[dict[str, Any]] = {
    "use_dictionary": ["batch_id", "status", "chunk", "intent_at", "submitted_at"],
    "compression": "zstd",
    "write_statistics": False,
}


def row_digests(items: Sequence[bytes]) -> np.ndarray[Any, np.dtype[np.int64]]:
    """A 64-bit digest (xxh3) of each row's item bytes: how a resume knows a row did not change."""
    digests = np.fromiter(map(xxhash.xxh3_64_intdigest, items), np.uint64, len(items))
    return digests.view(np.int64)


@dataclass(frozen=True, slots=True, eq=False)
class Intent:
    """A chunk about to be (or maybe already) sent."""

    chunk: int
    key: str
    at: float
    refs: tuple[str, ...]
    digests: np.ndarray[Any, np.dtype[np.int64]]  # row_digests of its rows, in order


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

    segments: pa.Table = field(default_factory=lambda: _SEGMENT_SCHEMA.empty_table())
    written: int = 0  # leading rows of ``segments`` that are already in segment files
    intents: dict[int, Intent] = field(default_factory=dict)  # chunks without an answer
    answered: HandleTable = field(default_factory=HandleTable)
    answered_digests: list[np.ndarray[Any, np.dtype[np.int64]]] = field(default_factory=list)
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
        # One value per chunk, repeated per row only when absorbed (numpy does it at C speed).
        self.answered_chunks[chunk] = (len(intent.refs), intent.at, at)

    def absorb(self) -> None:
        """Move answered rows into ``segments`` (in memory; :meth:`Checkpoint._compact`
        writes them out)."""
        if not self.answered_chunks:
            return
        sizes, intent_ats, submitted_ats = zip(*self.answered_chunks.values(), strict=True)
        columns: dict[str, Any] = dict(self.answered.columns)
        for name, values in (
            ("chunk", list(self.answered_chunks)),
            ("intent_at", intent_ats),
            ("submitted_at", submitted_ats),
        ):
            columns[name] = np.repeat(np.array(values), sizes)
        columns["digest"] = np.concatenate(self.answered_digests)
        table = pa.table(columns, schema=_SEGMENT_SCHEMA)
        self.segments = pa.concat_tables([self.segments, table])
        self.answered = HandleTable()
        self.answered_digests = []
        self.answered_chunks = {}

    def submitted(self) -> pa.Table:
        """Every submitted row's handle (``HANDLE_SCHEMA`` columns first)."""
        self.absorb()
        return self.segments

    def recorded(self) -> tuple[pa.Array, np.ndarray[Any, np.dtype[np.int64]]]:
        """client_refs and digests of every recorded row: submitted, then pending."""
        submitted = self.submitted()
        pending = self.pending()
        refs = pa.concat_arrays(
            [
                submitted["client_ref"].combine_chunks(),
                pa.array([r for i in pending for r in i.refs], type=pa.string()),
            ]
        )
        digests = np.concatenate([submitted["digest"].to_numpy(), *(i.digests for i in pending)])
        return refs, digests


# -- files --------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Any) -> None:
    """Write through ``write(tmp_path)``, fsync, rename into place, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    _fsync_dir(path.parent)


def _frame(record: Mapping[str, Any]) -> bytes:
    payload = orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)
    return _FRAME.pack(len(payload), xxhash.xxh3_64_intdigest(payload)) + payload


def _read_journal(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    pos = 0
    while pos < len(data):
        record, end = _parse_frame(data, pos)
        if isinstance(record, str):
            if _any_valid_frame_after(data, pos + 1):
                raise CheckpointError(
                    f"checkpoint journal {path} is corrupted at byte {pos} ({record}); it is "
                    "not a torn tail, so it is not safe to guess: restore the checkpoint or "
                    "start anew"
                )
            break  # a torn tail: the record being written when the process died
        records.append(record)
        pos = end
    return records


def _parse_frame(data: bytes, pos: int) -> tuple[dict[str, Any] | str, int]:
    """The record framed at ``pos`` and where the next frame starts, or why there is none."""
    if pos + _FRAME.size > len(data):
        return "truncated frame header", pos
    size, checksum = _FRAME.unpack_from(data, pos)
    end = pos + _FRAME.size + size
    if end > len(data):
        return "truncated record", pos
    payload = data[pos + _FRAME.size : end]
    if xxhash.xxh3_64_intdigest(payload) != checksum:
        return "checksum mismatch", pos
    try:
        record = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return "unparseable record", pos
    if not (isinstance(record, dict) and record.get("t") in ("i", "d", "x")):
        return "unknown record", pos
    return record, end


def _any_valid_frame_after(data: bytes, start: int) -> bool:
    # Brute force over byte offsets, only on the error path: is there a whole valid frame later?
    return any(
        not isinstance(_parse_frame(data, p)[0], str) for p in range(start, len(data) - _FRAME.size)
    )


def _numbered(directory: Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    found = []
    for p in directory.iterdir():
        m = pattern.fullmatch(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def _read_segment(path: Path) -> pa.Table:
    try:
        return pq.read_table(path, schema=_SEGMENT_SCHEMA)
    except (pa.ArrowException, OSError) as exc:
        raise CheckpointError(f"checkpoint segment {path} cannot be read: {exc}") from exc


def load_state(directory: Path) -> State:
    """Everything recorded under ``directory``, verified consistent."""
    segments = [_read_segment(p) for _, p in _numbered(directory, _SEGMENT_RE)]
    state = State()
    if segments:
        state.segments = pa.concat_tables(segments)
        state.written = state.segments.num_rows
    in_segments = set(pc.unique(state.segments["chunk"]).to_pylist())
    for _, path in _numbered(directory, _JOURNAL_RE):
        for record in _read_journal(path):
            chunk = record["c"]
            if chunk in in_segments or chunk in state.answered_chunks:
                continue  # compacted or answered already: a record written twice
            if record["t"] == "x":
                state.intents.pop(chunk, None)
                state.rejected.add(chunk)
            elif record["t"] == "i" and chunk not in state.rejected:
                digests = np.array(record["d"], dtype=np.int64)
                intent = Intent(chunk, record["k"], record["at"], tuple(record["r"]), digests)
                state.intents.setdefault(chunk, intent)
            elif record["t"] == "d":
                handles = Handles(record["b"], record["i"], record["r"], record["q"], record["s"])
                try:
                    state.answer(chunk, handles, record["at"])
                except CheckpointError:
                    raise CheckpointError(
                        f"checkpoint {directory}: chunk {chunk} has handles but no intent"
                    ) from None
    refs, _ = state.recorded()
    if pc.count_distinct(refs).as_py() != len(refs):
        counts = pc.value_counts(refs)
        twice = [v["values"] for v in counts.to_pylist() if v["counts"] > 1][:5]
        raise CheckpointError(
            f"checkpoint {directory} records row(s) {twice} in more than one chunk; it is "
            "inconsistent and cannot be resumed safely"
        )
    return state


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint manifest {path} is not valid JSON") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format"), int):
        raise CheckpointError(f"{path} is not a runflow-frames checkpoint manifest")
    if manifest["format"] != FORMAT:
        raise CheckpointError(
            f"checkpoint {directory} has format {manifest['format']}; this version of "
            f"runflow-frames reads format {FORMAT}. Finish the job with the version that "
            "started it, or start anew in another directory"
        )
    return manifest


def fingerprint_changes(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints."""
    return [
        f"{name}: {recorded.get(name)!r} -> {current.get(name)!r}"
        for name in FINGERPRINT
        if recorded.get(name) != current.get(name)
    ]


def plan_resume(
    state: State, refs: Sequence[str], digests: np.ndarray[Any, np.dtype[np.int64]]
) -> tuple[list[tuple[Intent, list[int]]], Sequence[int]]:
    """What a run must still do: the pending intents to re-send (with their rows' positions),
    and the positions of the rows never recorded, in frame order.

    Refuses (CheckpointError) an input that lacks recorded rows, or whose recorded rows now
    encode to different bytes: their chunks could not be re-sent byte for byte, and the
    returned handles would not be for these values.
    """
    recorded, was = state.recorded()
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
    differs = digests[positions] != was
    if differs.any():
        changed = sorted(recorded.filter(pa.array(differs)).to_pylist())
        raise CheckpointError(
            f"{len(changed)} row(s) already recorded for submission have different values now, "
            f"e.g. {changed[:5]}; restore their values, or give changed rows new keys",
            changes=[f"changed row {r!r}" for r in changed],
        )
    unsent = np.ones(len(refs), dtype=bool)
    unsent[positions] = False
    pending = state.pending()
    offset = len(recorded) - sum(len(i.refs) for i in pending)  # pending rows come last
    planned = []
    for intent in pending:
        planned.append((intent, positions[offset : offset + len(intent.refs)].tolist()))
        offset += len(intent.refs)
    return planned, np.flatnonzero(unsent).tolist()


# -- the writer ---------------------------------------------------------------------------------


class Checkpoint:
    """An open checkpoint: loads what is there, then journals this run.

    Use :meth:`open`; call :meth:`close` when the run ends, however it ends.
    """

    def __init__(self, directory: Path, manifest: dict[str, Any], state: State) -> None:
        self.directory = directory
        self.manifest = manifest
        self.state = state
        self._journal_no = max((n for n, _ in _numbered(directory, _JOURNAL_RE)), default=0) + 1
        self._segment_no = max((n for n, _ in _numbered(directory, _SEGMENT_RE)), default=0) + 1
        self._fd: int | None = None
        self._lock_fd: int | None = None
        # Framed records wait here for sync(), which writes them in the thread that fsyncs: a
        # write from the event loop's thread would stall on a page the fsync is writing back.
        self._unwritten: list[bytes] = []
        self._unwritten_lock = threading.Lock()
        self._io_lock = threading.Lock()  # one write-and-fsync at a time, in record order
        self._dir_synced = True  # whether the current journal's directory entry is durable
        # Answers go to segments during the run, in a thread, so that closing writes only the
        # last few: the pool and the segment being written, if any.
        self._writer: ThreadPoolExecutor | None = None
        self._writing: Future[None] | None = None

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        fingerprint: Mapping[str, Any] | None,
        key_fingerprint: Callable[[str], str] | None = None,
    ) -> Checkpoint:
        """Open (or create) the checkpoint at ``directory`` for a job with ``fingerprint``;
        ``None`` opens an existing checkpoint whatever its job (to collect from it). A new
        checkpoint records ``key_fingerprint(job_id)`` at once (see :meth:`check_api_key`).

        Raises CheckpointError when the checkpoint was made by a different job.
        """
        path = Path(directory)
        if fingerprint is None and not (path / MANIFEST).exists():
            raise CheckpointError(f"{path} is not a checkpoint (no {MANIFEST})")
        path.mkdir(parents=True, exist_ok=True)
        # One writer at a time: two processes journaling one job could send a row twice.
        lock_fd = os.open(path / LOCK, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise CheckpointError(
                f"checkpoint {path} is in use by another running job; wait for it to finish"
            ) from None
        try:
            checkpoint = cls._open_locked(path, fingerprint, key_fingerprint)
        except BaseException:
            os.close(lock_fd)
            raise
        checkpoint._lock_fd = lock_fd
        return checkpoint

    @classmethod
    def _open_locked(
        cls,
        path: Path,
        fingerprint: Mapping[str, Any] | None,
        key_fingerprint: Callable[[str], str] | None,
    ) -> Checkpoint:
        manifest = read_manifest(path)
        if manifest is None:
            if fingerprint is None:
                raise CheckpointError(f"{path} is not a checkpoint (no {MANIFEST})")
            job_id = os.urandom(8).hex()
            manifest = {
                "format": FORMAT,
                "job_id": job_id,
                "created_at": time.time(),
                **{k: fingerprint[k] for k in FINGERPRINT},
            }
            if key_fingerprint is not None:  # written once, not again by check_api_key
                manifest["api_key_fingerprint"] = key_fingerprint(job_id)
            _atomic_write(path / MANIFEST, lambda tmp: tmp.write_bytes(orjson.dumps(manifest)))
        elif fingerprint is not None:
            changes = fingerprint_changes(manifest, fingerprint)
            if changes:
                raise CheckpointError(
                    f"checkpoint {path} belongs to a different job; changed: {'; '.join(changes)}. "
                    "Resume with the same model, server, key, columns and options, or use a new "
                    "checkpoint directory",
                    changes=changes,
                )
        return cls(path, manifest, load_state(path))

    @property
    def job_id(self) -> str:
        return str(self.manifest["job_id"])

    def start(self) -> None:
        """Fold what earlier runs left, then open this run's journal.

        After this, the directory holds the manifest, segments and one journal, which begins
        with the intents still pending from earlier runs.
        """
        self._compact()
        self._rotate()

    def _rotate(self) -> None:
        """Start a fresh journal holding only the pending intents and refused chunk numbers,
        and delete the older journals. Call it once the state is compacted (everything else
        the old journals say is in segments)."""
        old = self._switch_journal()
        self._retire(old)

    def _switch_journal(self) -> list[Path]:
        """Send every record from now on to a fresh journal that begins with the pending
        intents and refused chunk numbers; what was recorded so far goes to the old one.
        Returns the journals that the new one and the segments now make redundant."""
        old = [path for _, path in _numbered(self.directory, _JOURNAL_RE)]
        carried: list[dict[str, Any]] = [_intent_record(i) for i in self.state.pending()]
        carried += [{"t": "x", "c": c} for c in sorted(self.state.rejected)]
        frames = [_frame(r) for r in carried]
        path = self.directory / f"journal-{self._journal_no:06d}.log"
        with self._io_lock:
            if self._fd is not None:
                self._flush()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._journal_no += 1
            if self._fd is not None:
                os.close(self._fd)
            self._fd = fd
            self._dir_synced = False
            with self._unwritten_lock:
                self._unwritten = frames + self._unwritten
        return old

    def _retire(self, old: Sequence[Path]) -> None:
        """Make the current journal durable, then delete ``old``: a crash in between leaves
        the same records twice (deduplicated on load), never none."""
        with self._io_lock:
            self._sync_locked()
        self._delete(old)

    def _delete(self, journals: Sequence[Path]) -> None:
        for journal in journals:
            journal.unlink()
        if journals:
            _fsync_dir(self.directory)  # an old journal never comes back, with a torn tail

    def intend(self, intents: Iterable[Intent]) -> None:
        """Record intents; they are durable once :meth:`sync` returns (then their POSTs may
        go)."""
        records = []
        for intent in intents:
            self.state.intents[intent.chunk] = intent
            records.append(_intent_record(intent))
        self._append(records)

    def sync(self) -> None:
        """Write what was recorded since the last sync and make it durable; made to run in a
        thread while the event loop goes on."""
        try:
            with self._io_lock:
                self._sync_locked()
        except OSError as exc:
            raise self._journal_failed(exc) from exc

    def _journal_failed(self, exc: OSError) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {self.directory}: writing its journal failed ({exc}), so the job "
            "stopped. Fix the cause and re-run the same call: it resumes without sending "
            "anything twice"
        )

    def record(self, chunk: int, handles: Handles) -> None:
        """Record a chunk's handles, written and made durable by the next sync (or close):
        until then a crash only means the intent is re-sent and the server replays its batch."""
        at = time.time()
        self.state.answer(chunk, handles, at)
        # Column by column: a few lists per record parse much faster than a list per row when
        # a big journal is read back.
        record = {
            "t": "d",
            "c": chunk,
            "at": at,
            "b": handles.batch_id,
            "i": handles.item_ids,
            "r": handles.run_ids,
            "q": handles.sequence_indexes,
            "s": handles.statuses,
        }
        self._append([record])

    def check_api_key(self, fingerprint: str, *, pending: bool) -> None:
        """Refuse to re-send pending chunks under another API key than the one that sent them:
        if the server keeps Idempotency-Keys per API key (the emulator does; Runflow does not
        say), it would create them a second time. With nothing pending a new key is fine, and
        becomes the one recorded."""
        recorded = self.manifest.get("api_key_fingerprint")
        if recorded == fingerprint:
            return
        if recorded is None or not pending:
            self.manifest["api_key_fingerprint"] = fingerprint
            _atomic_write(
                self.directory / MANIFEST, lambda tmp: tmp.write_bytes(orjson.dumps(self.manifest))
            )
        else:
            raise CheckpointError(
                f"checkpoint {self.directory} has chunks whose answer was lost, sent with another "
                "API key; re-sending them under this key could run them twice (idempotency keys "
                "may be scoped per API key). Resume with the key that started the job",
                changes=["api key"],
            )

    def results(self) -> pa.Table:
        """Every collected outcome recorded so far (``RESULTS_SCHEMA``; later files win)."""
        tables = []
        for _, path in _numbered(self.directory, _RESULTS_RE):
            try:
                tables.append(pq.read_table(path, schema=RESULTS_SCHEMA))
            except (pa.ArrowException, OSError) as exc:
                raise CheckpointError(f"checkpoint results {path} cannot be read: {exc}") from exc
        return pa.concat_tables(tables) if tables else RESULTS_SCHEMA.empty_table()

    def record_results(self, table: pa.Table) -> None:
        """Keep collected outcomes of finished batches, atomically, in a new file."""
        if not table.num_rows:
            return
        number = max((n for n, _ in _numbered(self.directory, _RESULTS_RE)), default=0) + 1
        path = self.directory / f"results-{number:06d}.parquet"
        _atomic_write(path, lambda tmp: pq.write_table(table.cast(RESULTS_SCHEMA), tmp))

    def reject(self, chunk: int) -> None:
        """The server refused a chunk (a 4xx): it created nothing, so its rows are unsent again
        and its intent is dropped. Its number is never reused."""
        self.state.intents.pop(chunk, None)
        self.state.rejected.add(chunk)
        self._append([{"t": "x", "c": chunk}])

    def compact_in_background(self) -> None:
        """Once ``SEGMENT_ROWS`` answered rows wait, start writing them to a segment in a
        thread, one segment at a time. After a failed write it writes no more: the journal
        still holds those answers, and :meth:`close` reports the failure."""
        if self._writing is not None and not (
            self._writing.done() and self._writing.exception() is None
        ):
            return
        if len(self.state.answered) < SEGMENT_ROWS:
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="runflow-checkpoint")
        number, table = self._unwritten_segment()
        # The journal starts afresh too: once the segment is written, the old one says
        # nothing it does not, and a resume after a crash has little journal to read.
        try:
            old = self._switch_journal()
        except OSError as exc:
            raise self._journal_failed(exc) from exc
        self._writing = self._writer.submit(self._write_segment, number, table, retire=old)

    def close(self) -> None:
        """Fold this run's answers into a segment, keep what is pending, release the lock."""
        try:
            if self._fd is not None:
                with self._io_lock:
                    self._flush()  # the journal holds everything, should a segment write fail
                if self._writer is not None:
                    self._writer.shutdown()
                    failed = self._writing.exception() if self._writing is not None else None
                    if failed is not None:
                        os.fsync(self._fd)
                        raise CheckpointError(
                            f"checkpoint {self.directory}: writing a segment failed ({failed}); "
                            "its journal still holds every answer. Fix the cause and re-run "
                            "the same call: it resumes without sending anything twice"
                        ) from failed
                self._compact()
                if self.state.intents or self.state.rejected:
                    self._rotate()
                else:  # every record is in a segment now
                    self._delete([path for _, path in _numbered(self.directory, _JOURNAL_RE)])
        finally:
            if self._writer is not None:
                # However close ends, no segment is being written once the lock is released:
                # the next run would take the same segment number.
                self._writer.shutdown()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # closing releases the flock
                self._lock_fd = None

    def _sync_locked(self) -> None:
        """Write, fsync the journal and, the first time, the directory entry of a new journal
        (without it, a power loss could take the whole file). The caller holds ``_io_lock``."""
        self._flush()
        os.fsync(self._journal())
        if not self._dir_synced:
            _fsync_dir(self.directory)
            self._dir_synced = True

    def _journal(self) -> int:
        if self._fd is None:
            raise RuntimeError("Checkpoint.start() first")
        return self._fd

    def _append(self, records: Sequence[Mapping[str, Any]]) -> None:
        self._journal()
        frames = [_frame(r) for r in records]
        with self._unwritten_lock:
            self._unwritten += frames

    def _flush(self) -> None:
        """Write the unwritten records (the caller holds ``_io_lock``).

        A failed write (a full disk) is cut off the journal and its records kept for the next
        try, so that valid frames never follow a torn one."""
        fd = self._journal()
        with self._unwritten_lock:
            frames, self._unwritten = self._unwritten, []
        data = b"".join(frames)
        end = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.ftruncate(fd, end)
            with self._unwritten_lock:
                self._unwritten = frames + self._unwritten
            raise

    def _compact(self) -> None:
        """Write the submitted rows not yet in a segment file to a new one."""
        number, table = self._unwritten_segment()
        if table.num_rows:
            self._write_segment(number, table)

    def _unwritten_segment(self) -> tuple[int, pa.Table]:
        """The submitted rows not yet given to a segment, and the number of their segment.
        They count as written from now on: if the write fails, the journal still has them."""
        self.state.absorb()
        table = self.state.segments.slice(self.state.written)
        number = self._segment_no
        if table.num_rows:
            self.state.written = self.state.segments.num_rows
            self._segment_no += 1
        return number, table

    def _write_segment(self, number: int, table: pa.Table, retire: Sequence[Path] = ()) -> None:
        path = self.directory / f"segment-{number:06d}.parquet"
        _atomic_write(path, lambda tmp: pq.write_table(table, tmp, **_SEGMENT_OPTIONS))
        if retire:
            self._retire(retire)


def _intent_record(intent: Intent) -> dict[str, Any]:
    return {
        "t": "i",
        "c": intent.chunk,
        "k": intent.key,
        "at": intent.at,
        "r": list(intent.refs),
        "d": intent.digests,
    }


def read_checkpoint(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A checkpoint's recorded rows and handles, without running anything.

    Parameters
    ----------
    path : str or path-like
        The checkpoint directory given to ``run_batches(..., checkpoint=path)``.

    Returns
    -------
    pandas.DataFrame
        One row per recorded row, indexed by ``client_ref``: ``state`` (``"submitted"``, or
        ``"pending"`` for an intent whose response is unknown), ``chunk``, the handle columns,
        ``intent_at`` and ``submitted_at`` (UTC timestamps). ``df.attrs["progress"]`` summarises
        the job: model, rows submitted and pending, chunks, created_at.

    Examples
    --------
    >>> from runflow_frames import read_checkpoint
    >>> done = read_checkpoint("ckpt/")  # doctest: +SKIP
    >>> done.attrs["progress"]["rows_submitted"]  # doctest: +SKIP
    1000
    """
    directory = Path(path)
    manifest = read_manifest(directory)
    if manifest is None:
        raise CheckpointError(f"{directory} is not a checkpoint (no {MANIFEST})")
    state = load_state(directory)
    submitted = state.submitted().to_pandas(types_mapper=pd.ArrowDtype)
    submitted.insert(0, "state", "submitted")
    pending = state.pending()
    waiting = pd.DataFrame(
        {
            "client_ref": [r for i in pending for r in i.refs],
            "state": "pending",
            "chunk": [i.chunk for i in pending for _ in i.refs],
            "intent_at": [i.at for i in pending for _ in i.refs],
        }
    )
    df = pd.concat([submitted, waiting], ignore_index=True).sort_values("chunk", kind="stable")
    df = df.rename(columns={c: f"runflow_{c}" for c in HANDLE_SCHEMA.names[1:]})
    df = cast(pd.DataFrame, df[_READ_COLUMNS].astype(_READ_DTYPES).set_index("client_ref"))
    for col in ("intent_at", "submitted_at"):
        df[col] = pd.to_datetime(df[col], unit="s", utc=True)
    df.attrs["progress"] = {
        "model": manifest["model"],
        "created_at": manifest["created_at"],
        "rows_submitted": int((df["state"] == "submitted").sum()),
        "rows_pending": int((df["state"] == "pending").sum()),
        "chunks_submitted": int(df.loc[df["state"] == "submitted", "chunk"].nunique()),
        "chunks_pending": len(pending),
        "oldest_pending_at": min((i.at for i in pending), default=None),
    }
    return df


_READ_COLUMNS: Final = [
    "client_ref",
    "state",
    "chunk",
    "runflow_batch_id",
    "runflow_item_id",
    "runflow_run_id",
    "runflow_sequence_index",
    "runflow_status",
    "intent_at",
    "submitted_at",
]
_READ_DTYPES: Final = {
    "client_ref": "string",
    "state": "string",
    "chunk": "int64",
    "runflow_batch_id": "string",
    "runflow_item_id": "string",
    "runflow_run_id": "string",
    "runflow_sequence_index": "Int64",
    "runflow_status": "string",
    "intent_at": "float64",
    "submitted_at": "float64",
}
