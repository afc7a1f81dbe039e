"""Checkpoints wherever they are kept, read and listed through one interface: a local
directory (``LocalStore``) or a prefix on object storage (``ObjectStore``). What every face
reads of a checkpoint it did not write lives here: ``read_checkpoint`` (``status``), a file
job's blocks and their joined results, the outcomes ``collect`` keeps (``Results``)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Protocol

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ._admission import Pace
from ._errors import CheckpointError
from ._handles import HANDLE_SCHEMA
from ._journal import (
    LEASE,
    LOCK,
    MANIFEST,
    PACE,
    RESULTS_SCHEMA,
    Kind,
    Lock,
    atomic_write,
    load_state,
    make_private_dir,
    open_job,
    parse_manifest,
    parse_pace,
)
from ._objectstore import Lease, ObjectStore, is_url, load, open_manifest
from ._state import Intent, State

_RESULTS_RE: Final = re.compile(r"results-(\d{6})\.parquet")
_BLOCK_RE: Final = re.compile(r"(block-\d{6})/manifest\.json")


class Store(Protocol):
    """The storage primitives a checkpoint is read and written through."""

    url: str

    def child(self, name: str) -> Store: ...
    def read(self, name: str) -> bytes | None: ...
    def put(self, name: str, data: bytes | memoryview) -> None: ...
    def names(self) -> list[str]: ...
    def delete(self, names: Sequence[str]) -> None: ...
    def open(self, name: str) -> Any: ...
    def location(self) -> str | Path: ...


Held = Lock | Lease  # what keeps a checkpoint to one run: a flock, or a lease


class LocalStore:
    """A checkpoint directory, through the primitives of ``ObjectStore``: whole files written
    atomically (fsync'd and renamed into place), readable by their owner only."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = Path(directory)
        self.url = str(self.path)

    def child(self, name: str) -> LocalStore:
        return LocalStore(self.path / name)

    def location(self) -> Path:
        return self.path

    def read(self, name: str) -> bytes | None:
        try:
            return (self.path / name).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, name: str, data: bytes | memoryview) -> None:
        make_private_dir(self.path)
        atomic_write(self.path / name, lambda tmp: tmp.write_bytes(data))

    def names(self) -> list[str]:
        if not self.path.is_dir():
            return []
        found = (p for p in self.path.rglob("*") if p.is_file() and p.name != LOCK)
        return sorted(p.relative_to(self.path).as_posix() for p in found)

    def delete(self, names: Sequence[str]) -> None:
        for name in names:
            (self.path / name).unlink(missing_ok=True)

    def open(self, name: str) -> str:
        return str(self.path / name)  # pyarrow reads a local path itself, fastest

    def clear(self) -> None:
        """Remove everything but this directory's lock (held by the caller)."""
        for entry in self.path.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry.name != LOCK:
                entry.unlink()


def store_for(
    location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> Store:
    """The store a checkpoint location names: a URL's, or a local directory's."""
    if is_url(location):
        return ObjectStore(location, storage_options)
    return LocalStore(location)


@contextmanager
def opened(store: Store, name: str) -> Iterator[Any]:
    """``name`` in ``store`` as pyarrow reads it (a local path, or a remote file closed after)."""
    handle = store.open(name)
    try:
        yield handle
    finally:
        if not isinstance(handle, str):
            handle.close()


def clear(store: Store) -> None:
    """Everything in a checkpoint but its lock or lease (held by the caller) removed."""
    if isinstance(store, LocalStore):
        store.clear()
    else:
        store.delete([name for name in store.names() if name != LEASE])


def open_checkpoint(
    store: Store,
    kind: Kind,
    fingerprint: Mapping[str, Any],
    key_fingerprint: Callable[[str], str],
) -> tuple[Held, dict[str, Any]]:
    """Take the checkpoint at ``store`` (its lock or lease) and its manifest: this job's, or a
    new one written now. Another job's is refused (CheckpointError), the lock released."""
    if isinstance(store, LocalStore):
        return open_job(store.path, kind, fingerprint, key_fingerprint)
    assert isinstance(store, ObjectStore)
    lease = Lease(store)
    try:
        manifest = open_manifest(store, kind, fingerprint, key_fingerprint)
    except BaseException:
        lease.release()
        raise
    assert manifest is not None  # written now when there was none
    return lease, manifest


def lock(store: Store) -> Held:
    """One run at a time: a local directory's flock, or an object-storage checkpoint's lease."""
    if isinstance(store, LocalStore):
        return Lock(store.path)
    assert isinstance(store, ObjectStore)
    return Lease(store)


def read_manifest(store: Store) -> dict[str, Any] | None:
    data = store.read(MANIFEST)
    return None if data is None else parse_manifest(store.url, data)


def state_at(store: Store) -> State:
    """Everything the checkpoint at ``store`` recorded."""
    if isinstance(store, LocalStore):
        return load_state(store.path)
    assert isinstance(store, ObjectStore)
    return load(store)[0]


def read_pace(store: Store) -> Pace | None:
    """The pace a job at ``store`` learned, if it kept one (a damaged file is none)."""
    return parse_pace(store.read(PACE))


def block_stores(root: Store, names: Sequence[str] | None = None) -> list[Store]:
    """The block jobs of a file job's checkpoint, in order (from ``names``, its listing, when
    the caller has it: one listing is a walk of the whole tree, or a LIST request)."""
    listed = root.names() if names is None else names
    blocks = sorted({m.group(1) for n in listed if (m := _BLOCK_RE.fullmatch(n))})
    return [root.child(name) for name in blocks]


def job_parts(root: Store) -> list[Store]:
    """The checkpoints a job's outcomes are kept in: a file job's blocks, in order, else the
    checkpoint itself. A file job that never started a block has none to collect: refused."""
    manifest = read_manifest(root)
    if manifest is None or manifest.get("kind") != "file":
        return [root]
    parts = block_stores(root)
    if not parts:
        raise CheckpointError(
            f"checkpoint {root.url} holds a file job that never started a block: nothing was "
            "sent, so there is nothing to collect"
        )
    return parts


class Results:
    """Outcomes collected from finished batches, kept in a checkpoint (``results-N.parquet``,
    later files win) so that collecting again never fetches a finished batch twice. Holds the
    checkpoint's lock (or lease) while open."""

    def __init__(
        self, location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
    ) -> None:
        self.store = store_for(location, storage_options)
        manifest = read_manifest(self.store)
        if manifest is None:
            raise CheckpointError(f"{self.store.url} is not a checkpoint (no {MANIFEST})")
        self.manifest = manifest
        self._lock = lock(self.store)

    def _found(self) -> list[tuple[int, str]]:
        names = self.store.names()
        return sorted((int(m.group(1)), n) for n in names if (m := _RESULTS_RE.fullmatch(n)))

    def read(self) -> pa.Table:
        """Every collected outcome recorded so far (``RESULTS_SCHEMA``)."""
        tables = [_read_table(self.store, name, RESULTS_SCHEMA) for _, name in self._found()]
        return pa.concat_tables(tables) if tables else RESULTS_SCHEMA.empty_table()

    def record(self, table: pa.Table) -> None:
        """Keep collected outcomes of finished batches, atomically, in a new file."""
        if not table.num_rows:
            return
        number = max((n for n, _ in self._found()), default=0) + 1
        sink = pa.BufferOutputStream()
        pq.write_table(table.cast(RESULTS_SCHEMA), sink)
        self.store.put(f"results-{number:06d}.parquet", memoryview(sink.getvalue()))

    def close(self) -> None:
        self._lock.release()


def _read_table(store: Store, name: str, schema: pa.Schema | None = None, **kw: Any) -> pa.Table:
    try:
        return pq.read_table(store.open(name), schema=schema, **kw)
    except (pa.ArrowException, OSError) as exc:
        raise CheckpointError(f"checkpoint file {store.url}/{name} cannot be read: {exc}") from exc


def read_checkpoint(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """A checkpoint's recorded rows and handles, without running anything.

    Parameters
    ----------
    path : str or path-like
        The checkpoint given to ``run_batches(..., checkpoint=path)`` (or to
        ``run_batches_file``: its blocks' rows, in order): a directory or a URL.
    storage_options : dict, optional
        fsspec's options for a checkpoint on object storage.

    Returns
    -------
    pandas.DataFrame
        One row per recorded row, indexed by ``client_ref``: ``state`` (``"submitted"``, or
        ``"pending"`` for an intent whose response is unknown), ``chunk``, the handle columns,
        ``intent_at`` and ``submitted_at`` (UTC timestamps). ``df.attrs["progress"]`` summarises
        the job: kind, model, server, rows submitted and pending, chunks, created_at, a file
        job's ``rows_in_source`` (when its Parquet metadata says), ``outcomes`` (rows by
        status, as collected so far) and the ``pace`` learned from the server's 429s.

    Examples
    --------
    >>> from runflow_frames import read_checkpoint
    >>> done = read_checkpoint("ckpt/")  # doctest: +SKIP
    >>> done.attrs["progress"]["rows_submitted"]  # doctest: +SKIP
    1000
    """
    return recorded_at(store_for(path, storage_options))


def recorded_at(root: Store) -> pd.DataFrame:
    """:func:`read_checkpoint` of the checkpoint ``root`` is."""
    manifest = read_manifest(root)
    if manifest is None:
        raise CheckpointError(f"{root.url} is not a checkpoint (no {MANIFEST})")
    parts = block_stores(root) if manifest.get("kind") == "file" else [root]
    frames, pending = [], []
    for part in parts:
        frame, waiting = recorded_rows(state_at(part))
        frames.append(frame)
        pending += waiting
    df = pd.concat(frames) if frames else _recorded_frame(pd.DataFrame(columns=_READ_COLUMNS))
    df.attrs["progress"] = {
        "kind": manifest.get("kind"),
        "model": manifest["model"],
        "base_url": manifest.get("base_url"),
        "created_at": manifest["created_at"],
        "rows_submitted": int((df["state"] == "submitted").sum()),
        "rows_pending": int((df["state"] == "pending").sum()),
        # Chunk numbers are per block job: counted block by block.
        "chunks_submitted": sum(
            int(f.loc[f["state"] == "submitted", "chunk"].nunique()) for f in frames
        ),
        "chunks_pending": len(pending),
        "oldest_pending_at": min((i.at for i in pending), default=None),
        "rows_in_source": _source_rows(manifest),
        **_outcomes(parts),
        "pace": next((p for p in map(read_pace, reversed(parts)) if p is not None), None),
    }
    return df


def _source_rows(manifest: Mapping[str, Any]) -> int | None:
    """A local file job's row count, when its source says it cheaply (Parquet metadata)."""
    path = manifest.get("source", {}).get("path")
    if not path or not str(path).endswith(".parquet") or is_url(path):
        return None
    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except (OSError, pa.ArrowException):
        return None


def _outcomes(parts: Sequence[Store]) -> dict[str, Any]:
    """``outcomes`` (rows by status), ``spent`` (their cost) and ``price_per_run`` (spent per
    succeeded run; None before one), as collected so far (later results files win); amounts as
    decimal text."""
    latest: dict[str, tuple[str, str | None]] = {}
    for part in parts:
        names = sorted(n for n in part.names() if _RESULTS_RE.fullmatch(n))
        for name in names:
            columns = ["item_key", "runflow_status", "runflow_cost"]
            keys, statuses, costs = _read_table(part, name, columns=columns).to_pydict().values()
            latest.update(zip(keys, zip(statuses, costs, strict=True), strict=True))
    counts: dict[str, int] = {}
    spent, succeeded = Decimal(0), 0
    for status, cost in latest.values():
        counts[str(status)] = counts.get(str(status), 0) + 1
        spent += Decimal(cost) if cost else 0
        succeeded += status == "succeeded"
    return {
        "outcomes": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "spent": str(spent),
        "price_per_run": str(spent / succeeded) if succeeded else None,
    }


def recorded_rows(state: State) -> tuple[pd.DataFrame, list[Intent]]:
    """A checkpoint's recorded rows (``read_checkpoint``'s columns), and its pending intents."""
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
    return _recorded_frame(df), pending


def _recorded_frame(df: pd.DataFrame) -> pd.DataFrame:
    df = df[_READ_COLUMNS].astype(_READ_DTYPES).set_index("client_ref")
    for col in ("intent_at", "submitted_at"):
        df[col] = pd.to_datetime(df[col], unit="s", utc=True)
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
