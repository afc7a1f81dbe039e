"""Checkpoint storage: the durable half of the exactly-once protocol, and the only module that
touches checkpoints. A job records through a ``Journal``: ``MemoryJournal`` (no checkpoint) keeps
handles in memory; ``DirectoryJournal`` makes each step durable in a local directory before the
next side effect. The job itself never asks which one it has.

The protocol (see ``_state.py`` for the states): before a chunk's first POST its **intent** is
fsync'd; after the 201 a **done** record holds its handles, written and fsync'd with the next
group of intents (or within a second, or at close); a chunk the server refused (nothing created)
gets a **rejected** record and its rows are unsent again. Every POST of a chunk sends the same
bytes with the same key, so re-sending an intent whose answer was lost (or whose done record was
lost in a crash) makes the server replay the first batch rather than create a second one.

One layout for every face. A checkpoint directory holds one ``manifest.json``: its ``kind``
(``frame``: ``run_batches``, a retry attempt, a Dask partition; ``file``: ``run_batches_file``
and the command line; ``block``: one block of a file job), the server, organisation, model,
options, a salted fingerprint of the API key and, for a file job, the source's identity. A
directory that holds another kind, another job, another format or foreign files is refused
before anything is sent. A frame or block job's directory::

    manifest.json           written once, when the job starts
    journal-000007.log      append-only records of one run: intents, then done records
    segment-000003.parquet  done rows: written every SEGMENT_ROWS during a run, the rest at
                            close, and those of older journals at start
    results-000001.parquet  outcomes collected from finished batches (``_stores.Results``)
    pace.json               the pace and concurrency cap learned from the server's 429s, so
                            that a resumed job starts from them (``_admission.Pace``)

A file job's directory holds its manifest, ``block-000042/`` (a block job) per block and
``block-000042.parquet``, the block's joined result, once every row of the block has a handle.

Journal records are framed as ``<u32 length><u64 xxh3><orjson payload>``. A frame that runs past
the end of the file, or fails its checksum with nothing valid after it, is a torn tail from a
crash and is ignored; a bad frame followed by valid ones is corruption and an error. Manifest
and segments are written to a temporary file, fsync'd, renamed into place and the directory
fsync'd, so they are whole or absent. Each run appends to a fresh journal; at start it carries
forward the intents that are still pending, folds the done records of older journals into a
segment and deletes those journals; a run that ends with nothing pending and no chunk refused
leaves no journal.
The same record may exist in a journal and a segment, or twice across journals, after a crash;
records are keyed by chunk number and loading deduplicates them. Directories are created 0700
and files 0600: they hold row data, outputs and the callback URL.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import struct
import threading
import time
import uuid
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import anyio
import anyio.to_thread
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import xxhash

from ._admission import Pace
from ._errors import CheckpointError, StaleIntentWarning
from ._handles import Handles, HandleTable, in_chunk_order
from ._items import UNKNOWN, Items
from ._rows import Chunk
from ._state import SEGMENT_SCHEMA, Intent, State, plan_resume, recorded_twice

# 4: one manifest with a kind for every face (3: file jobs had file-job.json); xxh3 frames.
FORMAT: Final = 5
# Older formats this version resumes (and upgrades): 4 has no value hashes, so a resume
# compares its rows by their bytes.
_READS: Final = (4, FORMAT)
_logger = logging.getLogger("runflow_frames")
MANIFEST: Final = "manifest.json"
PACE: Final = "pace.json"
LOCK: Final = ".lock"
LEASE: Final = "lease.json"  # an object-storage checkpoint's lock (_objectstore.py)
Kind = Literal["frame", "file", "block"]
# Answered rows that, once this many wait, go to a segment during the run, in a thread: a
# run's close then writes only the last few.
SEGMENT_ROWS: Final = 25_000
# Longest time an answer waits in memory before its done record is written and fsync'd.
SYNC_INTERVAL: Final = 1.0
_FRAME: Final = struct.Struct("<IQ")
_JOURNAL_RE: Final = re.compile(r"journal-(\d{6})\.log")
_SEGMENT_RE: Final = re.compile(r"segment-(\d{6})\.parquet")
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
        ("runflow_error", pa.string()),  # what was wrong with a malformed answer
        ("client_ref", pa.string()),
    ]
)
# Dictionary pages only where values repeat (per chunk, or a few statuses): for unique ids they
# cost time and bytes. zstd halves the ids' hex text; statistics would never be read.
_SEGMENT_OPTIONS: Final[dict[str, Any]] = {
    "use_dictionary": ["batch_id", "status", "chunk", "intent_at", "submitted_at"],
    "compression": "zstd",
    "write_statistics": False,
}
_HOW_TO_RESUME: Final[dict[str, str]] = {
    "frame": "run_batches(..., checkpoint=...) made it: resume it with the same call",
    "file": (
        "run_batches_file or `runflow-frames submit --checkpoint` made it: resume it with the "
        "same file and options, with or without --wait"
    ),
    "block": "it is one block of a file job: resume that job, in the parent directory",
}


# -- storage primitives -------------------------------------------------------------------------


def make_private_dir(path: Path) -> None:
    """``path`` and its missing parents; ``path`` itself readable by its owner only."""
    if not path.exists():
        path.mkdir(parents=True, mode=0o700, exist_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write through ``write(tmp_path)``, fsync, rename into place, fsync the directory; the
    file is readable by its owner only."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.chmod(0o600)
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
        return pq.read_table(path, schema=SEGMENT_SCHEMA)
    except (pa.ArrowException, OSError) as exc:
        raise CheckpointError(f"checkpoint segment {path} cannot be read: {exc}") from exc


def _read_segments(paths: Sequence[Path]) -> list[pa.Table]:
    """Every segment, in order, in one read: Arrow reads the files in parallel, and takes the
    GIL once rather than per file (a resume reads them while the frame is keyed meanwhile).
    On an error, file by file, to name the damaged one."""
    if not paths:
        return []
    try:
        found = ds.dataset([str(p) for p in paths], schema=SEGMENT_SCHEMA, format="parquet")
        return [found.to_table()]
    except (pa.ArrowException, OSError):
        return [_read_segment(p) for p in paths]


def load_state(directory: Path, *, each_row_once: bool = True) -> State:
    """Everything recorded under ``directory``, verified consistent."""
    segments = _read_segments([p for _, p in _numbered(directory, _SEGMENT_RE)])
    journals = (_read_journal(path) for _, path in _numbered(directory, _JOURNAL_RE))
    return state_from(str(directory), segments, journals, each_row_once=each_row_once)


def state_from(
    where: str,
    segments: Sequence[pa.Table],
    logs: Iterable[Sequence[Mapping[str, Any]]],
    *,
    each_row_once: bool = True,
) -> State:
    """The state that segments and journal records (in the order written) make, verified
    consistent; ``where`` names the checkpoint in errors. ``each_row_once=False`` leaves out
    the check that no row is in two chunks, for a journal: its resume checks that on the way
    (``plan_resume``), for free, where here it is a tenth of a big resume's start."""
    state = State()
    if segments:
        state.segments = pa.concat_tables(segments)
        state.written = state.segments.num_rows
    in_segments = set(pc.unique(state.segments["chunk"]).to_pylist())
    for records in logs:
        for record in records:
            chunk = record["c"]
            if chunk in in_segments or chunk in state.answered_chunks:
                continue  # compacted or answered already: a record written twice
            if record["t"] == "x":
                state.intents.pop(chunk, None)
                state.rejected.add(chunk)
            elif record["t"] == "i" and chunk not in state.rejected:
                digests = np.array(record["d"], dtype=np.int64)
                hashes = np.array(record.get("h") or [UNKNOWN] * len(digests), dtype=np.int64)
                refs = tuple(record["r"])
                intent = Intent(chunk, record["k"], record["at"], refs, digests, hashes)
                state.intents.setdefault(chunk, intent)
            elif record["t"] == "d":
                handles = Handles(record["b"], record["i"], record["r"], record["q"], record["s"])
                try:
                    state.answer(chunk, handles, record["at"])
                except CheckpointError:
                    raise CheckpointError(
                        f"checkpoint {where}: chunk {chunk} has handles but no intent"
                    ) from None
    if each_row_once:
        refs, _, _ = state.recorded()
        if len(pc.unique(refs)) != len(refs):  # unique: a third of count_distinct's time
            raise recorded_twice(where, refs)
    return state


def _intent_record(intent: Intent) -> dict[str, Any]:
    return {
        "t": "i",
        "c": intent.chunk,
        "k": intent.key,
        "at": intent.at,
        "r": list(intent.refs),
        "d": intent.digests,
        "h": intent.hashes,
    }


# -- the manifest and the lock ------------------------------------------------------------------


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of the checkpoint at ``directory``, or None when there is none."""
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint manifest {path} cannot be read: {exc}") from exc
    return parse_manifest(str(directory), data)


def parse_manifest(where: str, data: bytes) -> dict[str, Any]:
    """The manifest of the checkpoint at ``where`` from its bytes, checked for format."""
    try:
        manifest = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CheckpointError(
            f"checkpoint manifest {where}/{MANIFEST} is not valid JSON ({exc})"
        ) from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format"), int):
        raise CheckpointError(f"{where}/{MANIFEST} is not a runflow-frames checkpoint manifest")
    if manifest["format"] not in _READS:
        raise CheckpointError(
            f"checkpoint {where} has format {manifest['format']}; this version of "
            f"runflow-frames reads formats {' and '.join(map(str, _READS))}. Nothing was sent. "
            "Finish the job with the version that started it, or start anew in another directory"
        )
    return manifest


def write_manifest(directory: Path, manifest: Mapping[str, Any]) -> None:
    atomic_write(directory / MANIFEST, lambda tmp: tmp.write_bytes(orjson.dumps(manifest)))


def read_pace(directory: Path) -> Pace | None:
    """The pace a job at ``directory`` learned, if it kept one (a damaged file is none)."""
    try:
        return parse_pace((directory / PACE).read_bytes())
    except OSError:
        return None


def parse_pace(data: bytes | None) -> Pace | None:
    """A kept pace from its bytes; none when there are none or they are damaged."""
    try:
        recorded = orjson.loads(data or b"null")
    except orjson.JSONDecodeError:
        return None
    if not isinstance(recorded, dict):
        return None
    rate, cap = recorded.get("rate"), recorded.get("cap")
    return {
        "rate": float(rate) if isinstance(rate, int | float) and rate > 0 else None,
        "cap": cap if isinstance(cap, int) and cap > 0 else None,
    }


def write_pace(directory: Path, pace: Pace) -> None:
    """Keep ``pace`` at ``directory``: a hint for the next run, so a failure only logs."""
    try:
        atomic_write(directory / PACE, lambda tmp: tmp.write_bytes(orjson.dumps(pace)))
    except OSError as exc:
        _logger.warning("could not keep the pace learned in %s: %s", directory, exc)


def fingerprint_changes(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (a callback URL's or metadata's
    values are not shown: they often carry tokens, and messages end up in logs)."""
    return [
        f"{name} (values not shown)"
        if name in ("callback_url", "metadata")
        else f"{name}: {recorded.get(name)!r} -> {current.get(name)!r}"
        for name in current
        if recorded.get(name) != current.get(name)
    ]


def check_manifest(
    directory: Path, kind: Kind, fingerprint: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """The manifest at ``directory`` when it is this job's; None when there is no job yet.

    Refuses (CheckpointError, before anything is sent) a directory that holds another kind of
    job, another job (``fingerprint`` differs; None accepts any job of ``kind``), or files that
    are not a checkpoint. Reads only.
    """
    manifest = read_manifest(directory)
    if manifest is None and directory.is_dir():
        judge_manifest(str(directory), None, [p.name for p in directory.iterdir()], kind, None)
    return judge_manifest(str(directory), manifest, [], kind, fingerprint)


def judge_manifest(
    where: str,
    manifest: dict[str, Any] | None,
    names: Sequence[str],
    kind: Kind,
    fingerprint: Mapping[str, Any] | None,
) -> dict[str, Any] | None:
    """``manifest`` when it is this job's, None when there is no job yet at ``where`` (which
    then holds only ``names``); another kind, another job or foreign files are refused."""
    if manifest is None:
        foreign = [name for name in names if name not in (LOCK, LEASE)]
        if foreign:
            raise CheckpointError(
                f"{where} is not a runflow-frames checkpoint of this version: it holds "
                f"{sorted(foreign)[:3]} but no {MANIFEST}. Nothing was sent; give an empty or new "
                "directory"
            )
        return None
    if manifest.get("kind") != kind:
        raise CheckpointError(
            f"checkpoint {where} holds a {manifest.get('kind')} job, not a {kind} job: "
            f"{_HOW_TO_RESUME.get(str(manifest.get('kind')), 'use a new directory')}. Nothing "
            "was sent",
            changes=[f"kind: {manifest.get('kind')!r} -> {kind!r}"],
        )
    changes = fingerprint_changes(manifest, fingerprint) if fingerprint is not None else []
    if changes:
        raise CheckpointError(
            f"checkpoint {where} belongs to a different job; changed: {'; '.join(changes)}. "
            "Nothing was sent. Resume with the same model, server, key, columns and options, "
            "or use a new checkpoint directory",
            changes=changes,
        )
    return manifest


def new_manifest(
    directory: Path,
    kind: Kind,
    fingerprint: Mapping[str, Any],
    key_fingerprint: Callable[[str], str],
) -> dict[str, Any]:
    """Write the manifest of a new job at ``directory`` (made readable by its owner only)."""
    manifest = manifest_of(kind, fingerprint, key_fingerprint)
    make_private_dir(directory)
    directory.chmod(0o700)
    write_manifest(directory, manifest)
    return manifest


def manifest_of(
    kind: Kind, fingerprint: Mapping[str, Any], key_fingerprint: Callable[[str], str]
) -> dict[str, Any]:
    """The manifest of a new job: its kind, a new id, when, the fingerprint and the key's."""
    job_id = uuid.uuid4().hex[:16]
    return {
        "format": FORMAT,
        "kind": kind,
        "job_id": job_id,
        "created_at": time.time(),
        **fingerprint,
        "api_key_fingerprint": key_fingerprint(job_id),
    }


def open_job(
    directory: Path,
    kind: Kind,
    fingerprint: Mapping[str, Any],
    key_fingerprint: Callable[[str], str],
) -> tuple[Lock, dict[str, Any]]:
    """Take the lock of the checkpoint at ``directory`` and its manifest: this job's, or a new
    one written now. Another job's is refused (CheckpointError) with the lock released."""
    lock = Lock(directory)
    try:
        manifest = check_manifest(directory, kind, fingerprint) or new_manifest(
            directory, kind, fingerprint, key_fingerprint
        )
    except BaseException:
        lock.release()
        raise
    return lock, manifest


class Lock:
    """One process at a time per checkpoint directory (an flock, released when closed): two
    processes journaling one job could send a row twice."""

    def __init__(self, directory: Path) -> None:
        make_private_dir(directory)
        fd = os.open(directory / LOCK, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointError(
                f"checkpoint {directory} is in use by another running job; wait for it to "
                "finish. Nothing was sent"
            ) from None
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


# -- the journal files --------------------------------------------------------------------------


class _Log:
    """The append-only journal files of one directory: records wait in memory for ``sync``,
    which writes and fsyncs them in the thread it runs in (a write from the event loop's thread
    would stall on a page the fsync is writing back)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._number = max((n for n, _ in _numbered(directory, _JOURNAL_RE)), default=0) + 1
        self._fd: int | None = None
        self._unwritten: list[bytes] = []
        self._unwritten_lock = threading.Lock()
        self._io_lock = threading.Lock()  # one write-and-fsync at a time, in record order
        self._dir_synced = True  # whether the current journal's directory entry is durable

    def files(self) -> list[Path]:
        return [path for _, path in _numbered(self.directory, _JOURNAL_RE)]

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        if self._fd is None:
            raise RuntimeError("the journal is not open")
        frames = [_frame(r) for r in records]
        with self._unwritten_lock:
            self._unwritten += frames

    def switch(self, carried: Sequence[Mapping[str, Any]]) -> list[Path]:
        """Send every record from now on to a fresh journal that begins with ``carried``; what
        was recorded so far goes to the old one. Returns the journals there were."""
        old = self.files()
        frames = [_frame(r) for r in carried]
        path = self.directory / f"journal-{self._number:06d}.log"
        with self._io_lock:
            if self._fd is not None:
                self._flush()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._number += 1
            if self._fd is not None:
                os.close(self._fd)
            self._fd = fd
            self._dir_synced = False
            with self._unwritten_lock:
                self._unwritten = frames + self._unwritten
        return old

    def retire(self, old: Sequence[Path]) -> None:
        """Make the current journal durable, then delete ``old``: a crash in between leaves the
        same records twice (deduplicated on load), never none."""
        self.sync()
        self.delete(old)

    def delete(self, journals: Sequence[Path]) -> None:
        for journal in journals:
            journal.unlink()
        if journals:
            _fsync_dir(self.directory)  # an old journal never comes back, with a torn tail

    def sync(self) -> None:
        """Write, fsync the journal and, the first time, the directory entry of a new journal
        (without it, a power loss could take the whole file)."""
        with self._io_lock:
            self._flush()
            if self._fd is None:
                return
            os.fsync(self._fd)
            if not self._dir_synced:
                _fsync_dir(self.directory)
                self._dir_synced = True

    def flush(self) -> None:
        with self._io_lock:
            self._flush()

    def _flush(self) -> None:
        """Write the unwritten records (the caller holds ``_io_lock``).

        A failed write (a full disk) is cut off the journal and its records kept for the next
        try, so that valid frames never follow a torn one."""
        if self._fd is None:
            return
        fd = self._fd
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

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# -- journals -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resume:
    """What a run must still do: pending intents to re-send (with their rows' positions), the
    positions of rows never recorded (in frame order), the next free chunk number, and how
    many rows already have a handle."""

    job_id: str
    pending: list[tuple[Intent, list[int]]]
    unsent: Sequence[int]
    first_chunk: int
    submitted: int


class Journal(ABC):
    """Where a submit job records what it does. The job calls, in order: ``plan`` once, then
    ``intend`` for each group of chunks before any of them is sent (durable on return),
    ``answered`` or ``created_nothing`` for each chunk, and ``close`` however the run ends;
    ``keep_syncing`` runs beside the job."""

    #: The checkpoint (a directory, or a URL on object storage), or None when nothing is kept.
    where: str | Path | None = None

    @abstractmethod
    def plan(self, refs: Sequence[str], items: Items) -> Resume: ...

    @abstractmethod
    async def intend(self, chunks: Sequence[Chunk]) -> None:
        """Make the intents of ``chunks`` durable before any of them is sent."""

    @abstractmethod
    def answered(self, chunk: Chunk, handles: Handles) -> None: ...

    @abstractmethod
    def created_nothing(self, chunk: Chunk) -> None:
        """``chunk`` surely created nothing (refused on every try, or never sent): its rows are
        unsent again."""

    @abstractmethod
    async def keep_syncing(self) -> None:
        """Make answers durable now and then while the job runs."""

    @abstractmethod
    def handles(self) -> pa.Table:
        """Every submitted row's handle, old and new (``HANDLE_SCHEMA`` columns first), in
        chunk order."""

    @abstractmethod
    def close(self) -> None:
        """Release what the journal holds; called once the run ended, however it ended."""

    def pace(self) -> Pace | None:
        """The pace an earlier run learned, to start from."""
        return None

    def remember_pace(self, pace: Pace) -> None:  # noqa: ARG002 - nothing is kept by default
        """The pace learned so far: kept with the next sync and at close."""
        return


class MemoryJournal(Journal):
    """No checkpoint: handles are kept in memory, column by column, for the join. A second run
    through the same journal (the rest of a job after its canary) sends only rows no chunk of
    an earlier run held, whatever became of them."""

    def __init__(self) -> None:
        self._handles = HandleTable()
        self._numbers: list[int] = []  # the chunk of each answer in _handles, and its rows
        self._sizes: list[int] = []
        self._job_id = uuid.uuid4().hex
        self._tried: set[str] = set()  # refs some chunk held
        self._next = 0  # chunk numbers are never reused

    def plan(self, refs: Sequence[str], items: Items) -> Resume:  # noqa: ARG002
        if not self._tried:
            return Resume(self._job_id, [], range(len(refs)), 0, 0)
        unsent = [n for n, ref in enumerate(refs) if ref not in self._tried]
        return Resume(self._job_id, [], unsent, self._next, len(refs) - len(unsent))

    async def intend(self, chunks: Sequence[Chunk]) -> None:
        for chunk in chunks:  # nothing to make durable: only remembered
            self._tried.update(chunk.refs)
            self._next = max(self._next, chunk.number + 1)

    def answered(self, chunk: Chunk, handles: Handles) -> None:
        self._handles.add(chunk.refs, handles)
        self._numbers.append(chunk.number)
        self._sizes.append(len(chunk.refs))

    def created_nothing(self, chunk: Chunk) -> None:  # noqa: ARG002
        return None  # nothing was recorded for it

    async def keep_syncing(self) -> None:
        return None

    def handles(self) -> pa.Table:
        chunks = np.repeat(np.array(self._numbers, dtype=np.int64), self._sizes)
        return in_chunk_order(self._handles.to_arrow(), chunks)

    def close(self) -> None:
        return None


class CheckpointJournal(Journal):
    """What a checkpoint does wherever it is kept: the recorded state, the manifest, the plan of
    a resume and the records of this run. Subclasses store them: ``_append`` takes records
    (durable with the next sync), ``_save_manifest`` rewrites the manifest."""

    def __init__(
        self,
        where: str | Path,
        manifest: dict[str, Any],
        state: State,
        key_fingerprint: Callable[[str], str],
        max_intent_age: float,
        pace: Pace | None,
    ) -> None:
        self.where = where
        self.manifest = manifest
        self.state = state
        self._key_fingerprint = key_fingerprint
        self._max_intent_age = max_intent_age
        self._items: Items | None = None
        self._pace = self._pace_kept = pace

    @abstractmethod
    def _append(self, records: Sequence[Mapping[str, Any]]) -> None: ...

    @abstractmethod
    def _save_manifest(self) -> None: ...

    @property
    def job_id(self) -> str:
        return str(self.manifest["job_id"])

    def _resume(self, refs: Sequence[str], items: Items) -> Resume:
        """Match the input against what is recorded (refusing rows that changed or went
        missing, or pending chunks under another API key)."""
        self._items = items
        pending, unsent = plan_resume(self.state, refs, items, str(self.where))
        self._check_api_key(pending=bool(pending))
        if self.manifest["format"] != FORMAT:  # what this run adds is in this format
            self.manifest["format"] = FORMAT
            self._save_manifest()
        _warn_if_stale([intent for intent, _ in pending], self._max_intent_age)
        return Resume(
            self.job_id, pending, unsent, self.state.next_chunk(), self.state.submitted().num_rows
        )

    def _intents(self, chunks: Sequence[Chunk]) -> list[dict[str, Any]]:
        """The intent records of ``chunks`` not recorded yet (a re-sent chunk keeps its first)."""
        assert self._items is not None, "plan() first"
        now, items = time.time(), self._items
        records = []
        for c in chunks:
            if c.number not in self.state.intents:
                digests, hashes = items.digests(c.rows), items.hashes_of(c.rows)
                intent = Intent(c.number, c.key, now, c.refs, digests, hashes)
                self.state.intents[c.number] = intent
                records.append(_intent_record(intent))
        return records

    def pace(self) -> Pace | None:
        return self._pace

    def remember_pace(self, pace: Pace) -> None:
        self._pace = pace

    def answered(self, chunk: Chunk, handles: Handles) -> None:
        """Record a chunk's handles, durable with the next sync (or close): until then a crash
        only means the intent is re-sent and the server replays its batch."""
        at = time.time()
        self.state.answer(chunk.number, handles, at)
        # Column by column: a few lists per record parse much faster than a list per row when
        # a big journal is read back.
        record = {
            "t": "d",
            "c": chunk.number,
            "at": at,
            "b": handles.batch_id,
            "i": handles.item_ids,
            "r": handles.run_ids,
            "q": handles.sequence_indexes,
            "s": handles.statuses,
        }
        self._append([record])

    def created_nothing(self, chunk: Chunk) -> None:
        """Its intent is dropped and its rows unsent again; its number is never reused."""
        self.state.intents.pop(chunk.number, None)
        self.state.rejected.add(chunk.number)
        self._append([{"t": "x", "c": chunk.number}])

    def handles(self) -> pa.Table:
        submitted = self.state.submitted()
        return in_chunk_order(submitted, submitted["chunk"].to_numpy())

    def _failed(self, what: str, exc: BaseException) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {self.where}: {what} failed ({exc}), so the job stopped; what it "
            "recorded so far is kept. Fix the cause and re-run the same call: it resumes "
            "without sending anything twice"
        )

    def _check_api_key(self, *, pending: bool) -> None:
        """Refuse to re-send pending chunks under another API key than the one that sent them:
        if the server keeps Idempotency-Keys per API key (the emulator does; Runflow does not
        say), it would create them a second time. With nothing pending a new key is fine, and
        becomes the one recorded."""
        fingerprint = self._key_fingerprint(self.job_id)
        if self.manifest.get("api_key_fingerprint") == fingerprint:
            return
        if pending:
            raise CheckpointError(
                f"checkpoint {self.where} has chunks whose answer was lost, sent with another "
                "API key; re-sending them under this key could run them twice (idempotency keys "
                "may be scoped per API key). Nothing was sent. Resume with the key that started "
                "the job",
                changes=["api key"],
            )
        self.manifest["api_key_fingerprint"] = fingerprint
        self._save_manifest()

    def _carried(self) -> list[dict[str, Any]]:
        """Records of what is still open: pending intents and refused chunk numbers."""
        carried = [_intent_record(i) for i in self.state.pending()]
        return carried + [{"t": "x", "c": c} for c in sorted(self.state.rejected)]

    def _unwritten(self) -> pa.Table:
        """The submitted rows not yet given to a segment. They count as written from now on:
        if the write fails, the journal still has them."""
        self.state.absorb()
        table = self.state.segments.slice(self.state.written)
        self.state.written = self.state.segments.num_rows
        return table


class DirectoryJournal(CheckpointJournal):
    """A checkpoint in a local directory: loads what earlier runs recorded, then journals this
    run. Use :meth:`open`."""

    def __init__(
        self,
        directory: Path,
        manifest: dict[str, Any],
        lock: Lock,
        key_fingerprint: Callable[[str], str],
        max_intent_age: float,
    ) -> None:
        super().__init__(
            directory,
            manifest,
            load_state(directory, each_row_once=False),
            key_fingerprint,
            max_intent_age,
            read_pace(directory),
        )
        self.directory = directory
        self._lock = lock
        self._log = _Log(directory)
        self._segment_no = max((n for n, _ in _numbered(directory, _SEGMENT_RE)), default=0) + 1
        self._started = False  # plan() has opened this run's journal
        # Answers go to segments during the run, in a thread, so that closing writes only the
        # last few: the pool and the segment being written, if any.
        self._writer: ThreadPoolExecutor | None = None
        self._writing: Future[None] | None = None

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        kind: Kind,
        fingerprint: Mapping[str, Any],
        key_fingerprint: Callable[[str], str],
        max_intent_age: float,
    ) -> DirectoryJournal:
        """Open (or create) the checkpoint of this job at ``directory``; refuses another job's
        (CheckpointError) before anything is sent."""
        path = Path(directory)
        lock, manifest = open_job(path, kind, fingerprint, key_fingerprint)
        try:
            return cls(path, manifest, lock, key_fingerprint, max_intent_age)
        except BaseException:
            lock.release()
            raise

    def _append(self, records: Sequence[Mapping[str, Any]]) -> None:
        self._log.append(records)

    def _save_manifest(self) -> None:
        write_manifest(self.directory, self.manifest)

    def plan(self, refs: Sequence[str], items: Items) -> Resume:
        """Match the input against what is recorded, then fold what earlier runs left and open
        this run's journal."""
        resume = self._resume(refs, items)
        self._compact()
        self._rotate()
        self._started = True
        return resume

    async def intend(self, chunks: Sequence[Chunk]) -> None:
        self._log.append(self._intents(chunks))
        # Durable before any of them is sent; the fsync waits in a thread, so answers to the
        # requests in flight are handled meanwhile.
        await anyio.to_thread.run_sync(self.sync)
        self._compact_in_background()

    def sync(self) -> None:
        """Write what was recorded since the last sync and make it durable (in a thread)."""
        try:
            self._log.sync()
        except OSError as exc:
            raise self._failed("writing its journal", exc) from exc
        self._keep_pace()

    def _keep_pace(self) -> None:
        pace = self._pace
        if pace is not None and pace != self._pace_kept:
            write_pace(self.directory, pace)
            self._pace_kept = pace

    async def keep_syncing(self) -> None:
        """Answers are written with the next group's intents; when none comes for a while
        (after the last group, or from a slow server), at least every ``SYNC_INTERVAL``."""
        while True:
            await anyio.sleep(SYNC_INTERVAL)
            await anyio.to_thread.run_sync(self.sync)

    def close(self) -> None:
        """Fold this run's answers into a segment, keep what is pending, release the lock."""
        try:
            if not self._started:
                return  # refused at plan: nothing of this run to keep
            self._log.flush()  # the journal holds everything, should a segment write fail
            if self._writer is not None:
                self._writer.shutdown()
                failed = self._writing.exception() if self._writing is not None else None
                if failed is not None:
                    self._log.sync()
                    raise self._failed("writing a segment", failed) from failed
            self._compact()
            self._keep_pace()
            if self.state.intents or self.state.rejected:
                self._rotate()
            else:  # every record is in a segment now
                self._log.delete(self._log.files())
        except OSError as exc:
            raise self._failed("closing it", exc) from exc
        finally:
            if self._writer is not None:
                # However close ends, no segment is being written once the lock is released:
                # the next run would take the same segment number.
                self._writer.shutdown()
            self._log.close()
            self._lock.release()

    def _rotate(self) -> None:
        """Start a fresh journal holding only the pending intents and refused chunk numbers,
        and delete the older journals. Call it once the state is compacted (everything else
        the old journals say is in segments)."""
        self._log.retire(self._log.switch(self._carried()))

    def _compact_in_background(self) -> None:
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
            old = self._log.switch(self._carried())
        except OSError as exc:
            raise self._failed("writing its journal", exc) from exc
        self._writing = self._writer.submit(self._write_segment, number, table, old)

    def _compact(self) -> None:
        """Write the submitted rows not yet in a segment file to a new one."""
        number, table = self._unwritten_segment()
        if table.num_rows:
            self._write_segment(number, table)

    def _unwritten_segment(self) -> tuple[int, pa.Table]:
        table = self._unwritten()
        number = self._segment_no
        if table.num_rows:
            self._segment_no += 1
        return number, table

    def _write_segment(self, number: int, table: pa.Table, retire: Sequence[Path] = ()) -> None:
        path = self.directory / f"segment-{number:06d}.parquet"
        atomic_write(path, lambda tmp: pq.write_table(table, tmp, **_SEGMENT_OPTIONS))
        if retire:
            self._log.retire(retire)


def _warn_if_stale(pending: Sequence[Intent], max_age: float) -> None:
    now = time.time()
    stale = [i for i in pending if now - i.at > max_age]
    if stale:
        oldest = max(now - i.at for i in stale)
        warnings.warn(
            f"re-sending {len(stale)} chunk(s) ({sum(len(i.refs) for i in stale)} rows) whose "
            f"first POST may be up to {oldest / 3600:.1f} h old; if the server no longer "
            "remembers their Idempotency-Keys, rows it did receive then will run twice",
            StaleIntentWarning,
            stacklevel=2,
        )
