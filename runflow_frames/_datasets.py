"""Where a file job's rows come from and where its result goes: a local file, a URL on object
storage (``s3://``, ``gs://``, ``az://``/``abfs://``; ``https://`` to read), a directory, a
glob, or a hive-partitioned dataset (``year=2026/part-0.parquet``) of Parquet or CSV files.

Inputs are read as a stream of record batches, the files in path order, so that a resumed
job finds the same blocks; remote files go through fsspec (credentials and endpoints from its
usual sources: the AWS/GCP/Azure variables and profiles, ``AWS_ENDPOINT_URL``, and
``storage_options``), local ones through pyarrow directly. A source's identity (each file's
size and ETag, version or modification time) goes into the job's manifest, so a source that
changed is refused before anything is sent.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final, Literal

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import xxhash

from ._errors import InputError
from ._objectstore import filesystem, is_url, open_file

Format = Literal["parquet", "csv"]
FORMATS: Final[dict[str, Format]] = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
# Rows per write into a remote output: its writer buffers and copies each write until it
# uploads a part, so the memory it takes grows with the write (measured: a 100,000-row write
# cost 116 MB of peak RSS at the end of a job, 20,000-row writes 61 MB).
OUTPUT_BATCH_ROWS: Final = 20_000
READ_BUFFER: Final = 1 << 20
# What tells one version of a remote file from another, in the order looked for.
_VERSION_KEYS: Final = ("VersionId", "ETag", "etag", "md5Hash", "generation", "mtime")


def file_format(name: str) -> Format | None:
    return FORMATS.get(PurePosixPath(name.rstrip("/")).suffix.lower())


@dataclass(frozen=True)
class Input:
    """The files a job reads, in order, and how."""

    location: str
    files: tuple[str, ...]
    format: Format
    fs: Any  # fsspec's filesystem (local files are read by pyarrow directly)
    local: bool
    base: str = ""  # the directory hive partitions (key=value) are named under
    dataset: bool = False  # a directory or a glob, not one file
    partition_types: dict[str, pa.DataType] = field(default_factory=dict)

    def open(self, path: str) -> Any:
        return path if self.local else open_file(self.fs, path, "rb")

    def identity(self) -> dict[str, Any]:
        """What the manifest keeps of the source: a file's path, size and version (a local
        file's modification time); for a dataset, its file count and a digest of each file's."""
        if not self.dataset:
            if self.local:  # as checkpoints of a local file always kept it
                stat = Path(self.location).stat()
                path = str(Path(self.location).resolve())
                return {"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            size, version = self._version(self.files[0])
            return {"path": self.location, "size": size, "version": version}
        versions = [[p, *self._version(p)] for p in self.files]
        digest = xxhash.xxh3_128_hexdigest(orjson.dumps(versions))
        return {"path": self.location, "files": len(self.files), "digest": digest}

    def _version(self, path: str) -> tuple[int, str]:
        info = self.fs.info(path)
        found = next((str(info[k]) for k in _VERSION_KEYS if info.get(k)), "")
        return int(info.get("size") or 0), found

    def parquet_rows(self) -> int:
        total = 0
        for path in self.files:
            with ExitStack() as stack:
                handle = path if self.local else stack.enter_context(self.open(path))
                total += pq.ParquetFile(handle).metadata.num_rows
        return total

    def partitions(self, path: str) -> dict[str, str]:
        """The hive partition values (``key=value`` directories) of file ``path``."""
        relative = path[len(self.base) :].strip("/").split("/")[:-1] if self.base else []
        return dict(part.split("=", 1) for part in relative if "=" in part)

    def batches(
        self, batch_rows: int, convert: pacsv.ConvertOptions | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Every row, file after file, with the file's partition values as columns."""
        for path in self.files:
            with ExitStack() as stack:
                handle = path if self.local else stack.enter_context(self.open(path))
                if self.format == "parquet":
                    # Remote: column data read in pieces, not a row group's whole at once.
                    buffered = 0 if self.local else READ_BUFFER
                    reader = pq.ParquetFile(handle, buffer_size=buffered)
                    found: Iterator[pa.RecordBatch] = reader.iter_batches(batch_size=batch_rows)
                else:
                    found = iter(pacsv.open_csv(handle, convert_options=convert))
                values = self.partitions(path)
                for batch in found:
                    yield self._with_partitions(batch, values)

    def _with_partitions(self, batch: pa.RecordBatch, values: Mapping[str, str]) -> pa.RecordBatch:
        if not self.partition_types:
            return batch
        columns, names = list(batch.columns), list(batch.schema.names)
        for name, kind in self.partition_types.items():
            value = values.get(name)
            array = pa.array([value] * batch.num_rows, type=pa.string())
            columns.append(pc.cast(array, kind))
            names.append(name)
        return pa.RecordBatch.from_arrays(columns, names=names)


def resolve_input(
    location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None
) -> Input:
    """The files ``location`` names (a file, a directory, a glob; local or a URL), sorted,
    of one format; refused (InputError) when there are none or they mix formats."""
    text = os.fspath(location)
    local = not is_url(text)
    import fsspec  # imported when a file job runs: it costs every import otherwise

    fs, path = (fsspec.filesystem("file"), text) if local else filesystem(text, storage_options)
    files, base, dataset = _expand(fs, path)
    if not files:
        raise InputError(f"{text}: no such file, or no .parquet or .csv file in it")
    formats = {file_format(f) for f in files}
    if len(formats) != 1 or None in formats:
        raise InputError(f"{text}: only .csv and .parquet files can be streamed, one format")
    (kind,) = formats
    assert kind is not None
    found = Input(text, tuple(files), kind, fs, local, base, dataset)
    types = _partition_types(found) if base else {}
    return Input(text, tuple(files), kind, fs, local, base, dataset, types)


def _expand(fs: Any, path: str) -> tuple[list[str], str, bool]:
    """The data files ``path`` names in path order, the directory hive partitions hang from,
    and whether it names a dataset (a directory or a glob) rather than one file."""
    if any(c in path for c in "*?["):
        files = sorted(m for m in fs.glob(path) if file_format(m) and not _hidden(m))
        return files, str(fs._strip_protocol(path)).split("*", 1)[0].rsplit("/", 1)[0], True
    if not fs.isdir(path):
        return ([path] if fs.exists(path) else []), "", False
    base = str(fs._strip_protocol(path)).rstrip("/")
    files = sorted(f for f in fs.find(path) if file_format(f) and not _hidden(f[len(base) :]))
    return files, base, True


def _hidden(path: str) -> bool:
    """Files a dataset writer leaves beside its data (``_SUCCESS``, ``.part`` temporaries)."""
    return PurePosixPath(path).name.startswith(("_", "."))


def _partition_types(found: Input) -> dict[str, pa.DataType]:
    """Each partition key's type: int64 when every value is an integer, else text."""
    values: dict[str, set[str]] = {}
    for path in found.files:
        for key, value in found.partitions(path).items():
            values.setdefault(key, set()).add(value)
    return {
        key: pa.int64() if all(v.lstrip("-").isdigit() for v in seen) else pa.string()
        for key, seen in values.items()
    }


class Output:
    """Where a file job's result goes: one file (local: written beside and renamed into
    place; remote: one upload, visible once whole), or a directory of ``part-<n>.parquet``
    files, one per block."""

    def __init__(
        self, location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None
    ) -> None:
        if os.fspath(location).startswith(("http://", "https://")):
            raise InputError(f"{os.fspath(location)}: an http(s) URL can be read, not written")
        self.location = os.fspath(location).rstrip("/") if is_url(location) else os.fspath(location)
        self.fs: Any
        self.path: str
        self.fs, self.path = (
            filesystem(self.location, storage_options)
            if is_url(self.location)
            else (None, self.location)
        )
        self.parts = file_format(self.location) is None  # a directory of part files

    def write_part(self, number: int, table: pa.Table) -> None:
        """Block ``number``'s result as its own part file (a directory output)."""
        name = f"part-{number:06d}.parquet"
        if self.fs is not None:
            with open_file(self.fs, f"{self.path}/{name}", "wb") as f:
                pq.write_table(table, f)
            return
        from ._journal import atomic_write, make_private_dir

        make_private_dir(Path(self.path))
        atomic_write(Path(self.path) / name, lambda tmp: pq.write_table(table, tmp))

    def has_part(self, number: int) -> bool:
        name = f"{self.path}/part-{number:06d}.parquet"
        return bool(self.fs.exists(name)) if self.fs is not None else Path(name).exists()

    def write(self, schema: pa.Schema, tables: Iterator[pa.Table]) -> None:
        """The whole result into one file, a table at a time."""
        csv = file_format(self.location) == "csv"
        if self.fs is not None:
            with open_file(self.fs, self.path, "wb") as f:
                _write_all(f, schema, tables, csv, OUTPUT_BATCH_ROWS)
            return
        output = Path(self.path)
        tmp = output.with_name(f".{output.name}.tmp")
        _write_all(tmp, schema, tables, csv)
        tmp.replace(output)


def _write_all(
    where: Any, schema: pa.Schema, tables: Iterator[pa.Table], csv: bool, rows: int | None = None
) -> None:
    """Every table into one file; ``rows`` at a time when given (a row group each)."""
    writer: Any = pacsv.CSVWriter(where, schema) if csv else pq.ParquetWriter(where, schema)
    with writer:
        for table in tables:
            writer.write_table(table.cast(schema), rows)
