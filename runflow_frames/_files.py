"""File jobs bigger than memory: read a CSV or Parquet file in blocks, submit each block as a
block job (``_job.py``, the same protocol as every face), and write the joined result as it goes.

Layout of a file job's checkpoint (see ``_journal.py``)::

    manifest.json            kind "file": server, model, options, source (path, size, mtime),
                             block size, once
    block-000042/            block 42's job (kind "block": intents, journal, segments)
    block-000042.parquet     block 42's joined result, written atomically after each run of it;
                             marked complete once every row of the block has a handle

A block is a fixed range of rows (``block_rows`` of them), so a resume reads the file again and
finds the same blocks: complete ones are skipped, the others resume from their checkpoints
(nothing sent twice; rows a fault left pending are re-sent under their keys), the rest are
sent. At the end the block results are streamed into
``output`` one at a time. Memory holds one block (encoded) and the requests in flight, whatever
the file's size.

Keys: the ``key`` column, or the row's position in the file. Uniqueness is checked within a
block (checking across blocks would hold every key in memory).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import anyio
import anyio.to_thread
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ._admission import Pace
from ._api import submit_frame
from ._budget import Budget
from ._canary import Canary
from ._client import model_path
from ._config import Connection, JobOptions, fingerprint
from ._datasets import OUTPUT_BATCH_ROWS, Input, Output, resolve_input
from ._errors import CheckpointError, InputError
from ._pipeline import SHARED_GATE, job_gate
from ._plan import Plan, plan_job
from ._progress import ProgressOption, Reporter
from ._rows import body_suffix
from ._stores import (
    Held,
    Store,
    block_stores,
    clear,
    lock,
    open_checkpoint,
    opened,
    read_pace,
    recorded_at,
    store_for,
)
from ._sync import sync_twin

DEFAULT_BLOCK_ROWS: Final = 100_000


def _blocks(
    source: Input,
    block_rows: int,
    types: dict[str, pa.DataType] | None = None,
    nulls: Sequence[str] | None = None,
) -> Iterator[pa.Table]:
    """The source as consecutive tables of exactly ``block_rows`` rows (the last one shorter);
    a CSV source's column ``types`` as ``csv_layout`` settles them (computed when not given),
    ``nulls`` the strings read as missing (None: pandas.read_csv's markers)."""
    if source.format == "csv" and types is None:
        # Empty fields and pandas.read_csv's null markers (NA, N/A, null, NaN...) are missing
        # values; the column types are settled over the whole source first.
        types, _ = csv_layout(source, nulls)
    convert = _convert(types, nulls) if source.format == "csv" else None
    batches = source.batches(block_rows, convert)
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += batch.num_rows
        while count >= block_rows:
            table = pa.Table.from_batches(pending).combine_chunks()
            yield table.slice(0, block_rows)
            rest = table.slice(block_rows)
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending).combine_chunks()


def _convert(
    types: dict[str, pa.DataType] | None, nulls: Sequence[str] | None
) -> pacsv.ConvertOptions:
    options: dict[str, Any] = {"strings_can_be_null": True}
    if types is not None:
        options["column_types"] = types
    if nulls is not None:
        options["null_values"] = list(nulls)
    return pacsv.ConvertOptions(**options)


def read_source(source: Input, nulls: Sequence[str] | None = None) -> pd.DataFrame:
    """A whole source as pandas, read as the file jobs read it (a CSV source's types settled
    over every row, ``nulls`` as missing): every face sends the same values for the same file."""
    convert = None
    if source.format == "csv":
        types, _ = csv_layout(source, nulls)
        convert = _convert(types, nulls)
    batches = list(source.batches(1 << 16, convert))
    if not batches:
        raise InputError(f"{source.location}: the source has no rows")
    frame: pd.DataFrame = pa.Table.from_batches(batches).to_pandas(types_mapper=pd.ArrowDtype)
    return frame


def csv_layout(
    source: Input, nulls: Sequence[str] | None = None
) -> tuple[dict[str, pa.DataType], int]:
    """A CSV file's column types, settled over the whole file before anything is sent, and
    its row count (for the progress bar's total): what pyarrow infers from the first block,
    widened where a later row does not fit (an integer column that turns decimal becomes
    float64; any other misfit, text). Inferring from the first block alone failed mid-job,
    after rows were billed, at the first row that did not fit. One extra streaming pass over
    the file, in bounded memory."""
    rows = 0
    try:
        types = {f.name: f.type for f in next(source.batches(1, _convert(None, nulls))).schema}
        as_text = _convert(dict.fromkeys(types, pa.string()), nulls)
        for batch in source.batches(1 << 16, as_text):
            rows += batch.num_rows
            for name, current in types.items():
                types[name] = _widened(batch.column(name), current)
    except (pa.ArrowInvalid, KeyError, StopIteration) as exc:
        raise InputError(f"{source.location}: not CSV pyarrow can read ({exc!r})") from exc
    return types, rows


def _widened(text: pa.Array, current: pa.DataType) -> pa.DataType:
    """``current``, or the narrowest wider type every value of ``text`` fits."""
    if text.null_count == len(text):
        return current
    if pa.types.is_null(current):
        candidates = [pa.int64(), pa.float64(), pa.bool_()]
    elif pa.types.is_integer(current):
        candidates = [current, pa.float64()]
    else:
        candidates = [current]
    for candidate in candidates:
        if pa.types.is_string(candidate):
            return candidate
        try:
            pc.cast(text, candidate)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
        return candidate
    return pa.string()


def _block_frame(table: pa.Table, number: int, block_rows: int) -> pd.DataFrame:
    """Block ``number`` as pandas, indexed by file position (the keys, unless a key column
    names them)."""
    frame: pd.DataFrame = table.to_pandas(types_mapper=pd.ArrowDtype)
    frame.index = pd.RangeIndex(number * block_rows, number * block_rows + len(frame))
    return frame


# run_batches' keywords that run_batches_file passes on: to each block job, and to the connection.
_JOB_KEYS: Final = frozenset(
    (
        "chunk_size",
        "max_concurrency",
        "metadata",
        "callback_url",
        "missing",
        "errors",
        "max_intent_age",
    )
)
_CONNECTION_KEYS: Final = frozenset(
    ("api_key", "base_url", "org_id", "timeout", "transport", "retry", "storage_options")
)


async def arun_batches_file(
    source: str | os.PathLike[str],
    owner: str,
    slug: str | None = None,
    *,
    output: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    key: str | None = None,
    columns: list[str] | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    progress: ProgressOption = None,
    csv_nulls: Sequence[str] | None = None,
    **options: Any,
) -> dict[str, int]:
    """Submit every row of a CSV or Parquet file, in bounded memory, exactly once, resumably.

    The file is read ``block_rows`` rows at a time; each block is submitted with the
    guarantees of ``run_batches`` as a block job under ``<checkpoint>/block-<n>``, and its
    joined result kept; the results are then streamed into ``output`` (.parquet or .csv).
    Re-running the same call after any interruption resumes: blocks whose every row has a
    handle are skipped, the others resume (rows whose answer was lost are re-sent under their
    Idempotency-Keys, rows never sent are sent), nothing is sent twice. The checkpoint records
    the server, organisation, model, options and the source's identity: another of them, or a
    checkpoint of another kind, is refused before anything is sent. Other keyword options are
    those of ``run_batches`` (``errors`` defaults to ``"keep"`` here: failed rows are in the
    output with their ``runflow_error``). ``csv_nulls``: the strings a CSV file's fields
    are missing values as (default: pandas.read_csv's, ``""``, ``NA``, ``N/A``, ``null``,
    ``NaN``...; ``[""]``: empty fields only). ``arun_batches_file`` is the async form.

    Returns counts: rows, blocks, blocks skipped (done before), failed rows (without a handle).

    Examples
    --------
    >>> run_batches_file("prompts.parquet", "acme", "echo", output="out.parquet",
    ...                  checkpoint="ckpt")  # doctest: +SKIP
    {'rows': 5000000, 'blocks': 50, 'blocks_skipped': 0, 'failed_rows': 0}
    """
    canary = options.pop("canary", False)
    max_failed = options.pop("canary_max_failed", 0.5)
    max_cost = options.pop("max_cost", None)
    unknown = set(options) - _JOB_KEYS - _CONNECTION_KEYS
    if unknown:
        raise InputError(f"run_batches_file got unexpected option(s) {sorted(unknown)}")
    job = {k: v for k, v in options.items() if k in _JOB_KEYS}
    job.setdefault("errors", "keep")
    opts = JobOptions(key=key, columns=columns, **job)
    flight = Canary.of(canary, max_failed, opts.chunk_size)
    budget = Budget.of(max_cost, opts.max_concurrency)  # one for every block
    connection = Connection.resolve(**{k: v for k, v in options.items() if k in _CONNECTION_KEYS})
    model = model_path(owner, slug)
    # File work runs in a worker thread, so an async caller's loop is never blocked by it.
    nulls = None if csv_nulls is None else list(csv_nulls)
    storage = connection.storage_options
    root = store_for(checkpoint, storage)
    src = await anyio.to_thread.run_sync(resolve_input, source, storage)
    out = Output(output, storage)
    job_print = await anyio.to_thread.run_sync(
        _fingerprint, src, block_rows, model, opts, connection
    )
    job_print["csv_nulls"] = nulls
    size, types, lock = await anyio.to_thread.run_sync(
        _prepare, src, root, block_rows, job_print, connection, nulls
    )
    try:
        return await _run_blocks(
            _Source(src, size, types, nulls),
            out,
            root,
            block_rows,
            model,
            opts,
            connection,
            progress,
            flight,
            budget,
        )
    finally:
        lock.release()


run_batches_file = sync_twin(arun_batches_file)


@dataclass(frozen=True)
class _Source:
    """What a job reads: its files, row count and (CSV) settled column types."""

    input: Input
    rows: int
    types: dict[str, pa.DataType] | None
    nulls: Sequence[str] | None = None


async def _run_blocks(
    src: _Source,
    out: Output,
    root: Store,
    block_rows: int,
    model: str,
    options: JobOptions,
    connection: Connection,
    progress: ProgressOption,
    canary: Canary | None = None,
    budget: Budget | None = None,
) -> dict[str, int]:
    # One bar for the whole file, its total known from the start; the blocks an earlier run
    # finished count as done, not as speed.
    finished = await anyio.to_thread.run_sync(_finished_blocks, root)
    reporter = Reporter(progress, total=src.rows, desc="submitted", initial=sum(finished.values()))
    totals = {"rows": 0, "blocks": 0, "blocks_skipped": 0, "failed_rows": 0}
    blocks = _blocks(src.input, block_rows, src.types, src.nulls)
    number = -1
    # One throttle for every block: what one block learned of the server's limits, the next
    # starts from (and a resumed job from what the last block it ran kept).
    gate = SHARED_GATE.set(job_gate(options.max_concurrency, _last_pace(root)))
    try:
        while (table := await anyio.to_thread.run_sync(next, blocks, None)) is not None:
            number += 1
            part = f"block-{number:06d}.parquet"
            totals["rows"] += table.num_rows
            totals["blocks"] += 1
            if part in finished:
                totals["blocks_skipped"] += 1
                if budget is not None:  # what it sent counts against the budget
                    for batch_id, rows in (await _batches_of(root, part)).items():
                        budget.sent(batch_id, rows)
                if out.parts and not out.has_part(number):  # an earlier run's, not written yet
                    await anyio.to_thread.run_sync(_write_output_part, out, number, root, part)
                continue
            result = await submit_frame(
                _block_frame(table, number, block_rows),
                model,
                options,
                connection,
                checkpoint=root.child(f"block-{number:06d}").location(),
                wait=False,
                progress=reporter.part(),
                kind="block",
                canary=canary if number == 0 else None,  # the file's first rows
                budget=budget,
            )
            failed = int(result["runflow_run_id"].isna().sum())
            totals["failed_rows"] += failed
            await anyio.to_thread.run_sync(
                _write_part, root, part, result, options.key is None, not failed
            )
            if out.parts:  # a directory output gets each block as it is done
                await anyio.to_thread.run_sync(_write_output_part, out, number, root, part)
    finally:
        SHARED_GATE.reset(gate)
        reporter.close()
    if not totals["blocks"]:
        raise InputError(f"{src.input.location}: the source has no rows")
    if not out.parts:
        await anyio.to_thread.run_sync(_concatenate, root, totals["blocks"], out)
    return totals


def _last_pace(root: Store) -> Pace | None:
    """The pace kept by the last block that kept one."""
    paces = (read_pace(block) for block in reversed(block_stores(root)))
    return next((pace for pace in paces if pace is not None), None)


def _fingerprint(
    src: Input, block_rows: int, model: str, options: JobOptions, connection: Connection
) -> dict[str, Any]:
    requested = None if options.columns is None else [str(c) for c in options.columns]
    suffix = body_suffix(options.metadata, options.callback_url)
    return {
        # The columns as asked for (None: every one but the key), not yet resolved: the file
        # is read only later.
        **fingerprint(model, connection, options, requested, suffix),
        "source": src.identity(),
        "block_rows": block_rows,
    }


def _prepare(
    src: Input,
    root: Store,
    block_rows: int,
    job: dict[str, Any],
    connection: Connection,
    nulls: Sequence[str] | None,
) -> tuple[int, dict[str, pa.DataType] | None, Held]:
    """Check the call, then open (or create) the file job's checkpoint: the row count, a CSV
    file's settled column types (``csv_layout``, before anything is sent) and the lock."""
    if not isinstance(block_rows, int) or block_rows < 1:
        raise InputError(f"block_rows must be a positive integer, got {block_rows!r}")
    if src.format == "csv":
        types, rows = csv_layout(src, nulls)
    else:
        types, rows = None, src.parquet_rows()
    try:
        lock, _ = open_checkpoint(root, "file", job, connection.key_fingerprint)
    except CheckpointError as exc:
        if not exc.changes or not _take_over(root):
            raise
        lock, _ = open_checkpoint(root, "file", job, connection.key_fingerprint)
    return rows, types, lock


def _take_over(root: Store) -> bool:
    """Clear a file job's checkpoint that holds nothing the server may have: no row submitted
    and no intent pending. An earlier run refused before sending (a duplicate key) or refused
    by the server (a mistyped model) binds nothing: the fixed job takes its directory over."""
    guard = lock(root)
    try:
        # Through ``root`` itself: its location alone would lose the storage_options.
        progress = recorded_at(root).attrs["progress"]
        if progress["kind"] != "file" or progress["rows_submitted"] or progress["rows_pending"]:
            return False
        clear(root)
        return True
    finally:
        guard.release()


def _finished_blocks(root: Store) -> dict[str, int]:
    """The blocks an earlier run finished: their results' names and rows. A block is done once
    its result is written and every row in it has a handle (a block with rows pending or
    failed is resumed, never skipped). Read once, under the job's lock: nothing else changes
    them meanwhile."""
    finished = {}
    names = root.names()
    listed = set(names)
    for block in block_stores(root, names):
        part = f"{block.url.rsplit('/', 1)[-1]}.parquet"
        if part not in listed:
            continue
        with opened(root, part) as handle:
            metadata = pq.read_metadata(handle)
        if (metadata.metadata or {}).get(b"runflow_complete") == b"1":
            finished[part] = metadata.num_rows
    return finished


def _write_part(
    root: Store, part: str, result: pd.DataFrame, keep_index: bool, complete: bool
) -> None:
    table = pa.Table.from_pandas(result, preserve_index=keep_index)
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), b"runflow_complete": b"1" if complete else b"0"}
    )
    sink = pa.BufferOutputStream()
    # Row groups of OUTPUT_BATCH_ROWS: they are streamed into the output a group at a time.
    pq.write_table(table, sink, row_group_size=OUTPUT_BATCH_ROWS)
    root.put(part, memoryview(sink.getvalue()))


async def _batches_of(root: Store, part: str) -> dict[str, int]:
    """Rows per batch of a finished block's result."""

    def read() -> dict[str, int]:
        with opened(root, part) as handle:
            column = pq.read_table(handle, columns=["runflow_batch_id"]).column(0)
        counts = pc.value_counts(column.drop_null())
        return {str(c["values"]): int(c["counts"]) for c in counts.to_pylist()}

    return await anyio.to_thread.run_sync(read)


def _read_part(root: Store, part: str) -> pa.Table:
    with opened(root, part) as handle:
        return pq.read_table(handle)


def _row_groups(root: Store, parts: Sequence[str]) -> Iterator[pa.Table]:
    for part in parts:
        with opened(root, part) as handle:
            reader = pq.ParquetFile(handle)
            for group in range(reader.num_row_groups):
                yield reader.read_row_group(group)


def _concatenate(root: Store, blocks: int, output: Output) -> None:
    """Stream the block results into ``output``, a row group in memory at a time."""
    parts = [f"block-{n:06d}.parquet" for n in range(blocks)]
    with opened(root, parts[0]) as handle:
        schema = pq.read_schema(handle)
    output.write(schema, _row_groups(root, parts))


def _write_output_part(output: Output, number: int, root: Store, part: str) -> None:
    output.write_part(number, _read_part(root, part))


def plan_file(
    source: str | os.PathLike[str],
    owner: str,
    slug: str | None = None,
    *,
    key: str | None = None,
    columns: list[str] | None = None,
    chunk_size: int = 100,
    metadata: dict[str, Any] | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    csv_nulls: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Plan:
    """A dry run over a file, block by block (bounded memory): every row validated, nothing
    sent. Key uniqueness is checked within blocks, as the job itself does."""
    src = resolve_input(source, storage_options)
    total: Plan | None = None
    for number, table in enumerate(_blocks(src, block_rows, None, csv_nulls)):
        plan = plan_job(
            _block_frame(table, number, block_rows),
            owner,
            slug,
            key=key,
            columns=columns,
            chunk_size=chunk_size,
            metadata=metadata,
        )
        if total is None:
            total = plan
        else:
            total.rows += plan.rows
            total.chunks += plan.chunks
            total.refused += plan.refused
            for name, n in plan.empty.items():
                total.empty[name] = total.empty.get(name, 0) + n
    if total is None:
        raise InputError(f"{src.location}: the source has no rows")
    return total
