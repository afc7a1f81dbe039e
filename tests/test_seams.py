"""Where the faces meet a checkpoint: the same checkpoint met with another flag, another face,
another server. Each either resumes with zero duplicate runs or is refused before any request;
counted on the server (the emulator's own accounting), over real HTTP."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from runflow_frames import (
    CheckpointError,
    CollectError,
    RetryPolicy,
    SubmissionError,
    collect,
    run_batches,
    run_batches_file,
)
from runflow_frames.emulator import Emulator, Faults, Timing, serve

from .conftest import API_KEY

SCRIPT = str(Path(sys.executable).with_name("runflow-frames"))
FAST = Timing(queued=0.01, running=0.02)
FAST_POLL = (0.02, 0.1)


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RUNFLOW_")}
    environment |= {"RUNFLOW_API_KEY": API_KEY, **env}
    return subprocess.run(
        [SCRIPT, *args],
        capture_output=True,
        text=True,
        env=environment,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )


@pytest.fixture
def source(tmp_path: Path) -> Path:
    df = pd.DataFrame({"id": [f"r{i:04d}" for i in range(500)], "text": ["hello"] * 500})
    path = tmp_path / "in.csv"
    df.to_csv(path, index=False)
    return path


def assert_each_row_ran_once(emulator: Emulator, rows: int = 500) -> None:
    runs = emulator.accounting().runs_by_client_ref
    assert len(runs) == rows
    assert set(runs.values()) == {1}, "a row was billed twice"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("first", "second"), [((), ("--wait",)), (("--wait",), ()), (("--wait",), ("--wait",))]
)
def test_cli_submit_with_and_without_wait_is_one_job(
    tmp_path: Path, source: Path, first: tuple[str, ...], second: tuple[str, ...]
) -> None:
    emulator = Emulator(timing=FAST)
    ckpt = tmp_path / "ck"
    with serve(emulator) as url:
        for n, flags in enumerate((first, second)):
            done = cli(
                "submit", str(source), "-m", "acme/uppercase", "--key", "id",
                "-o", str(tmp_path / f"out{n}.parquet"), "--checkpoint", str(ckpt),
                "--base-url", url, *flags,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
    assert_each_row_ran_once(emulator)
    # Every pair has a --wait: that run's output has every outcome.
    waited = pd.read_parquet(tmp_path / f"out{1 if '--wait' in second else 0}.parquet")
    assert (waited["runflow_status"] == "succeeded").sum() == 500


def test_a_frame_job_and_a_file_job_refuse_each_others_checkpoints(
    tmp_path: Path, source: Path
) -> None:
    emulator = Emulator(timing=FAST)
    frame_ck, file_ck = tmp_path / "frame", tmp_path / "file"
    df = pd.read_csv(source).set_index("id")
    with serve(emulator) as url:
        options = {"api_key": API_KEY, "base_url": url}
        run_batches(df, "acme", "uppercase", checkpoint=frame_ck, **options)
        run_batches_file(
            source, "acme", "uppercase", key="id", output=tmp_path / "o.parquet",
            checkpoint=file_ck, **options,
        )  # fmt: skip
        before = emulator.accounting().requests_by_route
        with pytest.raises(CheckpointError, match="holds a file job"):
            run_batches(df, "acme", "uppercase", checkpoint=file_ck, **options)
        with pytest.raises(CheckpointError, match="holds a frame job"):
            run_batches_file(
                source, "acme", "uppercase", key="id", output=tmp_path / "p.parquet",
                checkpoint=frame_ck, **options,
            )  # fmt: skip
        with pytest.raises(CheckpointError, match="one block of a file job"):
            run_batches(df, "acme", "uppercase", checkpoint=file_ck / "block-000000", **options)
        assert emulator.accounting().requests_by_route == before  # nothing was sent
    runs = emulator.accounting().runs_by_client_ref
    assert set(runs.values()) == {2}  # once per job: two jobs, no third


@pytest.mark.slow
def test_a_file_job_records_its_server_and_refuses_another(tmp_path: Path, source: Path) -> None:
    first, other = Emulator(timing=FAST), Emulator(timing=FAST)
    ckpt = tmp_path / "ck"
    with serve(first) as url, serve(other) as other_url:
        run_batches_file(
            source, "acme", "echo", key="id", output=tmp_path / "o.parquet", checkpoint=ckpt,
            api_key=API_KEY, base_url=url,
        )  # fmt: skip
        done = cli(
            "submit", str(source), "-m", "acme/echo", "--key", "id", "-o",
            str(tmp_path / "p.parquet"), "--checkpoint", str(ckpt), "--base-url", other_url,
        )  # fmt: skip
    assert done.returncode == 3, done.stderr  # refused before sending
    assert "base_url" in done.stderr
    assert other.accounting().requests_by_route == {}
    assert_each_row_ran_once(first)


def test_collect_sends_the_key_only_to_the_configured_server(tmp_path: Path) -> None:
    emulator, elsewhere = Emulator(timing=FAST), Emulator(timing=FAST)
    df = pd.DataFrame({"text": ["a"] * 50})
    with serve(emulator) as url, serve(elsewhere) as other_url:
        run_batches(df, "acme", "echo", checkpoint=tmp_path, api_key=API_KEY, base_url=url)
        # A checkpoint names its server; the configured one (here another) wins, or refuses.
        with pytest.raises(CheckpointError, match="configured for") as info:
            collect(tmp_path, api_key=API_KEY, base_url=other_url, poll_interval=FAST_POLL)
        assert url in str(info.value)  # it says how to point at it
        with pytest.raises(CheckpointError, match="configured for"):
            collect(tmp_path, api_key=API_KEY, poll_interval=FAST_POLL)  # the default server
        assert elsewhere.accounting().requests_by_route == {}
        done = collect(tmp_path, api_key=API_KEY, base_url=url, poll_interval=FAST_POLL)
    assert (done["runflow_status"] == "succeeded").all()


def test_a_file_job_block_with_pending_rows_is_resumed_not_skipped(
    tmp_path: Path, source: Path
) -> None:
    # Answers lost after the server made the batches: those rows are pending, not done.
    emulator = Emulator(timing=FAST, faults=Faults(reset_after=0.4, seed=3))
    options = {
        "key": "id", "output": tmp_path / "o.parquet", "checkpoint": tmp_path / "ck",
        "api_key": API_KEY, "block_rows": 200, "chunk_size": 20,
        "retry": RetryPolicy(attempts=1),
    }  # fmt: skip
    with serve(emulator) as url:
        first = run_batches_file(source, "acme", "echo", base_url=url, **options)
        assert first["failed_rows"] > 0
        emulator.faults = None
        again = run_batches_file(source, "acme", "echo", base_url=url, **options)
        assert again["failed_rows"] == 0
        assert again["blocks_skipped"] < again["blocks"]  # the faulty blocks ran again
        third = run_batches_file(source, "acme", "echo", base_url=url, **options)
    assert third["blocks_skipped"] == third["blocks"] == 3
    assert emulator.accounting().idempotent_replays > 0  # pending chunks were re-sent as is
    assert_each_row_ran_once(emulator)
    out = pd.read_parquet(tmp_path / "o.parquet")
    received = {r["client_ref"]: r["run_id"] for r in emulator.received()}
    assert dict(zip(out["id"], out["runflow_run_id"], strict=True)) == received


def test_a_failed_collect_keeps_every_handle() -> None:
    emulator = Emulator(timing=Timing(queued=30, running=30))
    df = pd.DataFrame({"text": ["a"] * 150})
    with serve(emulator) as url:
        out = run_batches(df, "acme", "echo", api_key=API_KEY, base_url=url)
        emulator.faults = Faults(server_error=1.0, routes="all")  # every poll fails now
        with pytest.raises(CollectError, match="The runs exist") as info:
            collect(out, api_key=API_KEY, base_url=url, retry=RetryPolicy(attempts=2, wait_max=0))
    result = info.value.result
    received = {r["client_ref"]: r["run_id"] for r in emulator.received()}
    assert dict(zip(result["runflow_client_ref"], result["runflow_run_id"], strict=True)) == (
        received
    )


def test_a_failed_wait_without_a_checkpoint_hands_back_the_submitted_handles() -> None:
    emulator = Emulator(timing=Timing(queued=30, running=30))
    df = pd.DataFrame({"text": ["a"] * 150})

    def server_breaks_once_all_is_sent(done: int, total: int) -> None:
        if done == total:
            emulator.faults = Faults(server_error=1.0, routes="all")

    with serve(emulator) as url, pytest.raises(CollectError) as info:
        run_batches(
            df,
            "acme",
            "echo",
            api_key=API_KEY,
            base_url=url,
            wait=True,
            retry=RetryPolicy(attempts=2, wait_max=0),
            progress=server_breaks_once_all_is_sent,
        )
    assert info.value.result["runflow_run_id"].notna().sum() == 150
    assert sum(emulator.accounting().runs_by_client_ref.values()) == 150


@pytest.mark.slow
def test_the_cli_without_a_checkpoint_writes_what_it_has_on_a_402(
    tmp_path: Path, source: Path
) -> None:
    emulator = Emulator(timing=FAST, credit=250)
    out = tmp_path / "out.parquet"
    with serve(emulator) as url:
        done = cli(
            "submit", str(source), "-m", "acme/echo", "--key", "id", "-o", str(out),
            "--base-url", url, "--concurrency", "1",
        )  # fmt: skip
    assert done.returncode == 4, done.stderr  # the API refused the credit
    assert str(out) in done.stderr
    written = pd.read_parquet(out)
    handled = written.dropna(subset=["runflow_run_id"])
    received = {r["client_ref"]: r["run_id"] for r in emulator.received()}
    assert len(received) == 200
    assert dict(zip(handled["id"], handled["runflow_run_id"], strict=True)) == received


def test_checkpoints_are_private_to_their_owner(tmp_path: Path) -> None:
    emulator = Emulator(timing=FAST)
    ckpt = tmp_path / "ck"
    with serve(emulator) as url:
        out = run_batches(
            pd.DataFrame({"text": ["a"] * 120}), "acme", "echo", checkpoint=ckpt,
            api_key=API_KEY, base_url=url, callback_url="https://hooks.example/cb?token=s3cret",
        )  # fmt: skip
        collect(out, checkpoint=ckpt, api_key=API_KEY, base_url=url, poll_interval=FAST_POLL)
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o700
    files = [p for p in ckpt.rglob("*") if p.is_file()]
    assert {p.name.split("-")[0] for p in files} >= {"manifest.json", "segment", "results"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_refused_job_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    emulator = Emulator(timing=FAST)
    df = pd.DataFrame({"text": ["a"] * 50})
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with serve(emulator) as url:
        with pytest.raises(CheckpointError, match="not a runflow-frames checkpoint"):
            run_batches(df, "acme", "echo", checkpoint=tmp_path, api_key=API_KEY, base_url=url)
        run_batches(df, "acme", "echo", checkpoint=tmp_path / "ck", api_key=API_KEY, base_url=url)
        with pytest.raises(CheckpointError, match=r"changed: model"):
            run_batches(
                df, "acme", "uppercase", checkpoint=tmp_path / "ck", api_key=API_KEY, base_url=url
            )
    assert emulator.accounting().batches_created == 1


def test_a_job_stopped_part_way_carries_its_handles_with_a_checkpoint(tmp_path: Path) -> None:
    emulator = Emulator(timing=FAST, credit=250)
    df = pd.DataFrame({"text": ["a"] * 500})
    with (
        serve(emulator) as url,
        pytest.raises(SubmissionError, match="re-run the same call") as info,
    ):
        run_batches(
            df, "acme", "echo", checkpoint=tmp_path, api_key=API_KEY, base_url=url,
            max_concurrency=1,
        )  # fmt: skip
    assert info.value.result["runflow_run_id"].notna().sum() == 200


@pytest.mark.slow
def test_ctrl_c_hands_back_every_handle(tmp_path: Path) -> None:
    emulator = Emulator(timing=Timing(create_latency=0.2))
    code = (
        "import sys, pandas as pd, runflow_frames as rf\n"
        "def progress(done, total):\n"
        "    if done >= 300:\n"
        "        print('SENT', flush=True)\n"
        "try:\n"
        "    rf.run_batches(pd.DataFrame({'text': ['a'] * 4000}), 'acme', 'echo',\n"
        "                   base_url=sys.argv[1], max_concurrency=2, progress=progress)\n"
        "except rf.JobInterrupted as exc:\n"
        "    exc.result.to_parquet(sys.argv[2])\n"
        "    print('INTERRUPTED', flush=True)\n"
    )
    out = tmp_path / "partial.parquet"
    with serve(emulator) as url:
        env = {**os.environ, "RUNFLOW_API_KEY": API_KEY}
        child = subprocess.Popen(
            [sys.executable, "-c", code, url, str(out)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "SENT"
        child.send_signal(2)  # SIGINT, as Ctrl-C sends
        rest, _ = child.communicate(timeout=60)
    assert "INTERRUPTED" in rest
    partial = pd.read_parquet(out).dropna(subset=["runflow_run_id"])
    received = {r["client_ref"]: r["run_id"] for r in emulator.received()}
    assert 300 <= len(partial) < 4000
    # Every handle it kept is the server's; at most the requests in flight had no answer yet.
    assert all(
        received[ref] == run
        for ref, run in zip(partial["runflow_client_ref"], partial["runflow_run_id"], strict=True)
    )
    assert len(received) - len(partial) <= 2 * 100


def test_a_file_jobs_checkpoint_reads_and_collects_like_a_frame_jobs(
    tmp_path: Path, source: Path
) -> None:
    from runflow_frames import read_checkpoint

    emulator = Emulator(timing=FAST)
    ckpt = tmp_path / "ck"
    with serve(emulator) as url:
        run_batches_file(
            source, "acme", "echo", key="id", output=tmp_path / "o.parquet", checkpoint=ckpt,
            api_key=API_KEY, base_url=url, block_rows=200,
        )  # fmt: skip
        recorded = read_checkpoint(ckpt)
        done = collect(ckpt, api_key=API_KEY, base_url=url, poll_interval=FAST_POLL)
    assert recorded.attrs["progress"]["kind"] == "file"
    assert recorded.attrs["progress"]["rows_submitted"] == 500
    assert sorted(done.index) == sorted(pd.read_csv(source)["id"])
    assert (done["runflow_status"] == "succeeded").all()
    received = {r["client_ref"]: r["run_id"] for r in emulator.received()}
    assert done["runflow_run_id"].to_dict() == received
