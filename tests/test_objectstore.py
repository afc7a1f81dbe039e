"""Checkpoints on object storage, against a real S3 API on loopback (moto's server): the same
exactly-once guarantee as a directory, with the runs per client_ref counted on the server."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import orjson
import pandas as pd
import pytest

from runflow_frames import CheckpointError, SubmissionError, collect, run_batches
from runflow_frames.emulator import Emulator, Timing, serve

from .conftest import API_KEY, cli, objects, read_object
from .crash_harness import soak

FAST = Timing(queued=0.01, running=0.02)


def frame(rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"text": [f"t{i}" for i in range(rows)]}, index=[f"r{i}" for i in range(rows)]
    )


def runs_once(emulator: Emulator, rows: int) -> None:
    runs = emulator.accounting().runs_by_client_ref
    assert len(runs) == rows
    assert set(runs.values()) == {1}, "a row was billed twice"


def test_a_job_stopped_part_way_resumes_from_the_bucket_without_sending_twice(
    bucket: str,
) -> None:
    ckpt = f"{bucket}/jobs/ck"
    emulator = Emulator(timing=FAST, credit=250)
    df = frame(500)
    with serve(emulator) as url:
        options = {"api_key": API_KEY, "base_url": url, "progress": False}
        with pytest.raises(SubmissionError) as info:
            run_batches(df, "acme/echo", checkpoint=ckpt, max_concurrency=1, **options)
        first = info.value.result["runflow_run_id"].notna().sum()
        assert 0 < first < 500
        emulator.credit = 10_000
        out = run_batches(df, "acme/echo", checkpoint=ckpt, **options)
        again = run_batches(df, "acme/echo", checkpoint=ckpt, **options)  # all done: no POST
    runs_once(emulator, 500)
    received = {r["client_ref"]: r["run_id"] for r in emulator.received()}
    assert dict(zip(out.index, out["runflow_run_id"], strict=True)) == received
    assert again["runflow_run_id"].tolist() == out["runflow_run_id"].tolist()
    # A finished job leaves its manifest, its answered rows and one log that only says which
    # chunk numbers the server refused (never to be reused); no intent, no lease.
    stored = objects(ckpt)
    assert "manifest.json" in stored
    assert "lease.json" not in stored
    assert any(n.startswith("segment-") for n in stored)
    (log,) = [n for n in stored if n.startswith("log/")]
    records = orjson.loads(read_object(f"{ckpt}/{log}"))["r"]
    assert len(records) > 0
    assert {r["t"] for r in records} == {"x"}


def test_another_job_or_a_running_one_is_refused_before_any_request(
    bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runflow_frames import _objectstore

    ckpt = f"{bucket}/ck"
    emulator = Emulator(timing=FAST)
    with serve(emulator) as url:
        options = {"api_key": API_KEY, "base_url": url, "progress": False}
        run_batches(frame(10), "acme/echo", checkpoint=ckpt, **options)
        with pytest.raises(CheckpointError, match="different job; changed: model"):
            run_batches(frame(10), "acme/uppercase", checkpoint=ckpt, **options)
        # A lease another run keeps renewing (here: for an hour) is waited for, then refused.
        monkeypatch.setattr(_objectstore, "LEASE_SECONDS", 0.3)
        live = orjson.dumps({"holder": "another", "expires_at": time.time() + 3600})
        _objectstore.ObjectStore(ckpt).put("lease.json", live)
        with pytest.raises(CheckpointError, match="in use by another running job"):
            run_batches(frame(10), "acme/echo", checkpoint=ckpt, **options)
        # One that runs out while this run waits (a crashed run's) is taken over.
        soon = orjson.dumps({"holder": "crashed", "expires_at": time.time() + 0.1})
        _objectstore.ObjectStore(ckpt).put("lease.json", soon)
        run_batches(frame(12), "acme/echo", checkpoint=ckpt, **options)
    assert emulator.accounting().batches_created == 2
    assert "lease.json" not in objects(ckpt)


def test_an_expired_lease_is_taken_over(bucket: str) -> None:
    import boto3

    ckpt = f"{bucket}/ck"
    name = bucket.removeprefix("s3://")
    # What a crashed run leaves: a lease that ran out.
    body = orjson.dumps({"holder": "crashed", "expires_at": 1.0})
    boto3.client("s3").put_object(Bucket=name, Key="ck/lease.json", Body=body)
    emulator = Emulator(timing=FAST)
    with serve(emulator) as url:
        out = run_batches(
            frame(20), "acme/echo", checkpoint=ckpt, api_key=API_KEY, base_url=url, progress=False
        )
    assert out["runflow_run_id"].notna().all()
    assert "lease.json" not in objects(ckpt)


def test_waiting_for_a_lease_leaves_the_event_loop_free(bucket: str) -> None:
    """An async caller's other tasks go on while the job waits for a crashed run's lease to
    expire (the wait is off the event loop)."""
    import anyio

    from runflow_frames import _objectstore, arun_batches

    ckpt = f"{bucket}/ck"
    soon = orjson.dumps({"holder": "crashed", "expires_at": time.time() + 1.5})
    _objectstore.ObjectStore(ckpt).put("lease.json", soon)
    ticks: list[float] = []

    async def main(url: str) -> pd.DataFrame:
        async with anyio.create_task_group() as tasks:

            async def tick() -> None:
                while True:
                    ticks.append(time.monotonic())
                    await anyio.sleep(0.05)

            tasks.start_soon(tick)
            started = time.monotonic()
            out = await arun_batches(
                frame(10),
                "acme/echo",
                checkpoint=ckpt,
                api_key=API_KEY,
                base_url=url,
                progress=False,
            )
            assert time.monotonic() - started >= 1.0  # it did wait for the lease
            tasks.cancel_scope.cancel()
        return out

    emulator = Emulator(timing=FAST)
    with serve(emulator) as url:
        out = anyio.run(main, url)
    assert out["runflow_run_id"].notna().all()
    runs_once(emulator, 10)
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert max(gaps) < 0.5, f"the event loop stood still for {max(gaps):.2f} s"


def test_wait_and_collect_keep_outcomes_in_the_bucket(bucket: str) -> None:
    ckpt = f"{bucket}/ck"
    emulator = Emulator(timing=FAST)
    with serve(emulator) as url:
        options = {"api_key": API_KEY, "base_url": url, "progress": False}
        done = run_batches(frame(300), "acme/uppercase", checkpoint=ckpt, wait=True, **options)
        polled = emulator.accounting().requests_by_route
        again = collect(ckpt, **options)  # from the checkpoint alone: nothing fetched again
        assert emulator.accounting().requests_by_route == polled
    assert set(done["runflow_status"]) == {"succeeded"}
    assert again.loc["r7", "runflow_output"] == {"text": "T7"}
    assert any(n.startswith("results-") for n in objects(ckpt))
    runs_once(emulator, 300)


@pytest.mark.slow
def test_sigkill_with_the_checkpoint_in_the_bucket_never_duplicates_or_loses_a_row(
    tmp_path: Path, bucket: str
) -> None:
    rows = 8000  # enough work left for 22 kills, however fast the runs between them (5,000 ran
    # out after 19 once resumes got faster)
    result = soak(
        tmp_path,
        rows=rows,
        kills=22,
        seed=20261204,
        latency=0.01,
        concurrency=8,
        max_delay=1.2,
        chunk_size=2,  # 64 chunks to a group: a run goes through several log objects
        checkpoint=f"{bucket}/ck",
        lease_seconds=0.2,  # a killed run's lease is expired by the time the next one starts
    )
    assert len(result.kill_delays) >= 20
    assert result.result is not None
    assert len(result.result) == rows
    assert result.result["runflow_run_id"].notna().all()
    assert result.replays > 0  # kills left unanswered intents; resumes replayed them
    assert result.duplicates == {}
    assert set(result.runs_by_ref) == set(result.result["runflow_client_ref"])
    assert result.mismatches() == []


def test_a_run_whose_lease_was_taken_over_fails_its_next_write_before_sending(
    bucket: str,
) -> None:
    """A run paused past its lease (a frozen VM, a long GC), then back: the run that took over
    wrote first, so the paused one's next group of intents is refused, not recorded."""
    import anyio

    from runflow_frames._items import Items
    from runflow_frames._objectstore import ObjectJournal
    from runflow_frames._rows import Chunk

    ckpt = f"{bucket}/ck"

    def journal() -> ObjectJournal:
        return ObjectJournal.open(ckpt, "frame", {"model": "acme/echo"}, lambda _: "k", 86400)

    def chunk(number: int) -> Chunk:
        return Chunk(number, (number,), (f"r{number}",), b"{}", f"key-{number}")

    refs = [f"r{i}" for i in range(4)]
    items = Items(pd.DataFrame(index=refs), refs, [], "omit")
    paused = journal()
    paused.plan(refs, items)
    anyio.run(paused.intend, [chunk(0)])
    # Its lease runs out while it is paused, and a new run takes the checkpoint over.
    paused.store.put("lease.json", orjson.dumps({"holder": "x", "expires_at": 0}))
    successor = journal()
    resume = successor.plan(refs, items)
    assert [intent.chunk for intent, _ in resume.pending] == [0]  # it saw the paused run's intent
    anyio.run(successor.intend, [chunk(1)])
    with pytest.raises(CheckpointError, match="taken over by another job"):
        anyio.run(paused.intend, [chunk(2)])
    successor.close()


def test_a_file_job_reads_a_bucket_and_writes_to_one(bucket: str, tmp_path: Path) -> None:
    import pyarrow.parquet as pq
    import s3fs

    from runflow_frames import run_batches_file

    fs = s3fs.S3FileSystem()
    df = pd.DataFrame(
        {"id": [f"k{i}" for i in range(2500)], "text": [f"t{i}" for i in range(2500)]}
    )
    with fs.open(f"{bucket}/in/prompts.parquet", "wb") as f:
        df.to_parquet(f, index=False)
    emulator = Emulator(timing=FAST)
    with serve(emulator) as url:

        def job() -> dict[str, int]:
            return run_batches_file(
                f"{bucket}/in/prompts.parquet",
                "acme/echo",
                output=f"{bucket}/out/result.parquet",
                checkpoint=tmp_path / "ck",
                block_rows=1000,
                api_key=API_KEY,
                base_url=url,
                progress=False,
                key="id",
            )

        assert job() == {"rows": 2500, "blocks": 3, "blocks_skipped": 0, "failed_rows": 0}
        # The source changed in the bucket: the same job is refused before any request.
        with fs.open(f"{bucket}/in/prompts.parquet", "wb") as f:
            df.head(10).to_parquet(f, index=False)
        with pytest.raises(CheckpointError, match="changed: source"):
            job()
    with fs.open(f"{bucket}/out/result.parquet", "rb") as f:
        written = pq.read_table(f).to_pandas()
    received = {r["client_ref"]: r["run_id"] for r in emulator.received()}
    assert dict(zip(written["id"], written["runflow_run_id"], strict=True)) == received
    runs_once(emulator, 2500)


def test_a_partitioned_dataset_in_a_bucket_goes_to_a_directory_of_parts(
    bucket: str, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq
    import s3fs

    from runflow_frames import run_batches_file

    fs = s3fs.S3FileSystem()
    for year in (2024, 2025):
        for region in ("eu", "us"):
            part = pd.DataFrame({"text": [f"{year}-{region}-{i}" for i in range(150)]})
            with fs.open(f"{bucket}/data/year={year}/region={region}/p.parquet", "wb") as f:
                part.to_parquet(f, index=False)
    fs.pipe(f"{bucket}/data/_SUCCESS", b"")  # what a dataset writer leaves beside its files
    emulator = Emulator(timing=FAST)
    with serve(emulator) as url:
        counts = run_batches_file(
            f"{bucket}/data/",
            "acme/echo",
            output=f"{bucket}/results/",
            checkpoint=tmp_path / "ck",
            block_rows=250,
            api_key=API_KEY,
            base_url=url,
            progress=False,
        )
    assert counts["rows"] == 600
    assert counts["blocks"] == 3
    parts = sorted(fs.ls(f"{bucket}/results/"))
    assert [p.rsplit("/", 1)[1] for p in parts] == [f"part-{n:06d}.parquet" for n in range(3)]
    written = pd.concat(pq.read_table(fs.open(p, "rb")).to_pandas() for p in parts)
    # Files in path order, their partition values as columns (typed: the years are numbers).
    assert written["text"].tolist()[:2] == ["2024-eu-0", "2024-eu-1"]
    assert written["text"].tolist()[-1] == "2025-us-149"
    assert written["year"].tolist() == [2024] * 300 + [2025] * 300
    assert set(written["region"]) == {"eu", "us"}
    sent = [r["input"] for r in emulator.received()]
    assert {"text": "2025-us-3", "year": 2025, "region": "us"} in sent
    runs_once(emulator, 600)


@pytest.mark.slow
def test_the_cli_runs_a_file_job_wholly_in_the_bucket_and_its_reruns_send_nothing_twice(
    bucket: str,
) -> None:
    """Source, checkpoint and outputs in the bucket; re-run with and without --wait, then
    status and collect: the server counts one run per row."""
    import pyarrow.parquet as pq
    import s3fs

    fs = s3fs.S3FileSystem()
    df = pd.DataFrame(
        {"id": [f"k{i}" for i in range(1200)], "text": [f"t{i}" for i in range(1200)]}
    )
    with fs.open(f"{bucket}/in.csv", "wb") as f:
        f.write(df.to_csv(index=False).encode())
    emulator = Emulator(timing=FAST)
    ckpt = f"{bucket}/ck"
    with serve(emulator) as url:
        command = ["submit", f"{bucket}/in.csv", "-m", "acme/uppercase", "--key", "id"]
        command += ["--checkpoint", ckpt, "-o", f"{bucket}/out.parquet", "--base-url", url]
        first = cli(*command, "--no-progress")
        assert first.returncode == 0, first.stderr
        again = cli(*command, "--no-progress")
        assert again.returncode == 0, again.stderr
        waited = cli(*command, "--no-progress", "--wait")
        assert waited.returncode == 0, waited.stderr
        status = cli("status", ckpt, "--json")
        assert status.returncode == 0, status.stderr
        collected = cli("collect", ckpt, "-o", f"{bucket}/collected.csv", "--base-url", url)
        assert collected.returncode == 0, collected.stderr
    progress = orjson.loads(status.stdout)
    assert progress["rows_submitted"] == 1200
    assert progress["outcomes"] == {"succeeded": 1200}
    with fs.open(f"{bucket}/out.parquet", "rb") as f:
        written = pq.read_table(f).to_pandas()
    assert (written["runflow_status"] == "succeeded").all()  # --wait wrote the outcomes
    assert written.set_index("id").loc["k7", "runflow_output"] == '{"text":"T7"}'
    with fs.open(f"{bucket}/collected.csv", "rb") as f:
        assert len(pd.read_csv(f)) == 1200
    runs_once(emulator, 1200)
    assert "lease.json" not in objects(ckpt)


def test_a_file_job_reads_an_https_url_and_refuses_to_write_one(tmp_path: Path) -> None:
    """A source served over HTTP (read-only): streamed like any other; an http(s) output is
    refused before anything is sent."""
    import functools
    import http.server
    import threading

    from runflow_frames import InputError, run_batches_file

    df = pd.DataFrame({"id": [f"k{i}" for i in range(300)], "text": ["x"] * 300})
    df.to_parquet(tmp_path / "in.parquet", index=False)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    source = f"http://127.0.0.1:{server.server_address[1]}/in.parquet"
    emulator = Emulator(timing=FAST)
    try:
        with serve(emulator) as url:
            options = {"api_key": API_KEY, "base_url": url, "progress": False, "key": "id"}
            with pytest.raises(InputError, match="can be read, not written"):
                run_batches_file(
                    source, "acme/echo", output=source, checkpoint=tmp_path / "c", **options
                )
            counts = run_batches_file(
                source,
                "acme/echo",
                output=tmp_path / "out.csv",
                checkpoint=tmp_path / "ck",
                **options,
            )
    finally:
        server.shutdown()
        server.server_close()
    assert counts["rows"] == 300
    assert pd.read_csv(tmp_path / "out.csv")["runflow_run_id"].notna().all()
    runs_once(emulator, 300)
