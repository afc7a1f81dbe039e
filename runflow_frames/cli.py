"""The ``runflow-frames`` command (click): submit, status, collect, emulator, demo.

Exit codes (the README's table): 0 done; 1 some rows failed or are not done (their errors are
in the output); 2 bad arguments; 3 refused before sending anything (bad input, a checkpoint of
another job); 4 the API refused the key, the credit or the permission; 5 the API or the network
stopped the job; 130 interrupted.
Errors are one line on stderr; ``--debug`` shows the traceback. The API key comes from
``RUNFLOW_API_KEY`` or a hidden prompt, never from an argument (it would land in shell history).
"""

from __future__ import annotations

import functools
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from ._version import __version__

if TYPE_CHECKING:
    from ._progress import Reporter
    from ._stores import Store

DEMO_KEY = "rf_live_demo"
T = TypeVar("T")

EXIT_FAILED_ROWS, EXIT_USAGE, EXIT_REFUSED, EXIT_ACCESS, EXIT_API = 1, 2, 3, 4, 5
EXIT_CANARY = 6  # the canary failed: nothing but its rows was sent
EXIT_BUDGET = 7  # the next chunk could have gone over --max-cost
EXIT_INTERRUPTED = 130  # as a shell reports a SIGINT
OUTPUT_HELP = "a .parquet or .csv file, or a directory of part files; a path or a URL"
JSON_HELP = "also print one JSON object on stdout as it exits (its keys are in the README)"


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"runflow-frames: error: {message}", err=True)
    _report(error=message)
    _exit(code)


def _report(**fields: Any) -> None:
    """Facts for ``--json``: kept in the command's context, printed once as it exits."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta.setdefault("runflow_report", {}).update(fields)


def _exit(code: int) -> NoReturn:
    """Exit with ``code``; with ``--json``, after one JSON object on stdout (what the command
    did, ``exit_code`` included): the human lines stay on stderr."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.meta.get("runflow_json"):
        import json

        report = {**ctx.meta.get("runflow_report", {}), "exit_code": code}
        click.echo(json.dumps(report, sort_keys=True, default=str))
    sys.exit(code)


def _json_option(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    ctx.meta["runflow_json"] = value
    return value


def _guarded(
    debug: bool,
    job: Callable[[], T],
    keep: Callable[[Any], str] | None = None,
    resume: str = "re-run the same command to resume",
) -> T:
    """Run ``job``, turning the library's errors into one line and an exit code. An error that
    carries what the job had (``.result``) hands it to ``keep`` first, which writes it and says
    where: no submitted row's handle is lost when the command fails."""
    from ._errors import (
        APIError,
        AuthenticationError,
        BudgetExceeded,
        CanaryFailedError,
        CheckpointError,
        CollectError,
        InputError,
        InsufficientCreditError,
        JobInterrupted,
        PermissionDeniedError,
        RunflowError,
        SubmissionError,
    )

    try:
        return job()
    except JobInterrupted as exc:
        kept = keep(exc.result) if keep is not None else ""
        _fail(f"interrupted{kept}; {resume}", EXIT_INTERRUPTED)
    except RunflowError as exc:
        if debug:
            traceback.print_exc()
        cause = exc.__cause__
        if isinstance(exc, InputError | CheckpointError):
            code = EXIT_REFUSED
        elif isinstance(exc, CanaryFailedError):
            code = EXIT_CANARY
        elif isinstance(exc, BudgetExceeded):
            code = EXIT_BUDGET
        elif isinstance(
            cause, AuthenticationError | InsufficientCreditError | PermissionDeniedError
        ):
            code = EXIT_ACCESS
        elif isinstance(exc, SubmissionError | CollectError) and not isinstance(cause, APIError):
            code = EXIT_FAILED_ROWS  # rows failed or are not done: their columns say why
        else:
            code = EXIT_API
        message = _one_line(exc)
        result = getattr(exc, "result", None)
        if keep is not None and result is not None:
            message += keep(result)
        _fail(message, code)


def _one_line(exc: BaseException) -> str:
    """What went wrong, in the command's words (the errors' own texts give advice for Python
    code)."""
    from ._errors import BudgetExceeded, CanaryFailedError, CollectError, SubmissionError

    cause = exc.__cause__
    if isinstance(exc, BudgetExceeded):
        spent, committed = exc.budget["spent"], exc.budget["committed"]
        return (
            f"the next chunk could take the job over --max-cost {exc.budget['max_cost']}: spent "
            f"{spent}, committed about {committed} more (runs still going); "
            f"{exc.not_submitted:,} rows not sent. Re-run with --checkpoint and a higher "
            "--max-cost to send the rest (what was spent counts against it)"
        )
    if isinstance(exc, CanaryFailedError):
        return (
            f"{exc.report}; nothing else was sent. Fix the cause (or raise --canary-max-failed) "
            "and re-run (with --checkpoint the canary's rows are not sent again)"
        )
    if isinstance(exc, CollectError):
        return f"waiting for the runs stopped: {cause or exc}"
    if isinstance(exc, SubmissionError):
        rows = exc.submitted + exc.not_submitted
        return f"{exc.not_submitted:,} of {rows:,} rows were not submitted: {cause or exc}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _api_key(required: bool = True) -> str | None:
    key = os.environ.get("RUNFLOW_API_KEY")
    if key:
        return key
    if sys.stdin.isatty():
        return str(click.prompt("Runflow API key", hide_input=True))
    if required:
        _fail("no API key: set RUNFLOW_API_KEY (or run in a terminal to be prompted)", EXIT_USAGE)
    return None


def _checkpoint(value: str) -> str:
    """A checkpoint to read: a URL, or a local directory that exists."""
    from ._objectstore import is_url

    if is_url(value) or Path(value).is_dir():
        return value
    raise click.BadParameter(f"{value}: no such directory", param_hint="'CHECKPOINT'")


def _source(value: str) -> str:
    """SOURCE as given: a URL, or a local file, directory or glob that exists."""
    from ._objectstore import is_url

    if is_url(value) or any(c in value for c in "*?[") or Path(value).exists():
        return value
    raise click.BadParameter(f"{value}: no such file or directory", param_hint="'SOURCE'")


def _read(source: str, nulls: list[str] | None) -> Any:
    from ._datasets import resolve_input
    from ._files import read_source

    # As the file jobs read it: every face sends the same values.
    return read_source(resolve_input(source, None), nulls)


def _for_files(df: Any) -> Any:
    """Outputs (dicts) as JSON text and costs as decimal text, so CSV and Parquet carry them."""
    import orjson

    out = df.copy()
    if "runflow_output" in out.columns:
        out["runflow_output"] = [
            None if v is None else orjson.dumps(v).decode() for v in out["runflow_output"]
        ]
    if "runflow_cost" in out.columns:
        out["runflow_cost"] = [None if v is None else str(v) for v in out["runflow_cost"]]
    return out


def _write(df: Any, location: str) -> None:
    """``df`` to ``location`` as every command writes files (``_Sink``): one layout, one
    timestamp format, no positional index column."""
    with _Sink(location) as sink:
        sink.write(df)


class _Sink:
    """Frames appended to one .parquet or .csv file (local, or a URL on object storage), one at
    a time, or written as the part files of a directory (a location without those suffixes).
    A file is written under another name and moved into place only once everything was
    written: a collect that stops part-way leaves it as it was (the submitted rows, with
    --wait) and what it had in ``partial``."""

    def __init__(self, location: str) -> None:
        from ._datasets import file_format
        from ._objectstore import filesystem, is_url

        self.location = location.rstrip("/") if is_url(location) else location
        self.fs: Any
        self.path: str
        self.fs, self.path = (
            filesystem(self.location, None) if is_url(self.location) else (None, self.location)
        )
        self.format = file_format(self.location)
        stem, dot, suffix = self.path.rpartition(".")
        self.partial = f"{stem}.partial.{suffix}" if dot else f"{self.path}.partial"
        folder, _, name = self.path.rpartition("/")
        # Remote: written at ``partial`` (an upload is whole or absent), then moved.
        self._tmp = self.partial if self.fs else f"{folder or '.'}/.{name}.tmp"
        self.writer: Any = None
        self.file: Any = None
        self.schema: Any = None
        self.parts = 0

    def __enter__(self) -> _Sink:
        return self

    def write(self, df: Any) -> None:
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(_for_files(df))
        if self.format is None:  # a directory: each frame is a part file
            from ._datasets import Output

            Output(self.location, None).write_part(self.parts, table)
            self.parts += 1
            return
        if self.writer is None:
            self.schema = table.schema
            from ._objectstore import open_file

            self.file = open_file(self.fs, self._tmp, "wb") if self.fs else self._tmp
            kind = pacsv.CSVWriter if self.format == "csv" else pq.ParquetWriter
            self.writer = kind(self.file, self.schema)
        self.writer.write_table(table.cast(self.schema))

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if self.writer is None:
            return
        self.writer.close()
        if self.fs is None:
            Path(self._tmp).replace(self.path if kind is None else self.partial)
            return
        self.file.close()
        if kind is None:
            self.fs.mv(self._tmp, self.path)


def _split(owner_slug: str) -> tuple[str, str]:
    owner, _, slug = owner_slug.partition("/")
    if not owner or not slug:
        raise click.BadParameter(
            "give the model as OWNER/SLUG, e.g. acme/echo", param_hint="'--model'"
        )
    return owner, slug


class _Commands(click.Group):
    """click's group, with its usage errors said in one line like every other error (click
    prints three), and Ctrl-C at a prompt exiting 130 like Ctrl-C anywhere else."""

    def main(  # type: ignore[override]
        self, args: Sequence[str] | None = None, standalone_mode: bool = True, **extra: Any
    ) -> Any:
        try:
            done = super().main(args, standalone_mode=False, **extra)
        except click.UsageError as exc:
            where = f"; see '{exc.ctx.command_path} --help'" if exc.ctx is not None else ""
            _fail(f"{exc.format_message().rstrip('.')}{where}", EXIT_USAGE)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            _fail("interrupted", EXIT_INTERRUPTED)
        if not standalone_mode:
            return done
        sys.exit(done if isinstance(done, int) else 0)


@click.group(cls=_Commands)
@click.version_option(__version__, prog_name="runflow-frames")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="warning",
    show_default=True,
    help="what the runflow_frames logger shows on stderr: info adds retries and their waits, "
    "debug every request",
)
def main(log_level: str) -> None:
    """Push dataframes and files through Runflow's batch API, exactly once."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("runflow-frames: %(levelname)s: %(message)s"))
    logger = logging.getLogger("runflow_frames")
    logger.addHandler(handler)
    logger.setLevel(log_level.upper())
    # A canary's report is shown whatever the level: it is what the user waits for.
    canary = logging.getLogger("runflow_frames.canary")
    canary.setLevel(min(logging.INFO, logger.level))


@main.command()
@click.argument("source", callback=lambda _c, _p, v: _source(v))
@click.option("--model", "-m", required=True, help="OWNER/SLUG, e.g. acme/echo")
@click.option("--output", "-o", help=OUTPUT_HELP)
@click.option("--key", help="column holding the row keys (default: the row number)")
@click.option("--columns", help="comma-separated columns to send (default: all but the key)")
@click.option("--chunk-size", type=click.IntRange(1, 100), default=100, show_default=True)
@click.option("--concurrency", type=click.IntRange(1), default=8, show_default=True)
@click.option(
    "--checkpoint", help="a directory (or a URL on object storage): makes the job resumable"
)
@click.option("--metadata", help="JSON object sent as every batch's metadata")
@click.option("--callback-url")
@click.option("--errors", type=click.Choice(["raise", "keep"]), default="keep", show_default=True)
@click.option(
    "--csv-nulls",
    help="comma-separated strings a CSV field is missing as (default: pandas.read_csv's: NA, "
    "N/A, null, NaN, empty...; '' for empty fields only)",
)
@click.option("--wait/--no-wait", default=False, help="wait for outputs and write them too")
@click.option(
    "--canary",
    type=click.IntRange(0),
    default=0,
    help="send this many first rows, wait for their runs, and send the rest only if at most "
    "--canary-max-failed of them failed (100 is one chunk; 0: no canary)",
)
@click.option(
    "--canary-max-failed",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="the share of the canary's runs that may fail",
)
@click.option(
    "--max-cost",
    help="a budget in the account's currency (e.g. 100): no chunk starts that could take what "
    "was spent, what runs still going will cost and that chunk over it",
)
@click.option("--dry-run", is_flag=True, help="validate every row, print the plan, send nothing")
@click.option(
    "--price-per-run",
    help="with --dry-run: project the whole input's cost at this price per run",
)
@click.option(
    "--price-from",
    help="with --dry-run: project the cost at the price per run a finished job's checkpoint "
    "learned (its collected outcomes)",
)
@click.option("--base-url", envvar="RUNFLOW_BASE_URL")
@click.option("--org-id", envvar="RUNFLOW_ORG_ID")
@click.option("--progress/--no-progress", default=None, help="progress bar (default: on a tty)")
@click.option("--json", "as_json", is_flag=True, callback=_json_option, help=JSON_HELP)
@click.option("--debug", is_flag=True, help="show tracebacks")
def submit(
    source: str,
    model: str,
    output: str | None,
    key: str | None,
    columns: str | None,
    chunk_size: int,
    concurrency: int,
    checkpoint: str | None,
    metadata: str | None,
    callback_url: str | None,
    errors: str,
    csv_nulls: str | None,
    wait: bool,
    canary: int,
    canary_max_failed: float,
    max_cost: str | None,
    dry_run: bool,
    price_per_run: str | None,
    price_from: str | None,
    base_url: str | None,
    org_id: str | None,
    progress: bool | None,
    as_json: bool,  # noqa: ARG001 - read through the context (_exit)
    debug: bool,
) -> None:
    """Submit every row of SOURCE (a .csv or .parquet file, a directory or glob of them; a
    path or a URL) and write the joined result to --output."""
    owner, slug = _split(model)
    meta = _metadata(metadata)
    chosen = [c.strip() for c in columns.split(",")] if columns else None
    nulls = None if csv_nulls is None else csv_nulls.split(",")
    if dry_run:
        price = _price(price_per_run, price_from, debug)
        _dry_run(source, owner, slug, key, chosen, chunk_size, meta, debug, nulls, price)
    if price_per_run is not None or price_from is not None:
        raise click.UsageError("--price-per-run and --price-from go with --dry-run")
    if output is None:
        raise click.UsageError("--output is required (or use --dry-run)")
    options: dict[str, Any] = {
        "key": key,
        "columns": chosen,
        "chunk_size": chunk_size,
        "max_concurrency": concurrency,
        "metadata": meta,
        "callback_url": callback_url,
        "errors": errors,
        "canary": canary,
        "canary_max_failed": canary_max_failed,
        "max_cost": max_cost,
        "progress": progress,
        "api_key": _api_key(),
        "base_url": base_url,
        "org_id": org_id,
        "csv_nulls": nulls,
    }
    if checkpoint is not None:
        _exit(_submit_file(source, owner, slug, output, checkpoint, wait, debug, options))
    _exit(_submit_frame(source, owner, slug, output, wait, debug, options))


def _metadata(text: str | None) -> dict[str, Any] | None:
    import orjson

    if not text:
        return None
    try:
        meta = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--metadata") from exc
    if not isinstance(meta, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--metadata")
    return meta


def _dry_run(
    source: str,
    owner: str,
    slug: str,
    key: str | None,
    columns: list[str] | None,
    chunk_size: int,
    metadata: dict[str, Any] | None,
    debug: bool,
    nulls: list[str] | None,
    price: Decimal | None = None,
) -> NoReturn:
    from ._files import plan_file

    plan = _guarded(
        debug,
        lambda: plan_file(
            source,
            owner,
            slug,
            key=key,
            columns=columns,
            chunk_size=chunk_size,
            metadata=metadata,
            csv_nulls=nulls,
        ),
    )
    click.echo(str(plan))
    if price is not None:
        projected = (price * plan.rows).quantize(Decimal("0.01"))
        click.echo(
            f"{'cost':<13}about {projected} if every run succeeds ({plan.rows:,} rows x "
            f"{price.normalize():f} per run)"
        )
        _report(projected_cost=str(projected), price_per_run=str(price))
    _exit(0 if plan.ok else EXIT_REFUSED)


def _price(per_run: str | None, learned_from: str | None, debug: bool) -> Decimal | None:
    """The price a dry run projects at: given, or learned by a finished job's checkpoint."""
    from ._budget import budget_of
    from ._stores import read_checkpoint

    if per_run is not None and learned_from is not None:
        raise click.UsageError("give --price-per-run or --price-from, not both")
    if per_run is not None:
        return _guarded(debug, lambda: budget_of(per_run, "--price-per-run"))
    if learned_from is None:
        return None
    progress = _guarded(debug, lambda: read_checkpoint(learned_from)).attrs["progress"]
    if progress["price_per_run"] is None:
        _fail(
            f"checkpoint {learned_from} has no collected run with a cost yet: run "
            "'runflow-frames collect' on it first",
            EXIT_USAGE,
        )
    return Decimal(progress["price_per_run"])


def _submit_file(
    source: str,
    owner: str,
    slug: str,
    output: str,
    checkpoint: str,
    wait: bool,
    debug: bool,
    options: dict[str, Any],
) -> int:
    """Resumable and in bounded memory: the file is streamed block by block. ``wait`` is the
    same job, then its outcomes collected block by block: never a second submission."""
    from ._files import run_batches_file

    started = time.monotonic()
    counts = _guarded(
        debug,
        lambda: run_batches_file(
            source, owner, slug, output=output, checkpoint=checkpoint, **options
        ),
    )
    seconds = round(time.monotonic() - started, 1)
    submitted = counts["rows"] - counts["failed_rows"]
    click.echo(
        f"{counts['rows']:,} rows -> {output} in {seconds:.1f} s; {submitted:,} submitted, "
        f"{counts['failed_rows']:,} failed ({counts['blocks_skipped']} of {counts['blocks']} "
        "blocks done before)",
        err=True,
    )
    _report(
        rows=counts["rows"],
        submitted=submitted,
        failed=counts["failed_rows"],
        blocks=counts["blocks"],
        blocks_done_before=counts["blocks_skipped"],
        output=str(output),
        checkpoint=str(checkpoint),
        submit_seconds=seconds,
    )
    if wait:
        connection = {k: options[k] for k in ("api_key", "base_url", "org_id")}
        return _collect_into(
            checkpoint, output, debug=debug, progress=options["progress"], **connection
        )
    return EXIT_FAILED_ROWS if counts["failed_rows"] else 0


def _submit_frame(
    source: str,
    owner: str,
    slug: str,
    output: str,
    wait: bool,
    debug: bool,
    options: dict[str, Any],
) -> int:
    """No checkpoint: the file is read whole and submitted as one job; whatever stops it, the
    rows that have a handle are written to ``output``."""
    from ._api import run_batches

    started = time.monotonic()
    options = dict(options)
    df = _read(source, options.pop("csv_nulls"))

    def keep(partial: Any) -> str:
        _write(partial, output)
        handled = int(partial["runflow_run_id"].notna().sum())
        return f" ({handled:,} rows with a handle written to {output})"

    result = _guarded(
        debug,
        lambda: run_batches(df, owner, slug, wait=wait, **options),
        keep,
        # Without a checkpoint nothing remembers what was sent: the same command sends it all.
        resume=(
            "without --checkpoint, re-running sends every row again (billed twice): send only "
            "the rows without a run id, or use --checkpoint next time"
        ),
    )
    _write(result, output)
    failed = int(result["runflow_error"].notna().sum())
    seconds = round(time.monotonic() - started, 1)
    click.echo(
        f"{len(result):,} rows -> {output} in {seconds:.1f} s; "
        f"{len(result) - failed:,} submitted, {failed:,} failed",
        err=True,
    )
    _report(
        rows=len(result),
        submitted=len(result) - failed,
        failed=failed,
        output=str(output),
        checkpoint=None,
        submit_seconds=seconds,
    )
    if wait:
        _report_outcomes(result)
    if wait and not _all_done(result["runflow_status"]):
        return EXIT_FAILED_ROWS
    return EXIT_FAILED_ROWS if failed else 0


@main.command()
@click.argument("checkpoint", callback=lambda _c, _p, v: _checkpoint(v))
@click.option("--json", "as_json", is_flag=True, help="one JSON object (the keys of the README)")
@click.option("--debug", is_flag=True)
def status(checkpoint: str, as_json: bool, debug: bool) -> None:
    """Show a checkpoint's progress (a frame job's or a file job's, in a directory or on
    object storage), sending nothing."""
    import json

    from ._stores import read_checkpoint

    progress = _guarded(debug, lambda: read_checkpoint(checkpoint)).attrs["progress"]
    if as_json:
        click.echo(json.dumps(progress, sort_keys=True))
        return
    for name, value in _status_lines(progress):
        click.echo(f"{name:<16} {value}")


def _status_lines(p: dict[str, Any]) -> list[tuple[str, str]]:
    """``status`` for people: totals, percentages, outcomes, times as dates and ages."""
    submitted, pending, total = p["rows_submitted"], p["rows_pending"], p["rows_in_source"]
    of = f" of {total:,} ({submitted / total:.0%})" if total else ""
    lines = [
        ("job", f"{p['kind']} job, model {p['model']}, server {p['base_url']}"),
        ("started", _when(p["created_at"])),
        ("submitted", f"{submitted:,} rows{of} in {p['chunks_submitted']:,} chunks"),
    ]
    if pending:
        lines.append(
            (
                "pending",
                f"{pending:,} rows in {p['chunks_pending']:,} chunks, sent {_when(p['oldest_pending_at'])}"
                " with no answer kept: a resume re-sends them under their keys (nothing twice)",
            )
        )
    outcomes = p["outcomes"]
    collected = sum(outcomes.values())
    if collected:
        counts = ", ".join(f"{n:,} {status}" for status, n in outcomes.items())
        lines.append(("collected", f"{collected:,} of {submitted:,} rows: {counts}"))
    else:
        lines.append(("collected", "nothing yet (runflow-frames collect)"))
    if p.get("price_per_run") is not None:
        price = Decimal(p["price_per_run"])
        rows = total or submitted
        lines.append(
            (
                "cost",
                f"{p['spent']} spent on the runs collected ({price.normalize():f} per succeeded "
                f"run); about {(price * rows).quantize(Decimal('0.01'))} for all {rows:,} rows",
            )
        )
    pace = p["pace"] or {}
    if pace.get("rate") or pace.get("cap"):
        learned = [f"{pace['rate']:.1f} requests/s" if pace.get("rate") else "", ""]
        if pace.get("cap"):
            learned[1] = f"at most {pace['cap']} in flight"
        lines.append(("server limit", " and ".join(x for x in learned if x) + " (learned)"))
    return lines


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    import datetime as dt

    at = dt.datetime.fromtimestamp(epoch, dt.UTC)
    age = time.time() - epoch
    ago = (
        f"{age:.0f} s"
        if age < 120
        else f"{age / 60:.0f} min"
        if age < 7200
        else f"{age / 3600:.1f} h"
    )
    return f"{at:%Y-%m-%d %H:%M:%S} UTC ({ago} ago)"


@main.command()
@click.argument("checkpoint", callback=lambda _c, _p, v: _checkpoint(v))
@click.option("--output", "-o", required=True, help=OUTPUT_HELP)
@click.option("--flatten", is_flag=True, help="spread outputs into runflow_output.<key> columns")
@click.option("--deadline", type=float, help="seconds to wait at most")
@click.option("--base-url", envvar="RUNFLOW_BASE_URL", help="must be the checkpoint's server")
@click.option("--org-id", envvar="RUNFLOW_ORG_ID")
@click.option("--progress/--no-progress", default=None)
@click.option("--json", "as_json", is_flag=True, callback=_json_option, help=JSON_HELP)
@click.option("--debug", is_flag=True)
def collect(
    checkpoint: str,
    output: str,
    flatten: bool,
    deadline: float | None,
    base_url: str | None,
    org_id: str | None,
    progress: bool | None,
    as_json: bool,  # noqa: ARG001 - read through the context (_exit)
    debug: bool,
) -> None:
    """Wait for a checkpoint's runs and write every row's outcome to --output."""
    api_key = _api_key()
    _exit(
        _collect_into(
            checkpoint,
            output,
            api_key=api_key,
            base_url=base_url,
            org_id=org_id,
            progress=progress,
            debug=debug,
            flatten=flatten,
            deadline=deadline,
        )
    )


def _collect_into(
    checkpoint: str,
    output: str,
    *,
    api_key: str | None,
    base_url: str | None,
    org_id: str | None,
    progress: bool | None,
    debug: bool,
    flatten: bool = False,
    deadline: float | None = None,
) -> int:
    """Collect a checkpoint (a file job block by block, so memory holds one block's outcomes)
    into ``output``, with one progress bar and one summary for the whole job; the exit code."""
    import pandas as pd

    from ._collect import summarize
    from ._progress import Reporter
    from ._stores import job_parts, store_for

    root = store_for(checkpoint)
    parts = _guarded(debug, lambda: job_parts(root))
    listed = set(root.names())  # once: a walk of the whole tree, or a LIST request
    joined = [_joined(root, part, listed) for part in parts]
    total = sum(_rows(root, j) for j in joined if j is not None)
    reporter = Reporter(progress, total=total, desc="collected")
    summary: list[pd.DataFrame] = []  # what the summary needs of each block, not its outputs
    with _Sink(output) as sink:

        def keep(partial: Any) -> str:
            sink.write(partial)
            return f" (what was collected so far is in {sink.partial}; collect again to finish)"

        try:
            for part, block in zip(parts, joined, strict=True):
                result = _guarded(
                    debug,
                    functools.partial(
                        _collect_part,
                        root,
                        part,
                        block,
                        reporter,
                        flatten,
                        deadline,
                        api_key,
                        base_url,
                        org_id,
                    ),
                    keep,
                )
                sink.write(result)
                summary.append(result[[c for c in _SUMMARY_COLUMNS if c in result.columns]])
        finally:
            reporter.close()
    collected = pd.concat(summary)
    click.echo(repr(summarize(collected)), err=True)
    _report(output=str(output))
    _report_outcomes(collected)
    return 0 if _all_done(collected["runflow_status"]) else EXIT_FAILED_ROWS


def _report_outcomes(collected: Any) -> None:
    from ._collect import summarize

    done = summarize(collected)
    _report(
        rows=done.rows,
        outcomes=done.by_status,
        total_cost=str(done.total_cost),
        failures_by_code=done.failures_by_code,
    )


_SUMMARY_COLUMNS = ("runflow_status", "runflow_cost", "runflow_failure_code")


def _joined(root: Store, part: Store, listed: set[str]) -> str | None:
    """A file job's block's joined result (the input columns and the handles, the layout
    `submit -o` writes), when ``listed`` has it: what its outcomes are joined onto. None:
    collect the checkpoint."""
    if part is root:
        return None
    joined = f"{part.url.rsplit('/', 1)[-1]}.parquet"
    return joined if joined in listed else None


def _rows(root: Store, name: str) -> int:
    import pyarrow.parquet as pq

    from ._stores import opened

    with opened(root, name) as handle:
        return int(pq.read_metadata(handle).num_rows)


def _collect_part(
    root: Store,
    part: Store,
    joined: str | None,
    reporter: Reporter,
    flatten: bool,
    deadline: float | None,
    api_key: str | None,
    base_url: str | None,
    org_id: str | None,
) -> Any:
    import pyarrow.parquet as pq

    from ._collect import collect as collect_outcomes
    from ._stores import opened

    # One block in memory at a time.
    frame = None
    if joined is not None:
        with opened(root, joined) as handle:
            frame = pq.read_table(handle).to_pandas()
    return collect_outcomes(
        part.location() if frame is None else frame,
        checkpoint=None if frame is None else part.location(),
        flatten=flatten,
        deadline=deadline,
        progress=reporter.part(),
        api_key=api_key,
        base_url=base_url,
        org_id=org_id,
    )


def _all_done(statuses: Any) -> bool:
    return bool(statuses.isin(["succeeded", "partial_succeeded"]).all())


@main.command()
@click.option("--rows", type=click.IntRange(1), default=250, show_default=True)
def demo(rows: int) -> None:
    """Run a small job on the embedded emulator and print the joined frame."""
    import pandas as pd

    from ._api import run_batches
    from .emulator import Emulator
    from .emulator._serve import serve

    emulator = Emulator()
    df = pd.DataFrame(
        {"text": [f"row number {i}" for i in range(rows)]},
        index=pd.Index([f"row-{i:05d}" for i in range(rows)], name="row"),
    )
    with serve(emulator) as base_url:
        click.echo(f"emulator serving Runflow's batch API at {base_url}")
        click.echo(f"submitting {rows} rows to acme/uppercase in chunks of 100, 8 at a time...")
        started = time.perf_counter()
        out = run_batches(
            df, "acme", "uppercase", base_url=base_url, api_key=DEMO_KEY, wait=True, progress=False
        )
        elapsed = time.perf_counter() - started
    seen = emulator.accounting()
    shown = pd.DataFrame(
        {
            "text": out["text"],
            "run id (end)": "..." + out["runflow_run_id"].str.slice(-12),
            "status": out["runflow_status"],
            "output text": [o.get("text") for o in out["runflow_output"]],
        }
    )
    with pd.option_context("display.width", 100, "display.max_rows", 10):
        click.echo(shown)
    runs = sum(seen.runs_by_client_ref.values())
    click.echo(
        f"\n{len(out)} rows -> {out['runflow_batch_id'].nunique()} batches, "
        f"{out['runflow_run_id'].nunique()} runs, submitted and collected in {elapsed:.2f} s;\n"
        f"the emulator created {seen.batches_created} batches, {runs} runs, "
        f"duplicates: {len(seen.duplicate_refs())}"
    )


@main.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="address to listen on; loopback only (localhost, 127.x, ::1) without --allow-remote",
)
@click.option(
    "--allow-remote",
    is_flag=True,
    help="serve a --host other machines can reach, although the emulator's internal "
    "/_emulator/ routes have no access control",
)
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--queued", type=float, default=0.05, show_default=True, help="seconds queued")
@click.option("--running", type=float, default=0.2, show_default=True, help="seconds running")
@click.option("--latency", type=float, default=0.0, help="service time of a create POST")
@click.option("--jitter", type=float, default=0.0, help="lognormal sigma of that service time")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="processes serving the one port, each with its own state: right for create-only "
    "throughput sweeps; a GET, retry or accounting query may land on another worker",
)
@click.option(
    "--faults",
    default="",
    help=(
        "comma-separated name=value, e.g. 'rate_limited=0.05,retry_after=1,reset_after=0.02'. "
        "Limits, combined: rate_limit=20 (token bucket, per second), burst=5 (its size; "
        "1 = strict spacing; default one second's worth), window_limit=100,window=60 "
        "(window_kind=fixed|sliding), concurrency_limit=8; limit_retry_after="
        "none|exact|ceil|date is the Retry-After form of their 429s. "
        "in_flight=done|conflict|wait|process: what a create meets while another with its "
        "Idempotency-Key is processed; hangup=0.1 drops connections mid-processing. "
        "seed=N replays the random faults."
    ),
)
def emulator(
    host: str,
    allow_remote: bool,
    port: int,
    queued: float,
    running: float,
    latency: float,
    jitter: float,
    workers: int,
    faults: str,
) -> None:
    """Serve the local Runflow emulator (any bearer token is accepted).

    It serves loopback only by default: its internal routes (/_emulator/accounting and
    /_emulator/received, which show every input the models got) have no access control,
    and any bearer token is accepted. A --host other machines can reach is refused unless
    --allow-remote is given.
    """
    from .emulator import Emulator, Faults, Timing
    from .emulator._serve import is_loopback, run_forever

    if not (allow_remote or is_loopback(host)):
        raise click.BadParameter(
            f"{host} is not a loopback address, and the emulator's internal /_emulator/ routes "
            "(accounting, every input the models received) have no access control; any bearer "
            "token is accepted too. Serve on 127.0.0.1, or pass --allow-remote to serve on "
            f"{host} anyway.",
            param_hint="--host",
        )
    timing = Timing(queued=queued, running=running, create_latency=latency, latency_sigma=jitter)
    try:
        injected = Faults.parse(faults) if faults else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--faults") from exc
    shown = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL

    def ready(bound: int) -> None:
        click.echo(f"Runflow emulator on http://{shown}:{bound} (any bearer token is accepted)")
        if not is_loopback(host):
            click.echo("warning: its /_emulator/ routes have no access control", err=True)
        if injected is not None:
            click.echo(f"injecting {injected}")
        if workers > 1:
            click.echo(
                f"{workers} workers, each with its own state: a batch, an Idempotency-Key, a "
                "limit and the accounting are per worker",
                err=True,
            )

    try:
        run_forever(
            Emulator(timing=timing, faults=injected),
            host=host,
            port=port,
            on_ready=ready,
            workers=workers,
        )
    except OSError as exc:
        _fail(
            f"cannot serve on {shown}:{port}: {exc.strerror or exc}; try another --port", EXIT_USAGE
        )


def run(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m runflow_frames.cli``."""
    try:
        main.main(args=list(argv) if argv is not None else None, standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(run())
