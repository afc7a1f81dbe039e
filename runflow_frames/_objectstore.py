"""Checkpoints on object storage (``s3://``, ``gs://``, ``az://``...), through fsspec: the
journal for a job whose workers share no disk, with the same exactly-once guarantee.

Nothing can be appended to an object or fsync'd, so each sync writes one new object, and the
objects' numbers give the order::

    manifest.json               written once (created exclusively), as in a directory
    lease.json                  which run is writing, and until when: created exclusively,
                                renewed while the run lasts, taken over once expired
    log/00000042.json           one sync's records (intents, done, refused): a group's intents
                                are one object, confirmed before any of the group's POSTs,
                                with the answers that came since the previous one
    segment-00000043.parquet    answered rows, folded when a run starts and when it ends
    pace.json, results-000001.parquet     as in a directory (``_stores.Results``)

One writer at a time. The lease keeps a second run out; the numbers make it safe when a lease
is lost (a run paused past its expiry and then back): every log and segment object is created
exclusively (``If-None-Match: *``, fsspec's ``"xb"`` mode) at the number after everything its
run has read, so a run that was taken over fails its next write, before any POST it had not
recorded, and the run that took over read every intent the first one could have sent.
Objects are whole or absent (a PUT is atomic), and the first number after a listing is read
directly too, so a listing that lags behind a write loses nothing.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeGuard

import anyio
import anyio.to_thread
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from ._errors import CheckpointError, InputError
from ._items import Items
from ._journal import (
    _SEGMENT_OPTIONS,
    LEASE,
    MANIFEST,
    PACE,
    CheckpointJournal,
    Kind,
    Resume,
    judge_manifest,
    manifest_of,
    parse_manifest,
    parse_pace,
    state_from,
)
from ._rows import Chunk
from ._state import SEGMENT_SCHEMA, State

# A lease lasts this long unless renewed; it is renewed every third of it while a run lasts
# (each renewal is a GET and a PUT). Short, so that the run after a crash waits little: a run
# paused for longer loses the checkpoint safely (see the module's docstring).
LEASE_SECONDS = 15.0
# Longest time answers wait before an object records them, when no group of intents comes:
# every sync is a PUT, billed by the object store.
SYNC_INTERVAL: Final = 5.0
_logger = logging.getLogger("runflow_frames")
_LOG_RE: Final = re.compile(r"log/(\d{8})\.json")
_SEGMENT_RE: Final = re.compile(r"segment-(\d{8})\.parquet")


def is_url(location: object) -> TypeGuard[str]:
    """Whether a checkpoint, input or output names object storage rather than a local path."""
    return isinstance(location, str) and "://" in location and not location.startswith("file:")


def inside(location: str | os.PathLike[str], name: str) -> str | Path:
    """The checkpoint ``name`` inside ``location``: a URL's or a directory's."""
    return f"{location.rstrip('/')}/{name}" if is_url(location) else Path(location) / name


# Bytes an open remote file buffers: what it uploads as one part, or fetches ahead when read.
# fsspec's S3 default is 50 MiB, held (and copied when a part uploads) by every open file: a
# job reading one object and writing another peaked 150 MB higher than on local files. 5 MiB
# is S3's smallest multipart part.
BLOCK_SIZE: Final = 5 * 2**20


def open_file(fs: Any, path: str, mode: str) -> Any:
    """``fs.open`` with the job's block size (see ``BLOCK_SIZE``)."""
    return fs.open(path, mode, block_size=BLOCK_SIZE)


def filesystem(location: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    """fsspec's filesystem for a URL, and the path on it."""
    import fsspec  # imported when object storage is used: it costs every import otherwise

    try:
        fs, path = fsspec.core.url_to_fs(location, **dict(storage_options or {}))
    except (ImportError, ValueError) as exc:
        scheme = location.split("://", 1)[0]
        raise InputError(
            f"{location}: no filesystem for {scheme}:// ({exc}); install its fsspec package "
            "(s3fs, gcsfs, adlfs; the runflow-frames[s3] extra has s3fs)"
        ) from exc
    return fs, str(path)


class ObjectStore:
    """The objects under one URL prefix, named relative to it: the storage primitives a
    checkpoint needs, over an fsspec filesystem (credentials and endpoints from its usual
    sources: environment, profiles, ``storage_options``)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.fs, root = filesystem(self.url, storage_options)
        self.root = root.rstrip("/")

    def child(self, name: str) -> ObjectStore:
        store = object.__new__(ObjectStore)
        store.url, store.fs, store.root = f"{self.url}/{name}", self.fs, f"{self.root}/{name}"
        return store

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def read(self, name: str) -> bytes | None:
        try:
            return bytes(self.fs.cat_file(self._path(name)))
        except FileNotFoundError:
            return None

    def put(self, name: str, data: bytes | memoryview) -> None:
        """Write ``name`` a block at a time (no copy of the whole of ``data``)."""
        view = memoryview(data)
        with open_file(self.fs, self._path(name), "wb") as f:
            for start in range(0, len(view), BLOCK_SIZE):
                f.write(view[start : start + BLOCK_SIZE])

    def create(self, name: str, data: bytes | memoryview) -> bool:
        """Write ``name`` only if it does not exist (``If-None-Match: *``): False if it did."""
        try:
            with self.fs.open(self._path(name), "xb") as f:  # one request (up to 50 MiB)
                f.write(data)
        except FileExistsError:
            return False
        return True

    def location(self) -> str:
        return self.url

    def open(self, name: str) -> Any:
        return open_file(self.fs, self._path(name), "rb")

    def names(self) -> list[str]:
        """Every object under the prefix, relative to it (never a cached listing)."""
        self.fs.invalidate_cache(self.root)
        try:
            found = self.fs.find(self.root)
        except FileNotFoundError:
            return []
        return sorted(str(p)[len(self.root) + 1 :] for p in found)

    def delete(self, names: Sequence[str]) -> None:
        if names:
            self.fs.rm([self._path(n) for n in names])


def _numbered(names: Sequence[str], pattern: re.Pattern[str]) -> list[tuple[int, str]]:
    return sorted((int(m.group(1)), n) for n in names if (m := pattern.fullmatch(n)))


class Lease:
    """This run's claim on a checkpoint: one run at a time writes to it.

    A lease held by another run is waited for up to ``LEASE_SECONDS``: a run that crashed
    (a killed process, a Dask worker that died) stops renewing its lease, so the run after it
    goes on once it expires; one that is alive renews it, and this run is refused."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.holder = uuid.uuid4().hex
        self.renewed = time.monotonic()
        give_up = time.monotonic() + LEASE_SECONDS
        told = False
        while not store.create(LEASE, self._body()):
            held = self._read()
            expires = held.get("expires_at", 0) if held is not None else 0
            if expires <= time.time():  # its run stopped renewing it: take it over
                # Safe even if two runs race for it here, or the old run comes back: the
                # log's exclusive numbers let only one of them write.
                store.delete([LEASE])
            elif time.monotonic() < give_up:
                if not told:
                    _logger.info("checkpoint %s is in use; waiting for its lease", store.url)
                    told = True
                time.sleep(min(0.5, max(0.05, expires - time.time())))
            else:
                until = time.strftime("%H:%M:%S UTC", time.gmtime(expires))
                raise CheckpointError(
                    f"checkpoint {store.url} is in use by another running job (it keeps "
                    f"renewing its lease, now until {until}); wait for it to finish. Nothing "
                    "was sent"
                )

    def _body(self) -> bytes:
        return orjson.dumps({"holder": self.holder, "expires_at": time.time() + LEASE_SECONDS})

    def _read(self) -> dict[str, Any] | None:
        try:
            held = orjson.loads(self.store.read(LEASE) or b"null")
        except orjson.JSONDecodeError:
            return None
        return held if isinstance(held, dict) else None

    def renew(self) -> None:
        """Extend the lease, once a third of it has passed; refuses a lease taken over."""
        if time.monotonic() - self.renewed < LEASE_SECONDS / 3:
            return
        held = self._read()
        if held is None or held.get("holder") != self.holder:
            raise CheckpointError(f"checkpoint {self.store.url}: another job took it over")
        self.store.put(LEASE, self._body())
        self.renewed = time.monotonic()

    def release(self) -> None:
        try:
            held = self._read()
            if held is not None and held.get("holder") == self.holder:
                self.store.delete([LEASE])
        except OSError:
            pass  # it expires on its own


def open_manifest(
    store: ObjectStore,
    kind: Kind,
    fingerprint: Mapping[str, Any] | None,
    key_fingerprint: Callable[[str], str] | None = None,
) -> dict[str, Any] | None:
    """The manifest at ``store`` when it is this job's, or a new one written now (with
    ``key_fingerprint``); another job's, kind's or foreign objects are refused."""
    data = store.read(MANIFEST)
    names = [] if data is not None else store.names()
    recorded = parse_manifest(store.url, data) if data is not None else None
    manifest = judge_manifest(store.url, recorded, names, kind, fingerprint)
    if manifest is not None or key_fingerprint is None or fingerprint is None:
        return manifest
    manifest = manifest_of(kind, fingerprint, key_fingerprint)
    if not store.create(MANIFEST, orjson.dumps(manifest)):  # another job started meanwhile
        return open_manifest(store, kind, fingerprint)
    return manifest


def load(store: ObjectStore, *, each_row_once: bool = True) -> tuple[State, int, list[str]]:
    """What the checkpoint recorded, the next free object number and the log objects read."""
    names = store.names()
    logs = _numbered(names, _LOG_RE)
    segments = _numbered(names, _SEGMENT_RE)
    last = max((n for n, _ in [*logs, *segments]), default=0)
    while store.read(f"log/{last + 1:08d}.json") is not None:  # a listing that lags
        last += 1
        logs.append((last, f"log/{last:08d}.json"))
    tables = [_read_parquet(store, name, SEGMENT_SCHEMA) for _, name in segments]
    records = (_read_log(store, name) for _, name in logs)
    state = state_from(store.url, tables, records, each_row_once=each_row_once)
    return state, last + 1, [name for _, name in logs]


def _read_log(store: ObjectStore, name: str) -> list[dict[str, Any]]:
    data = store.read(name)
    try:
        records = orjson.loads(data or b"")["r"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint object {store.url}/{name} is damaged ({exc})") from exc
    return list(records)


def _read_parquet(store: ObjectStore, name: str, schema: pa.Schema) -> pa.Table:
    try:
        return pq.read_table(io.BytesIO(store.read(name) or b""), schema=schema)
    except pa.ArrowException as exc:
        raise CheckpointError(
            f"checkpoint object {store.url}/{name} cannot be read: {exc}"
        ) from exc


class ObjectJournal(CheckpointJournal):
    """A checkpoint on object storage. Use :meth:`open`."""

    def __init__(
        self,
        store: ObjectStore,
        manifest: dict[str, Any],
        lease: Lease,
        key_fingerprint: Callable[[str], str],
        max_intent_age: float,
    ) -> None:
        state, self._next, self._read_logs = load(store, each_row_once=False)  # plan checks
        super().__init__(
            store.url,
            manifest,
            state,
            key_fingerprint,
            max_intent_age,
            parse_pace(store.read(PACE)),
        )
        self.store = store
        self._lease = lease
        self._writer = uuid.uuid4().hex  # tells this run's objects from another's
        self._records: list[Mapping[str, Any]] = []
        self._records_lock = threading.Lock()  # answers come from the loop, syncs in threads
        self._io = threading.Lock()  # one object written at a time, in number order
        self._started = False

    @classmethod
    def open(
        cls,
        url: str,
        kind: Kind,
        fingerprint: Mapping[str, Any],
        key_fingerprint: Callable[[str], str],
        max_intent_age: float,
        storage_options: Mapping[str, Any] | None = None,
    ) -> ObjectJournal:
        """Open (or create) the checkpoint of this job at ``url``; refuses another job's, or
        one in use, before anything is sent."""
        store = ObjectStore(url, storage_options)
        try:
            lease = Lease(store)
        except OSError as exc:
            raise CheckpointError(f"checkpoint {store.url} cannot be opened: {exc}") from exc
        try:
            manifest = open_manifest(store, kind, fingerprint, key_fingerprint)
            assert manifest is not None  # written now when there was none
            return cls(store, manifest, lease, key_fingerprint, max_intent_age)
        except OSError as exc:
            lease.release()
            raise CheckpointError(f"checkpoint {store.url} cannot be read: {exc}") from exc
        except BaseException:
            lease.release()
            raise

    def _append(self, records: Sequence[Mapping[str, Any]]) -> None:
        with self._records_lock:
            self._records += records

    def _save_manifest(self) -> None:
        self.store.put(MANIFEST, orjson.dumps(self.manifest))

    def plan(self, refs: Sequence[str], items: Items) -> Resume:
        resume = self._resume(refs, items)
        self._guarded("folding what earlier runs recorded", self._fold)
        self._started = True
        return resume

    async def intend(self, chunks: Sequence[Chunk]) -> None:
        self._append(self._intents(chunks))
        await anyio.to_thread.run_sync(self.sync)  # confirmed before any of them is sent

    def sync(self) -> None:
        """Write the records kept since the last sync as one object (in a thread)."""
        self._guarded("writing its log", self._flush)

    async def keep_syncing(self) -> None:
        while True:
            await anyio.sleep(SYNC_INTERVAL)
            await anyio.to_thread.run_sync(self._guarded, "renewing its lease", self._lease.renew)
            await anyio.to_thread.run_sync(self.sync)

    def close(self) -> None:
        """Write what is left, fold the answers into a segment, release the lease."""
        try:
            if self._started:
                self._guarded("closing it", self._close)
        finally:
            self._lease.release()

    def _close(self) -> None:
        self._flush()
        self._fold()
        pace = self._pace
        if pace is not None and pace != self._pace_kept:
            self.store.put(PACE, orjson.dumps(pace))

    def _guarded(self, what: str, step: Callable[[], None]) -> None:
        try:
            step()
        except OSError as exc:
            raise self._failed(what, exc) from exc

    def _flush(self) -> None:
        with self._io:
            with self._records_lock:
                records, self._records = self._records, []
            if records:
                self._create(f"log/{self._next:08d}.json", self._log_body(records))

    def _log_body(self, records: Sequence[Mapping[str, Any]]) -> bytes:
        body = {"w": self._writer, "r": records}
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)

    def _create(self, name: str, data: bytes | memoryview) -> None:
        """Create the object at the next number, or find another run took the checkpoint."""
        if not self.store.create(name, data) and self.store.read(name) != data:
            # Not this run's own write retried by the filesystem layer: another run's.
            raise CheckpointError(
                f"checkpoint {self.store.url} was taken over by another job (it wrote {name}); "
                "this run stopped before sending anything it had not recorded, and the other "
                "job re-sends what this one left unanswered under the same keys"
            )
        self._next += 1
        if name.startswith("log/"):
            self._read_logs.append(name)

    def _fold(self) -> None:
        """Answered rows to a segment, and what is still open to a fresh log object; then the
        older logs go (a crash in between leaves records twice, deduplicated on load)."""
        with self._io:
            older = list(self._read_logs)
            carried = self._carried()
            if carried:
                self._create(f"log/{self._next:08d}.json", self._log_body(carried))
            table = self._unwritten()
            if table.num_rows:
                sink = pa.BufferOutputStream()
                pq.write_table(table, sink, **_SEGMENT_OPTIONS)
                self._create(f"segment-{self._next:08d}.parquet", memoryview(sink.getvalue()))
            self.store.delete(older)
            self._read_logs = [n for n in self._read_logs if n not in older]
