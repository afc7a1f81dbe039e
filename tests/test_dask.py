"""runflow_frames.dask on a real LocalCluster (worker processes) against the emulator over HTTP."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

dd = pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("distributed")

from runflow_frames import InputError  # noqa: E402
from runflow_frames import dask as rfd  # noqa: E402
from runflow_frames.emulator import Emulator, Faults, Timing, create_app, serve  # noqa: E402

from .conftest import API_KEY, FirstWave, objects, serve_app, wait_until  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client() -> Iterator[distributed.Client]:
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


def frame(rows: int, partitions: int) -> dd.DataFrame:
    df = pd.DataFrame(
        {"text": [f"item {i}" for i in range(rows)], "n": range(rows)},
        index=pd.Index([f"row-{i:06d}" for i in range(rows)], name="key"),
    )
    return dd.from_pandas(df, npartitions=partitions)


def assert_one_run_per_row_matching(out: pd.DataFrame, emulator: Emulator) -> None:
    seen = emulator.accounting()
    assert seen.runs_by_client_ref == dict.fromkeys(out.index, 1)
    received = {r["client_ref"]: r for r in emulator.received()}
    for ref, run_id in zip(out.index, out["runflow_run_id"], strict=True):
        assert run_id == received[ref]["run_id"]


def test_partitions_run_exactly_once_under_one_cluster_wide_cap(
    client: distributed.Client, tmp_path: Path
) -> None:
    emulator = Emulator(timing=Timing(create_latency=0.05))
    ddf = frame(4000, partitions=8)
    # The server holds the first creates until 3 are in flight together (so reaching the cap
    # does not depend on partitions overlapping by chance); a fourth would be seen arriving.
    gate = FirstWave(create_app(emulator), size=3)
    with serve_app(gate) as url:
        out = rfd.run_batches(
            ddf,
            "acme",
            "echo",
            checkpoint=tmp_path,
            max_concurrency=3,
            api_key=API_KEY,
            base_url=url,
        )
        assert API_KEY not in repr(out.__dask_graph__())
        result = out.compute()
        again = out.compute()  # a second compute resumes every partition: nothing is sent
    assert len(result) == 4000
    assert result["runflow_run_id"].notna().all()
    assert_one_run_per_row_matching(result, emulator)
    pd.testing.assert_frame_equal(result, again)
    # 2 workers x 2 threads could run 4 partitions x 3 requests at once: the scheduler's
    # throttle kept the whole cluster to 3.
    assert gate.most_in_flight == 3
    assert emulator.accounting().max_creates_in_flight <= 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"partition-{n:06d}" for n in range(8)]


def test_a_429_slows_every_worker_and_the_rate_settles_under_the_limit(
    client: distributed.Client, tmp_path: Path
) -> None:
    emulator = Emulator(faults=Faults(rate_limit=40, routes="create"))
    with serve(emulator) as url:
        out = rfd.run_batches(
            frame(12_000, partitions=6),
            "acme",
            "echo",
            checkpoint=tmp_path,
            max_concurrency=8,
            api_key=API_KEY,
            base_url=url,
        ).compute()
    seen = emulator.accounting()
    assert out["runflow_run_id"].notna().all()
    assert seen.runs_by_client_ref == dict.fromkeys(out.index, 1)
    # 120 creates against 40/s (the bucket starts full): the throttle learns the rate once
    # for the whole cluster instead of each partition hitting the limit on its own. A job of
    # 3 s is all learning: 40 to 82 429s measured (more when the machine is busy: the leases
    # travel through the scheduler); the old throttle, which paused everyone on each 429, drew
    # 14 to 16 but ran at 0.13 of a strictly spaced limit. Bounded here at one per create
    # (blind retries draw several per create); the steady state is held to its goals in
    # test_rate.py and bench_ratelimits.py.
    assert seen.faults.get("limited", 0) <= 120


@pytest.mark.parametrize("kept", ["in a directory", "in a bucket"])
def test_a_worker_killed_mid_job_costs_no_duplicate_run(
    client: distributed.Client, tmp_path: Path, kept: str, request: pytest.FixtureRequest
) -> None:
    """In a bucket: workers that share nothing but it. The partition a killed worker held is
    re-run elsewhere, waits out the dead run's lease and resumes from its objects."""
    # 48 creates, 4 at a time, 0.2 s each: the job runs for about 2.4 s, and the kill lands
    # right after the 8th create, with seconds of work left whatever the machine's load.
    emulator = Emulator(timing=Timing(create_latency=0.2))
    ddf = frame(4800, partitions=12)
    checkpoint: str | Path = tmp_path
    storage = None
    if kept == "in a bucket":
        checkpoint = f"{request.getfixturevalue('bucket')}/ck"
        # The workers started before the S3 server: they are told where it is explicitly.
        endpoint = request.getfixturevalue("s3_server")
        storage = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    pids = client.run(os.getpid)  # asked before the job starts: nothing between event and kill
    with serve(emulator) as url:
        out = rfd.run_batches(
            ddf,
            "acme",
            "echo",
            checkpoint=checkpoint,
            max_concurrency=4,
            api_key=API_KEY,
            base_url=url,
            storage_options=storage,
        )
        future = client.compute(out)
        wait_until(lambda: emulator.accounting().batches_created >= 8, "the job's 8th create")
        os.kill(pids[sorted(pids)[0]], signal.SIGKILL)
        created_before_the_kill = emulator.accounting().batches_created
        result = future.result(timeout=180)
    assert created_before_the_kill < 48  # the worker died mid-job
    assert result["runflow_run_id"].notna().all()
    assert_one_run_per_row_matching(result, emulator)
    assert emulator.accounting().batches_created == 48
    if isinstance(checkpoint, str):
        partitions = {name.split("/")[0] for name in objects(checkpoint)}
        assert partitions == {f"partition-{n:06d}" for n in range(12)}


def test_collect_works_on_the_dask_result(client: distributed.Client, tmp_path: Path) -> None:
    emulator = Emulator(timing=Timing(queued=0.05, dispatching=0.05, running=0.05))
    with serve(emulator) as url:
        out = rfd.run_batches(
            frame(600, partitions=3),
            "acme",
            "uppercase",
            columns=["text"],
            checkpoint=tmp_path,
            api_key=API_KEY,
            base_url=url,
        )
        done = rfd.collect(
            out, checkpoint=tmp_path, poll_interval=(0.1, 0.5), api_key=API_KEY, base_url=url
        ).compute()
    assert (done["runflow_status"] == "succeeded").all()
    assert done["runflow_output"].map(lambda o: o["text"]).tolist() == [
        f"ITEM {i}" for i in range(600)
    ]


def test_a_dask_job_without_a_checkpoint_is_refused(client: distributed.Client) -> None:
    with pytest.raises(InputError, match="checkpoint"):
        rfd.run_batches(frame(10, 2), "acme", "echo", checkpoint=None, api_key=API_KEY)  # type: ignore[arg-type]
