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

from .conftest import API_KEY, SCRIPT, cli, interruptible, wait_until

FAST = Timing(queued=0.01, running=0.02)
FAST_POLL = (0.02, 0.1)


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
            preexec_fn=interruptible,
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


# -- what a review found ------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_in_the_cli_without_a_checkpoint_warns_that_a_rerun_sends_everything(
    tmp_path: Path,
) -> None:
    df = pd.DataFrame({"id": [f"r{i:04d}" for i in range(3000)], "text": ["a"] * 3000})
    df.to_csv(tmp_path / "in.csv", index=False)
    out = tmp_path / "out.parquet"
    emulator = Emulator(timing=Timing(create_latency=0.2))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNFLOW_")}
    env["RUNFLOW_API_KEY"] = API_KEY
    with serve(emulator) as url:
        child = subprocess.Popen(
            [SCRIPT, "submit", str(tmp_path / "in.csv"), "-m", "acme/echo", "--key", "id",
             "-o", str(out), "--base-url", url, "--concurrency", "2"],
            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=interruptible,
        )  # fmt: skip
        wait_until(lambda: emulator.accounting().batches_created >= 4, "4 creates")
        child.send_signal(2)  # SIGINT, as Ctrl-C sends
        _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert "re-running sends every row again" in err
    assert "re-run the same command to resume" not in err
    written = pd.read_parquet(out).dropna(subset=["runflow_run_id"])
    received = {r["client_ref"]: r["run_id"] for r in emulator.received()}
    assert dict(zip(written["id"], written["runflow_run_id"], strict=True)).items() <= (
        received.items()
    )


def test_a_checkpoint_that_cannot_be_closed_still_hands_back_every_handle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runflow_frames import _journal

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    emulator = Emulator(timing=FAST)
    df = pd.DataFrame({"text": ["a"] * 300})
    monkeypatch.setattr(_journal.pq, "write_table", disk_full)  # the segment written at close
    with serve(emulator) as url:
        options = {"checkpoint": tmp_path, "api_key": API_KEY, "base_url": url}
        with pytest.raises(SubmissionError, match="closing it failed") as info:
            run_batches(df, "acme", "echo", **options)
        monkeypatch.undo()
        again = run_batches(df, "acme", "echo", **options)  # the journal kept every answer
    assert isinstance(info.value.__cause__, CheckpointError)
    received = {r["client_ref"]: r["run_id"] for r in emulator.received()}
    result = info.value.result
    assert dict(zip(result["runflow_client_ref"], result["runflow_run_id"], strict=True)) == (
        received
    )
    assert_each_row_ran_once(emulator, 300)  # nothing was sent again
    assert again["runflow_run_id"].tolist() == result["runflow_run_id"].tolist()


def test_a_progress_callback_that_raises_releases_the_checkpoint(tmp_path: Path) -> None:
    emulator = Emulator(timing=FAST)
    df = pd.DataFrame({"text": ["a"] * 200})

    def broken(done: int, total: int) -> None:
        raise RuntimeError("the user's progress callback failed")

    with serve(emulator) as url:
        options = {"checkpoint": tmp_path, "api_key": API_KEY, "base_url": url}
        run_batches(df.iloc[:100], "acme", "echo", **options)
        with pytest.raises(RuntimeError, match="progress callback"):
            run_batches(df, "acme", "echo", progress=broken, **options)
        out = run_batches(df, "acme", "echo", **options)  # not "in use by another running job"
    assert out["runflow_run_id"].notna().all()
    assert_each_row_ran_once(emulator, 200)


@pytest.mark.slow
def test_a_failed_wait_in_the_cli_leaves_the_submitted_output_whole(
    tmp_path: Path, source: Path
) -> None:
    emulator = Emulator(timing=Timing(queued=30, running=30))
    out, ckpt = tmp_path / "out.parquet", tmp_path / "ck"
    command = ["submit", str(source), "-m", "acme/echo", "--key", "id", "-o", str(out)]
    command += ["--checkpoint", str(ckpt)]
    with serve(emulator) as url:
        assert cli(*command, "--base-url", url).returncode == 0
        # Every poll is refused now (a 4xx: no retries to wait through).
        emulator.faults = Faults(rejected=1.0, routes="all")
        waited = cli(*command, "--base-url", url, "--wait")
    assert waited.returncode == 5, waited.stderr  # the API failed the wait, said in one line
    assert "waiting for the runs stopped" in waited.stderr
    assert ".result" not in waited.stderr  # advice for the CLI, not for Python
    assert pd.read_parquet(out)["runflow_run_id"].notna().sum() == 500  # not shrunk
    assert_each_row_ran_once(emulator)


@pytest.mark.slow
def test_collecting_a_file_job_that_never_started_a_block_says_so(
    tmp_path: Path, source: Path
) -> None:
    emulator = Emulator(timing=FAST)
    doubled = tmp_path / "doubled.csv"
    pd.concat([pd.read_csv(source)] * 2).to_csv(doubled, index=False)  # repeated keys
    ckpt = tmp_path / "ck"
    with serve(emulator) as url:
        submitted = cli(
            "submit", str(doubled), "-m", "acme/echo", "--key", "id", "-o",
            str(tmp_path / "o.parquet"), "--checkpoint", str(ckpt), "--base-url", url,
        )  # fmt: skip
        assert submitted.returncode == 3, submitted.stderr  # refused before sending
        collected = cli(
            "collect", str(ckpt), "-o", str(tmp_path / "c.parquet"), RUNFLOW_BASE_URL=url
        )
        with pytest.raises(CheckpointError, match="never started a block"):
            collect(ckpt, api_key=API_KEY, base_url=url)
    assert collected.returncode == 3, collected.stderr
    assert "never started a block" in collected.stderr
    assert emulator.accounting().requests_by_route == {}


def test_a_malformed_create_answer_never_carries_the_key_into_a_message() -> None:
    import httpx

    def proxy(request: httpx.Request) -> httpx.Response:
        echoed = request.headers["Authorization"]  # a proxy that echoes what it was sent
        return httpx.Response(201, json={"id": f"echo {echoed}", "items": None})

    df = pd.DataFrame({"text": ["a", "b"]})
    with pytest.raises(SubmissionError) as info:
        run_batches(
            df, "acme", "echo", api_key=API_KEY, base_url="https://api.example",
            transport=httpx.MockTransport(proxy), retry=RetryPolicy(attempts=1),
        )  # fmt: skip
    shown = [str(info.value), repr(info.value.__cause__), *info.value.result["runflow_error"]]
    assert all(API_KEY not in text for text in shown)
    assert "[redacted]" in str(info.value.__cause__)


@pytest.mark.slow
def test_a_file_jobs_checkpoint_across_csv_nulls_json_and_the_python_face(
    tmp_path: Path, source: Path
) -> None:
    """The flags this round added, on an existing checkpoint: another --csv-nulls is another
    reading of the file, refused before any request; --json, --wait and the Python face on the
    same job send nothing twice."""
    emulator = Emulator(timing=FAST)
    ckpt, out = tmp_path / "ck", tmp_path / "out.parquet"
    base = ["-m", "acme/uppercase", "--key", "id", "-o", str(out), "--checkpoint", str(ckpt)]
    with serve(emulator) as url:
        first = cli("submit", str(source), *base, "--base-url", url, "--json")
        assert first.returncode == 0, first.stderr
        before = emulator.accounting().requests_by_route
        other = cli("submit", str(source), *base, "--base-url", url, "--csv-nulls", "")
        assert other.returncode == 3
        assert "csv_nulls" in other.stderr
        assert emulator.accounting().requests_by_route == before  # refused before any request
        again = cli("submit", str(source), *base, "--base-url", url, "--wait", "--json")
        assert again.returncode == 0, again.stderr
        counts = run_batches_file(
            source, "acme/uppercase", output=out, checkpoint=ckpt, key="id", base_url=url,
            api_key=API_KEY, progress=False,
        )  # fmt: skip
        assert counts["blocks_skipped"] == counts["blocks"] == 1
    assert_each_row_ran_once(emulator)


def test_a_grown_frame_resumed_with_wait_sends_each_new_row_once_as_it_is(
    tmp_path: Path,
) -> None:
    """Rows are encoded as they are sent: a checkpoint of every row but each third, grown to the
    whole frame and re-run with ``wait=True``, sends the 8,000 missing rows (not one run, more
    than the group encoded before the first request) once each, with their own values; collect
    on the checkpoint then sends nothing."""
    emulator = Emulator(timing=FAST)
    df = pd.DataFrame(
        {"text": [f"t{i}" for i in range(24_000)], "n": range(24_000)},
        index=pd.Index([f"k{i:05d}" for i in range(24_000)], name="key"),
    )
    ckpt = tmp_path / "ck"
    with serve(emulator) as url:
        options = {"checkpoint": ckpt, "api_key": API_KEY, "base_url": url}
        run_batches(df[df["n"] % 3 != 0], "acme", "echo", **options)
        assert emulator.accounting().batches_created == 160
        out = run_batches(df, "acme", "echo", wait=True, **options)
        assert emulator.accounting().batches_created == 240
        collected = collect(ckpt, api_key=API_KEY, base_url=url, poll_interval=FAST_POLL)
        assert emulator.accounting().batches_created == 240
    assert_each_row_ran_once(emulator, rows=24_000)
    received = {r["client_ref"]: r["input"] for r in emulator.received()}
    for key, text, n in zip(df.index, df["text"], df["n"], strict=True):
        assert received[key] == {"text": text, "n": n}
    assert out["runflow_status"].eq("succeeded").all()
    # collect on a checkpoint knows no frame: its rows come in the order they were recorded
    by_ref = dict(zip(collected["runflow_client_ref"], collected["runflow_run_id"], strict=True))
    assert by_ref == dict(zip(out["runflow_client_ref"], out["runflow_run_id"], strict=True))
