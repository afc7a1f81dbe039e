"""The runflow-frames command, through its real entry point (a subprocess), against the emulator."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

from runflow_frames.emulator import Emulator

from .conftest import API_KEY, cli


@pytest.fixture
def source(tmp_path: Path) -> Path:
    text = [f"row {i}" if i % 9 else None for i in range(450)]
    df = pd.DataFrame(
        {"id": [f"r{i:04d}" for i in range(450)], "text": text, "repeat": np.arange(450) % 3 + 1}
    )
    path = tmp_path / "in.csv"
    df.to_csv(path, index=False)
    return path


@pytest.mark.slow
def test_submit_then_status_then_collect(
    tmp_path: Path, source: Path, base_url: str, emulator: Emulator
) -> None:
    out, ckpt = tmp_path / "out.parquet", tmp_path / "ckpt"
    done = cli(
        "submit",
        str(source),
        "-m",
        "acme/uppercase",
        "--key",
        "id",
        "-o",
        str(out),
        "--checkpoint",
        str(ckpt),
        "--base-url",
        base_url,
    )
    assert done.returncode == 0, done.stderr
    assert "450 rows" in done.stderr
    submitted = pd.read_parquet(out)
    assert submitted["runflow_run_id"].notna().all()
    assert emulator.accounting().runs_by_client_ref == dict.fromkeys(submitted["id"], 1)

    status = cli("status", str(ckpt))
    assert status.returncode == 0
    assert "submitted        450 rows in 5 chunks" in status.stdout
    assert "collected        nothing yet" in status.stdout

    collected = tmp_path / "collected.csv"
    result = cli("collect", str(ckpt), "-o", str(collected), RUNFLOW_BASE_URL=base_url)
    bad_rows = submitted["text"].isna().sum()
    assert result.returncode == 1  # the rows with no text failed as items
    assert "INPUT_VALIDATION_FAILED" in result.stderr
    table = pd.read_csv(collected)
    assert (table["runflow_status"] == "failed").sum() == bad_rows
    assert (table["runflow_status"] == "succeeded").sum() == 450 - bad_rows
    # The layout `submit -o` writes (the input columns, then the handles), outcomes added.
    assert list(table.columns[:3]) == ["id", "text", "repeat"]
    assert set(submitted.columns) <= set(table.columns)
    assert table["id"].tolist() == submitted["id"].tolist()
    assert table["runflow_run_id"].tolist() == submitted["runflow_run_id"].tolist()
    ok = table[table["runflow_status"] == "succeeded"].iloc[0]
    assert orjson.loads(ok["runflow_output"]) == {"text": str(ok["text"]).upper() * ok["repeat"]}

    # After collect, status counts the outcomes; --json says the same for a program.
    status = cli("status", str(ckpt))
    assert f"collected        450 of 450 rows: {450 - bad_rows} succeeded, {bad_rows} failed" in (
        status.stdout
    )
    as_json = orjson.loads(cli("status", str(ckpt), "--json").stdout)
    assert as_json["rows_submitted"] == 450
    assert as_json["outcomes"] == {"succeeded": 450 - bad_rows, "failed": int(bad_rows)}
    assert as_json["kind"] == "file"


@pytest.mark.slow
def test_dry_run_sends_nothing_and_lists_every_refusal(
    tmp_path: Path, base_url: str, emulator: Emulator
) -> None:
    df = pd.DataFrame({"id": ["a", "b", "b", "c"], "x": [1.0, float("inf"), 2.0, float("-inf")]})
    path = tmp_path / "bad.parquet"
    df.to_parquet(path)
    plan = cli(
        "submit", str(path), "-m", "acme/echo", "--key", "id", "--dry-run", "--base-url", base_url
    )
    assert plan.returncode == 3
    assert "rows         4" in plan.stdout
    assert "not unique" in plan.stdout
    assert "column 'x': 2 row(s)" in plan.stdout
    good = cli(
        "submit",
        str(tmp_path / "bad.parquet"),
        "-m",
        "acme/echo",
        "--columns",
        "id",
        "--dry-run",
        key=None,
    )
    assert good.returncode == 0
    assert "requests     1" in good.stdout
    # A CSV's empty fields and null markers are counted per column.
    csv = tmp_path / "gaps.csv"
    csv.write_text("id,text,n\na,x,1\nb,,2\nc,NA,\nd,y,4\n")
    gaps = cli("submit", str(csv), "-m", "acme/echo", "--key", "id", "--dry-run", key=None)
    assert gaps.returncode == 0
    assert "empty        text 2, n 1 row(s)" in gaps.stdout
    assert emulator.accounting().requests_by_route == {}


@pytest.mark.slow
def test_bad_arguments_exit_2_with_one_line(source: Path) -> None:
    cases = {
        ("-m", "no-slash"): "Invalid value for '--model': give the model as OWNER/SLUG",
        ("-m", "acme/echo", "--chunk-size", "101"): "Invalid value for '--chunk-size'",
        ("-m", "acme/echo", "--metadata", "[1]"): "--metadata",
        ("-m", "acme/echo", "--bogus"): "No such option '--bogus'",
    }
    for args, said in cases.items():
        done = cli("submit", str(source), *args, "-o", "x.parquet")
        assert done.returncode == 2, args
        assert done.stderr.startswith("runflow-frames: error: "), done.stderr
        assert said in done.stderr
        assert done.stderr.endswith("; see 'runflow-frames submit --help'\n"), done.stderr
    unknown = cli("nonsense")
    assert (unknown.returncode, unknown.stderr) == (
        2,
        "runflow-frames: error: No such command 'nonsense'; see 'runflow-frames --help'\n",
    )


def test_a_missing_api_key_is_one_clear_line(source: Path, tmp_path: Path) -> None:
    result = cli(
        "submit", str(source), "-m", "acme/echo", "-o", str(tmp_path / "o.parquet"), key=None
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "runflow-frames: error: no API key: set RUNFLOW_API_KEY (or run in a terminal to be prompted)"
    )


@pytest.mark.slow
def test_errors_are_one_line_with_meaningful_codes(source: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "o.parquet")
    emulator = Emulator(api_keys={"rf_live_the_right_one"})
    from runflow_frames.emulator import serve

    with serve(emulator) as url:
        refused = cli(
            "submit", str(source), "-m", "acme/echo", "--key", "nope", "-o", out, "--base-url", url
        )
        denied = cli("submit", str(source), "-m", "acme/echo", "-o", out, "--base-url", url)
        traced = cli(
            "submit", str(source), "-m", "acme/echo", "-o", out, "--base-url", url, "--debug"
        )
    assert refused.returncode == 3
    assert refused.stderr.count("\n") == 1
    assert "key column 'nope' is not in the frame" in refused.stderr
    assert denied.returncode == 4
    assert denied.stderr.startswith("runflow-frames: error:")
    assert denied.stderr.count("\n") == 1
    assert API_KEY not in denied.stderr
    assert "Traceback" in traced.stderr


@pytest.mark.slow
def test_collect_on_a_file_job_of_several_blocks_says_one_summary(
    tmp_path: Path, base_url: str, emulator: Emulator
) -> None:
    from runflow_frames import run_batches_file

    source = tmp_path / "in.parquet"
    pd.DataFrame({"text": [f"t{i}" for i in range(2500)]}).to_parquet(source)
    ckpt = tmp_path / "ckpt"
    options = {"block_rows": 1000, "base_url": base_url, "api_key": API_KEY, "progress": False}
    run_batches_file(
        source, "acme/uppercase", output=tmp_path / "s.parquet", checkpoint=ckpt, **options
    )
    out = tmp_path / "c.parquet"
    done = cli("collect", str(ckpt), "-o", str(out), "--no-progress", RUNFLOW_BASE_URL=base_url)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("succeeded") == 1  # one summary for the three blocks
    assert "2,500" in done.stderr
    table = pd.read_parquet(out)
    assert table["text"].tolist() == [f"t{i}" for i in range(2500)]
    assert (table["runflow_status"] == "succeeded").all()


@pytest.mark.slow
def test_submit_and_collect_print_one_json_object_with_json(
    tmp_path: Path, source: Path, base_url: str, emulator: Emulator
) -> None:
    out, ckpt = tmp_path / "out.parquet", tmp_path / "ckpt"
    args = ["-m", "acme/uppercase", "--key", "id", "-o", str(out), "--base-url", base_url]
    done = cli("submit", str(source), *args, "--checkpoint", str(ckpt), "--json")
    report = orjson.loads(done.stdout)  # stdout holds the JSON object and nothing else
    assert report["exit_code"] == done.returncode == 0
    assert (report["rows"], report["submitted"], report["failed"]) == (450, 450, 0)
    assert report["checkpoint"] == str(ckpt)
    collected = cli(
        "collect", str(ckpt), "-o", str(tmp_path / "c.csv"), "--json", RUNFLOW_BASE_URL=base_url
    )
    report = orjson.loads(collected.stdout)
    assert report["exit_code"] == collected.returncode == 1  # the rows without text failed
    assert sum(report["outcomes"].values()) == 450
    assert report["failures_by_code"] == {"INPUT_VALIDATION_FAILED": report["outcomes"]["failed"]}
    assert Decimal(report["total_cost"]) > 0
    # An error is in the object too: another model on the same checkpoint.
    other = ["-m", "acme/echo", "--key", "id", "-o", str(out), "--base-url", base_url]
    refused = cli("submit", str(source), *other, "--checkpoint", str(ckpt), "--json")
    report = orjson.loads(refused.stdout)
    assert report["exit_code"] == refused.returncode == 3
    assert "different job" in report["error"]


@pytest.mark.slow
def test_with_or_without_a_checkpoint_submit_writes_one_layout(
    tmp_path: Path, source: Path, base_url: str
) -> None:
    args = ["-m", "acme/echo", "--key", "id", "--base-url", base_url]
    with_ckpt, without = tmp_path / "a.csv", tmp_path / "b.csv"
    cli("submit", str(source), *args, "-o", str(with_ckpt), "--checkpoint", str(tmp_path / "ck"))
    cli("submit", str(source), *args, "-o", str(without))
    first, second = pd.read_csv(with_ckpt), pd.read_csv(without)
    assert list(first.columns) == list(second.columns)  # no stray index column either
    assert list(first.columns[:3]) == ["id", "text", "repeat"]


@pytest.mark.slow
def test_csv_null_markers_default_to_pandas_and_can_be_set_and_every_face_reads_alike(
    tmp_path: Path, base_url: str, emulator: Emulator
) -> None:
    csv = tmp_path / "in.csv"
    csv.write_text("id,name,n\na,NA,1\nb,Nora,\nc,,3\n")
    base = ["-m", "acme/echo", "--key", "id", "--base-url", base_url]
    # Default, with and without a checkpoint: NA and empty fields are missing (omitted); a
    # column of integers with a gap still sends integers.
    cli(
        "submit",
        str(csv),
        *base,
        "-o",
        str(tmp_path / "a.parquet"),
        "--checkpoint",
        str(tmp_path / "k"),
    )
    first = {r["client_ref"]: r["input"] for r in emulator.received()}
    assert first == {"a": {"n": 1}, "b": {"name": "Nora"}, "c": {"n": 3}}
    emulator.faults = None
    plain = cli("submit", str(csv), *base, "-o", str(tmp_path / "b.parquet"))
    assert plain.returncode == 0, plain.stderr
    again = [r for r in emulator.received() if r["client_ref"] == "a"]
    assert [r["input"] for r in again] == [{"n": 1}, {"n": 1}]  # not 1.0: the same reading
    # Empty fields only: "NA" is a name.
    named = cli("submit", str(csv), *base, "-o", str(tmp_path / "c.parquet"), "--csv-nulls", "")
    assert named.returncode == 0, named.stderr
    last = [r for r in emulator.received() if r["client_ref"] == "a"][-1]
    assert last["input"] == {"name": "NA", "n": 1}
