"""File jobs bigger than memory: read a CSV or Parquet file in blocks, submit each block as its
own exactly-once job, and write the joined result as it goes.

Layout of a file job's checkpoint::

    file-job.json            the source (path, size, mtime), block size and options, once
    block-000042/            block 42's own run_batches checkpoint (intents, journal, segments)
    block-000042.parquet     block 42's joined result, written atomically when it is done

A block is a fixed range of rows (``block_rows`` of them), so a resume reads the file again and
finds the same blocks: done ones are skipped, an interrupted one resumes from its checkpoint
(nothing sent twice), the rest are sent. At the end the block results are streamed into
``output`` one at a time. Memory holds one block (encoded) and the requests in flight, whatever
the file's size.

Keys: the ``key`` column, or the row's position in the file. Uniqueness is checked within a
block (checking across blocks would hold every key in memory).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ._checkpoint import _atomic_write
from ._errors import CheckpointError, InputError
from ._plan import Plan, plan_job
from ._progress import ProgressOption, Reporter
from ._sync import run_sync

DEFAULT_BLOCK_ROWS: Final = 100_000
MANIFEST: Final = "file-job.json"


def _blocks(source: Path, block_rows: int) -> Iterator[pa.Table]:
    """The file as consecutive tables of exactly ``block_rows`` rows (the last one shorter)."""
    suffix = source.suffix.lower()
    if suffix in (".parquet", ".pq"):
        batches: Iterator[pa.RecordBatch] = pq.ParquetFile(source).iter_batches(
            batch_size=block_rows
        )
    elif suffix == ".csv":
        # Empty fields are missing values, as pandas.read_csv has them.
        convert = pacsv.ConvertOptions(strings_can_be_null=True)
        batches = iter(pacsv.open_csv(source, convert_options=convert))
    else:
        raise InputError(f"{source}: only .csv and .parquet files can be streamed")
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


def _block_frame(table: pa.Table, number: int, block_rows: int) -> pd.DataFrame:
    """Block ``number`` as pandas, indexed by file position (the keys, unless a key column
    names them)."""
    frame: pd.DataFrame = table.to_pandas(types_mapper=pd.ArrowDtype)
    frame.index = pd.RangeIndex(number * block_rows, number * block_rows + len(frame))
    return frame


def _job_manifest(source: Path, block_rows: int, options: dict[str, Any]) -> dict[str, Any]:
    stat = source.stat()
    return {
        "source": str(source.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "block_rows": block_rows,
        "options": options,
    }


def _check_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    path = directory / MANIFEST
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, lambda tmp: tmp.write_bytes(orjson.dumps(manifest)))
        return
    recorded = orjson.loads(path.read_bytes())
    changed = [k for k in manifest if recorded.get(k) != manifest[k]]
    if changed:
        raise CheckpointError(
            f"checkpoint {directory} belongs to another file job; changed: {', '.join(changed)} "
            "(a source file that changed size or time counts: its rows may have moved)",
            changes=changed,
        )


async def arun_batches_file(
    source: str | os.PathLike[str],
    owner: str,
    slug: str,
    *,
    output: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    key: str | None = None,
    columns: list[str] | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    progress: ProgressOption = None,
    **options: Any,
) -> dict[str, int]:
    """Async twin of :func:`run_batches_file`."""
    from ._api import arun_batches

    src, out, root = Path(source), Path(output), Path(checkpoint)
    shaped = {"owner": owner, "slug": slug, "key": key, "columns": columns}
    shaped.update(
        {k: v for k, v in options.items() if k in ("metadata", "callback_url", "missing")}
    )
    # File work runs in a worker thread, so an async caller's loop is never blocked by it.
    size = await anyio.to_thread.run_sync(_prepare, src, out, root, block_rows, shaped)
    reporter = Reporter(progress, total=size, desc="submitted")
    totals = {"rows": 0, "blocks": 0, "blocks_skipped": 0, "failed_rows": 0}
    blocks = _blocks(src, block_rows)
    errors = options.pop("errors", "keep")
    number = -1
    try:
        while (table := await anyio.to_thread.run_sync(next, blocks, None)) is not None:
            number += 1
            part = root / f"block-{number:06d}.parquet"
            totals["rows"] += table.num_rows
            totals["blocks"] += 1
            if await anyio.to_thread.run_sync(part.exists):
                totals["blocks_skipped"] += 1
                reporter.advance(table.num_rows)
                continue
            result = await arun_batches(
                _block_frame(table, number, block_rows),
                owner,
                slug,
                key=key,
                columns=columns,
                checkpoint=root / f"block-{number:06d}",
                progress=False,
                errors=errors,
                **options,
            )
            totals["failed_rows"] += int(result["runflow_error"].notna().sum())
            written = pa.Table.from_pandas(result, preserve_index=key is None)
            await anyio.to_thread.run_sync(
                _atomic_write, part, lambda tmp, t=written: pq.write_table(t, tmp)
            )
            reporter.advance(table.num_rows)
    finally:
        reporter.close()
    await anyio.to_thread.run_sync(_concatenate, root, totals["blocks"], out)
    return totals


def _prepare(src: Path, out: Path, root: Path, block_rows: int, shaped: dict[str, Any]) -> int:
    """Check the call and the checkpoint; the row count when the file says it (Parquet)."""
    if not src.is_file():
        raise InputError(f"{src}: no such file")
    if block_rows < 1:
        raise InputError(f"block_rows must be positive, got {block_rows}")
    if out.suffix.lower() not in (".parquet", ".pq", ".csv"):
        raise InputError(f"{out}: write .parquet or .csv")
    _check_manifest(root, _job_manifest(src, block_rows, shaped))
    if src.suffix.lower() in (".parquet", ".pq"):
        return int(pq.ParquetFile(src).metadata.num_rows)
    return 0


def _concatenate(root: Path, blocks: int, output: Path) -> None:
    """Stream the block results into ``output``, one block in memory at a time."""
    parts = [root / f"block-{n:06d}.parquet" for n in range(blocks)]
    if not parts:
        raise InputError("the source file has no rows")
    schema = pq.read_schema(parts[0])
    tmp = output.with_name(f".{output.name}.tmp")
    if output.suffix.lower() == ".csv":
        with pacsv.CSVWriter(tmp, schema) as writer:
            for part in parts:
                writer.write_table(pq.read_table(part).cast(schema))
    else:
        with pq.ParquetWriter(tmp, schema) as writer:
            for part in parts:
                writer.write_table(pq.read_table(part).cast(schema))
    tmp.replace(output)


def run_batches_file(
    source: str | os.PathLike[str],
    owner: str,
    slug: str,
    *,
    output: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    key: str | None = None,
    columns: list[str] | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    progress: ProgressOption = None,
    **options: Any,
) -> dict[str, int]:
    """Submit every row of a CSV or Parquet file, in bounded memory, exactly once, resumably.

    The file is read ``block_rows`` rows at a time; each block is submitted with the
    guarantees of ``run_batches`` under ``<checkpoint>/block-<n>``, and its joined result kept;
    the results are then streamed into ``output`` (.parquet or .csv). Re-running the same call
    after any interruption resumes: finished blocks are skipped, an interrupted one resumes,
    nothing is sent twice. Other keyword options are those of ``run_batches`` (``errors``
    defaults to ``"keep"`` here: failed rows are in the output with their ``runflow_error``).

    Returns counts: rows, blocks, blocks skipped (done before), failed rows.

    Examples
    --------
    >>> run_batches_file("prompts.parquet", "acme", "echo", output="out.parquet",
    ...                  checkpoint="ckpt")  # doctest: +SKIP
    {'rows': 5000000, 'blocks': 50, 'blocks_skipped': 0, 'failed_rows': 0}
    """

    async def job() -> dict[str, int]:
        return await arun_batches_file(
            source,
            owner,
            slug,
            output=output,
            checkpoint=checkpoint,
            key=key,
            columns=columns,
            block_rows=block_rows,
            progress=progress,
            **options,
        )

    return run_sync(job)


def block_checkpoints(root: str | os.PathLike[str]) -> list[Path] | None:
    """The per-block checkpoints of a file job's checkpoint, in order; None if ``root`` is not
    a file job's."""
    directory = Path(root)
    if not (directory / MANIFEST).exists():
        return None
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("block-"))


def plan_file(
    source: str | os.PathLike[str],
    owner: str,
    slug: str,
    *,
    key: str | None = None,
    columns: list[str] | None = None,
    chunk_size: int = 100,
    metadata: dict[str, Any] | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> Plan:
    """A dry run over a file, block by block (bounded memory): every row validated, nothing
    sent. Key uniqueness is checked within blocks, as the job itself does."""
    src = Path(source)
    if not src.is_file():
        raise InputError(f"{src}: no such file")
    total: Plan | None = None
    for number, table in enumerate(_blocks(src, block_rows)):
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
    if total is None:
        raise InputError(f"{src}: the file has no rows")
    return total
