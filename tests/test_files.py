"""Streaming file jobs: bounded blocks, incremental results, kill and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runflow_frames import CheckpointError, run_batches_file
from runflow_frames.emulator import Emulator, Timing

from .conftest import API_KEY, wait_until

COMPARED = ["id", "text", "n", "runflow_client_ref", "runflow_error"]


def write_source(path: Path, rows: int) -> Path:
    table = pa.table(
        {
            "id": [f"r{i:06d}" for i in range(rows)],
            "text": [f"t{i}" for i in range(rows)],
            "n": np.arange(rows),
        }
    )
    pq.write_table(table, path, row_group_size=3000)
    return path


@pytest.mark.slow
def test_a_file_streams_in_blocks_to_one_output(
    tmp_path: Path, emulator: Emulator, base_url: str
) -> None:
    source = write_source(tmp_path / "in.parquet", 25_000)
    out = tmp_path / "out.parquet"
    counts = run_batches_file(
        source,
        "acme",
        "echo",
        output=out,
        checkpoint=tmp_path / "ckpt",
        key="id",
        block_rows=10_000,
        base_url=base_url,
        api_key=API_KEY,
    )
    assert counts == {"rows": 25_000, "blocks": 3, "blocks_skipped": 0, "failed_rows": 0}
    result = pd.read_parquet(out)
    assert result["id"].tolist() == [f"r{i:06d}" for i in range(25_000)]
    received = {r["client_ref"]: r["run_id"] for r in emulator.received()}
    assert emulator.accounting().runs_by_client_ref == dict.fromkeys(result["id"], 1)
    assert dict(zip(result["id"], result["runflow_run_id"], strict=True)) == received
    # Again: every block is done, nothing is sent.
    again = run_batches_file(
        source,
        "acme",
        "echo",
        output=out,
        checkpoint=tmp_path / "ckpt",
        key="id",
        block_rows=10_000,
        base_url=base_url,
        api_key=API_KEY,
    )
    assert again["blocks_skipped"] == 3
    assert emulator.accounting().batches_created == 250


def test_csv_in_and_out_keyed_by_position(
    tmp_path: Path, emulator: Emulator, base_url: str
) -> None:
    source = tmp_path / "in.csv"
    pd.DataFrame({"text": [f"t{i}" for i in range(2500)]}).to_csv(source, index=False)
    out = tmp_path / "out.csv"
    run_batches_file(
        source,
        "acme",
        "echo",
        output=out,
        checkpoint=tmp_path / "ckpt",
        block_rows=1000,
        base_url=base_url,
        api_key=API_KEY,
    )
    result = pd.read_csv(out)
    assert result["runflow_client_ref"].tolist() == list(range(2500))
    received = {r["client_ref"]: r["input"] for r in emulator.received()}
    assert received["1999"] == {"text": "t1999"}


def test_a_csv_column_whose_type_changes_late_is_settled_before_anything_is_sent(
    tmp_path: Path, emulator: Emulator, base_url: str
) -> None:
    # Integers for 3,000 rows, then text; whole numbers, then a decimal. pyarrow infers from
    # the first block: before, the job failed at row 3,000, after 30 creates were billed, on
    # every re-run. CSV null markers are pandas.read_csv's: the field is missing.
    rows = 3_100
    code = [str(i) for i in range(rows - 100)] + [f"x{i}" for i in range(100)]
    size = ["2"] * (rows - 1) + ["2.5"]
    note = ["NA", "null", "ok"] * (rows // 3) + ["ok"]
    source = tmp_path / "late.csv"
    pad = ["p" * 500] * rows  # 1.5 MB: past pyarrow's first block of 1 MB
    pd.DataFrame({"id": range(rows), "code": code, "size": size, "note": note, "pad": pad}).to_csv(
        source, index=False
    )
    run_batches_file(
        source,
        "acme",
        "echo",
        output=tmp_path / "out.parquet",
        checkpoint=tmp_path / "ckpt",
        key="id",
        columns=["code", "size", "note"],
        block_rows=1000,
        base_url=base_url,
        api_key=API_KEY,
    )
    received = {r["client_ref"]: r["input"] for r in emulator.received()}
    assert len(received) == rows
    assert received["0"] == {"code": "0", "size": 2.0}  # "NA": missing, so omitted
    assert received["3099"] == {"code": "x99", "size": 2.5, "note": "ok"}
    assert received["2"]["note"] == "ok"


def test_a_changed_source_is_refused(tmp_path: Path, emulator: Emulator, base_url: str) -> None:
    source = write_source(tmp_path / "in.parquet", 500)
    options = {
        "output": tmp_path / "o.parquet",
        "checkpoint": tmp_path / "ckpt",
        "base_url": base_url,
        "api_key": API_KEY,
    }
    run_batches_file(source, "acme", "echo", key="id", **options)
    write_source(source, 600)
    with pytest.raises(CheckpointError, match="size"):
        run_batches_file(source, "acme", "echo", key="id", **options)


@pytest.mark.slow
@pytest.mark.parametrize("kept", ["in a directory", "in a bucket"])
def test_a_killed_file_job_resumes_to_the_same_results(
    tmp_path: Path, base_url: str, emulator: Emulator, kept: str, request: pytest.FixtureRequest
) -> None:
    # 120 creates in 3 blocks of 40, 8 at a time, 0.2 s each. Each run is killed once the
    # emulator has seen 30 more creates, so the kills land in block 1, 2 and 3 with requests in
    # flight, and even the last one has 30 creates (0.75 s) of work left: no machine load
    # makes a kill land before the job started or after it ended.
    emulator.timing = Timing(create_latency=0.2)
    source = write_source(tmp_path / "in.parquet", 12_000)
    out = tmp_path / "out.parquet"
    ckpt = str(tmp_path / "ckpt")
    if kept == "in a bucket":  # workers that share nothing but object storage
        ckpt = f"{request.getfixturevalue('bucket')}/ckpt"
    env = {**os.environ, "RUNFLOW_API_KEY": API_KEY}
    cmd = [
        sys.executable,
        str(Path(__file__).with_name("file_job.py")),
        base_url,
        str(source),
        str(out),
        ckpt,
        "4000",
        "0.2",  # a killed run's lease on a bucket checkpoint expires before the next run
    ]
    for _ in range(3):
        created = emulator.accounting().batches_created
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"READY\n"
        wait_until(
            lambda start=created: emulator.accounting().batches_created >= start + 30,
            "30 more creates",
        )
        assert proc.poll() is None, "the job ended before its kill"
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
    emulator.timing = Timing()
    done = subprocess.run(cmd, capture_output=True, env=env, timeout=120, check=True)
    assert b"DONE" in done.stdout
    resumed = pd.read_parquet(out)

    # An uninterrupted run of the same file, elsewhere, gives the same rows and columns.
    straight = run_batches_file(
        source,
        "acme",
        "echo",
        output=tmp_path / "straight.parquet",
        checkpoint=tmp_path / "ckpt2",
        key="id",
        block_rows=4000,
        base_url=base_url,
        api_key=API_KEY,
    )
    assert straight["rows"] == 12_000
    expected = pd.read_parquet(tmp_path / "straight.parquet")
    pd.testing.assert_frame_equal(resumed[COMPARED], expected[COMPARED])
    assert list(resumed.columns) == list(expected.columns)
    # The killed-and-resumed job made each run exactly once: its ids are the server's.
    ours = set(resumed["runflow_batch_id"])
    first = {r["client_ref"]: r["run_id"] for r in emulator.received() if r["batch_id"] in ours}
    assert dict(zip(resumed["id"], resumed["runflow_run_id"], strict=True)) == first
    counts = emulator.accounting().runs_by_client_ref
    assert set(counts.values()) == {2}  # once for the resumed job, once for the straight run


def test_a_csv_job_reports_progress_against_the_files_row_count_from_the_start(
    tmp_path: Path, emulator: Emulator, base_url: str
) -> None:
    source = tmp_path / "in.csv"
    pd.DataFrame({"text": [f"t{i}" for i in range(2500)]}).to_csv(source, index=False)
    seen: list[tuple[int, int]] = []
    options = {
        "output": tmp_path / "out.parquet",
        "checkpoint": tmp_path / "ckpt",
        "block_rows": 1000,
        "base_url": base_url,
        "api_key": API_KEY,
    }
    run_batches_file(source, "acme", "echo", progress=lambda d, t: seen.append((d, t)), **options)
    assert seen[0][1] == 2500  # the total, known before the first block is sent
    assert {t for _, t in seen} == {2500}
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1][0] == 2500
    # Finished: a re-run reports no progress (nothing is sent; no burst of "speed").
    seen.clear()
    run_batches_file(source, "acme", "echo", progress=lambda d, t: seen.append((d, t)), **options)
    assert seen == []


def test_a_job_refused_before_sending_anything_does_not_hold_its_checkpoint(
    tmp_path: Path, emulator: Emulator, base_url: str
) -> None:
    from runflow_frames import InputError, SubmissionError

    source = tmp_path / "in.csv"
    pd.DataFrame({"id": ["a", "b", "b"], "text": ["x", "y", "z"]}).to_csv(source, index=False)
    options = {
        "output": tmp_path / "out.parquet",
        "checkpoint": tmp_path / "ckpt",
        "base_url": base_url,
        "api_key": API_KEY,
        "errors": "raise",
    }
    with pytest.raises(InputError, match="not unique"):
        run_batches_file(source, "acme/echo", key="id", **options)
    with pytest.raises(SubmissionError):  # a mistyped model: refused by the server
        run_batches_file(source, "acme/ehco", **options)
    # Fixed (the file, the model): the same checkpoint takes the job; nothing was sent before.
    pd.DataFrame({"id": ["a", "b", "c"], "text": ["x", "y", "z"]}).to_csv(source, index=False)
    run_batches_file(source, "acme/echo", key="id", **options)
    assert emulator.accounting().runs_by_client_ref == {"a": 1, "b": 1, "c": 1}
