"""Checkpoints: resume without sending anything twice, and refuse what cannot be resumed safely."""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import orjson
import pandas as pd
import pyarrow.parquet as pq
import pytest

from runflow_frames import (
    CheckpointError,
    InputError,
    RetryPolicy,
    StaleIntentWarning,
    SubmissionError,
    _items,
    _journal,
    arun_batches,
    read_checkpoint,
    run_batches,
)
from runflow_frames._journal import Lock, _read_journal, load_state
from runflow_frames.emulator import Emulator, Timing, create_app

from .conftest import API_KEY, await_until, interruptible, wait_until

LOCAL = "http://localhost"
# One try per request: a lost answer then ends the run, as a crash would.
NO_RETRY = RetryPolicy(attempts=1)
CREATE = "POST /v1/models/{model}/batches"


def frame(n: int, start: int = 0) -> pd.DataFrame:
    keys = range(start, start + n)
    return pd.DataFrame(
        {"text": [f"t{i}" for i in keys], "n": list(keys)},
        index=pd.Index([f"k{i:05d}" for i in keys]),
    )


class LoseResponse(httpx.AsyncBaseTransport):
    """The emulator in-process, except that chosen create POSTs are processed by the server and
    then their response is lost (the connection drops): the ambiguous case."""

    def __init__(self, emulator: Emulator, lose: set[int]) -> None:
        self.inner = httpx.ASGITransport(app=create_app(emulator))
        self.lose = lose
        self.creates = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method == "POST":
            self.creates += 1
            if self.creates in self.lose:
                raise httpx.ReadError("connection reset by peer", request=request)
        return response


def run(df: pd.DataFrame, ckpt: Path, emulator: Emulator, **kwargs: Any) -> pd.DataFrame:
    transport = kwargs.pop("transport", None) or httpx.ASGITransport(app=create_app(emulator))
    return run_batches(
        df,
        "acme",
        kwargs.pop("slug", "echo"),
        checkpoint=ckpt,
        api_key=API_KEY,
        base_url=LOCAL,
        transport=transport,
        **kwargs,
    )


def assert_matches_server(out: pd.DataFrame, emulator: Emulator) -> None:
    """Every row was created exactly once, and its handle is the server's record of it."""
    seen = emulator.accounting()
    assert seen.runs_by_client_ref == dict.fromkeys(out["runflow_client_ref"], 1)
    received = {r["client_ref"]: r for r in emulator.received()}
    for ref, run_id, item_id, batch_id in zip(
        out["runflow_client_ref"],
        out["runflow_run_id"],
        out["runflow_item_id"],
        out["runflow_batch_id"],
        strict=True,
    ):
        r = received[ref]
        assert (run_id, item_id, batch_id) == (r["run_id"], r["item_id"], r["batch_id"])


def test_a_lost_response_is_resent_with_its_key_and_replayed_not_duplicated(
    tmp_path: Path, emulator: Emulator
) -> None:
    df = frame(1000)
    with pytest.raises(SubmissionError, match="re-run the same call with checkpoint"):
        run(
            df,
            tmp_path,
            emulator,
            max_concurrency=1,
            retry=NO_RETRY,
            transport=LoseResponse(emulator, {3}),
        )
    assert emulator.accounting().batches_created == 3  # the third was created; its answer lost

    out = run(df, tmp_path, emulator, max_concurrency=3)
    seen = emulator.accounting()
    assert seen.batches_created == 10
    assert seen.idempotent_replays == 1
    # The lost chunk's key was sent twice; every other key once.
    assert sorted(seen.requests_by_idempotency_key.values()) == [1] * 9 + [2]
    pd.testing.assert_frame_equal(out[df.columns], df)
    assert_matches_server(out, emulator)


def test_within_a_run_a_lost_answer_is_retried_and_replayed(
    tmp_path: Path, emulator: Emulator
) -> None:
    df = frame(1000)
    out = run(df, tmp_path, emulator, max_concurrency=2, transport=LoseResponse(emulator, {3, 7}))
    seen = emulator.accounting()
    assert seen.batches_created == 10
    assert seen.idempotent_replays == 2
    assert_matches_server(out, emulator)


def test_a_finished_job_resumes_with_no_request_and_the_same_frame(
    tmp_path: Path, emulator: Emulator
) -> None:
    df = frame(250)
    first = run(df, tmp_path, emulator)
    second = run(df, tmp_path, emulator)
    pd.testing.assert_frame_equal(first, second)
    assert emulator.accounting().requests_by_route == {CREATE: 3}
    assert_matches_server(second, emulator)


def test_a_grown_input_sends_only_the_new_rows(tmp_path: Path, emulator: Emulator) -> None:
    run(frame(150), tmp_path, emulator)
    grown = pd.concat([frame(30, start=1000), frame(150)])  # new rows first: order is the input's
    out = run(grown, tmp_path, emulator)
    assert emulator.accounting().requests_by_route == {CREATE: 2 + 1}
    assert out.index.equals(grown.index)
    assert_matches_server(out, emulator)


def test_chunk_size_may_change_between_runs(tmp_path: Path, emulator: Emulator) -> None:
    run(frame(100), tmp_path, emulator, chunk_size=50)
    out = run(frame(160), tmp_path, emulator, chunk_size=20)
    assert emulator.accounting().batches_created == 2 + 3
    assert_matches_server(out, emulator)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"slug": "image/edit"}, "model: 'acme/echo' -> 'acme/image/edit'"),
        ({"columns": ["text"]}, "columns"),
        ({"metadata": {"run": 2}}, "metadata"),
        ({"callback_url": "https://example.com/cb"}, "callback_url"),
        ({"missing": "null"}, "missing"),
        ({"org_id": "other-org"}, "org_id"),
        ({"key": "n"}, "key"),
    ],
)
def test_a_different_job_is_refused_naming_what_changed(
    tmp_path: Path, emulator: Emulator, change: dict[str, Any], named: str
) -> None:
    run(frame(10), tmp_path, emulator)
    before = emulator.accounting()
    with pytest.raises(CheckpointError, match="belongs to a different job") as info:
        run(frame(10), tmp_path, emulator, **change)
    assert any(named in c for c in info.value.changes)
    assert named in str(info.value)
    assert emulator.accounting() == before


def test_changed_values_for_recorded_rows_are_refused_by_key(
    tmp_path: Path, emulator: Emulator
) -> None:
    run(frame(200), tmp_path, emulator)
    changed = frame(200)
    changed.loc["k00007", "text"] = "edited"
    changed.loc["k00150", "n"] = -1
    before = emulator.accounting()
    with pytest.raises(CheckpointError, match="2 row") as info:
        run(changed, tmp_path, emulator)
    assert "k00007" in str(info.value)
    assert info.value.changes == ["changed row 'k00007'", "changed row 'k00150'"]
    assert emulator.accounting() == before


def test_recorded_rows_missing_from_the_input_are_refused(
    tmp_path: Path, emulator: Emulator
) -> None:
    run(frame(20), tmp_path, emulator)
    with pytest.raises(CheckpointError, match="lacks 5 row"):
        run(frame(15), tmp_path, emulator)


def test_old_pending_intents_warn_before_they_are_resent(
    tmp_path: Path, emulator: Emulator
) -> None:
    df = frame(300)
    with pytest.raises(SubmissionError):
        run(
            df,
            tmp_path,
            emulator,
            max_concurrency=1,
            retry=NO_RETRY,
            transport=LoseResponse(emulator, {1}),
        )
    with pytest.warns(StaleIntentWarning, match=r"re-sending 1 chunk\(s\) \(100 rows\)"):
        out = run(df, tmp_path, emulator, max_intent_age=1e-6)
    assert_matches_server(out, emulator)
    # Young intents do not warn.
    with pytest.raises(SubmissionError):
        run(
            frame(100, start=500),
            tmp_path / "b",
            emulator,
            retry=NO_RETRY,
            transport=LoseResponse(emulator, {1}),
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(frame(100, start=500), tmp_path / "b", emulator)


def test_read_checkpoint_reports_handles_and_progress(tmp_path: Path, emulator: Emulator) -> None:
    df = frame(450)
    with pytest.raises(SubmissionError) as info:
        run(
            df,
            tmp_path,
            emulator,
            max_concurrency=1,
            retry=NO_RETRY,
            transport=LoseResponse(emulator, {3}),
        )
    recorded = read_checkpoint(tmp_path)
    progress = recorded.attrs["progress"]
    assert progress["model"] == "acme/echo"
    assert progress["rows_submitted"] == 200
    assert progress["chunks_submitted"] == 2
    # Only the chunk whose answer was lost is pending: the one intended ahead of it but never
    # sent was marked unsent when the job stopped.
    assert progress["rows_pending"] == 100
    assert set(recorded["state"]) == {"submitted", "pending"}
    submitted = recorded[recorded["state"] == "submitted"]
    partial = info.value.result.set_index("runflow_client_ref")
    for col in ("runflow_run_id", "runflow_item_id", "runflow_batch_id"):
        assert submitted[col].to_dict() == partial.loc[submitted.index, col].to_dict()
    assert recorded.loc[recorded["state"] == "pending", "runflow_run_id"].isna().all()
    assert str(recorded["intent_at"].dtype) == "datetime64[ns, UTC]"
    out = run(df, tmp_path, emulator)
    done = read_checkpoint(tmp_path)
    assert done.attrs["progress"]["rows_pending"] == 0
    assert (
        done["runflow_run_id"].to_dict()
        == out.set_index("runflow_client_ref")["runflow_run_id"].to_dict()
    )


def test_read_checkpoint_of_a_non_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        read_checkpoint(tmp_path)


def test_the_api_key_never_lands_in_a_checkpoint(tmp_path: Path, emulator: Emulator) -> None:
    with pytest.raises(SubmissionError):
        run(frame(300), tmp_path, emulator, retry=NO_RETRY, transport=LoseResponse(emulator, {2}))
    run(frame(300), tmp_path, emulator)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path


def test_one_job_at_a_time_per_checkpoint(tmp_path: Path, emulator: Emulator) -> None:
    run(frame(10), tmp_path, emulator)
    holder = Lock(tmp_path)  # what another running job holds
    try:
        with pytest.raises(CheckpointError, match="in use by another running job"):
            run(frame(10), tmp_path, emulator)
    finally:
        holder.release()
    run(frame(10), tmp_path, emulator)


# -- damaged files -----------------------------------------------------------------------------


def interrupted(tmp_path: Path, emulator: Emulator) -> pd.DataFrame:
    """A job whose third chunk's answer was lost: its journal holds intents and done records."""
    df = frame(500)
    with pytest.raises(SubmissionError):
        run(
            df,
            tmp_path,
            emulator,
            max_concurrency=1,
            retry=NO_RETRY,
            transport=LoseResponse(emulator, {3}),
        )
    return df


def journal(tmp_path: Path) -> Path:
    (path,) = tmp_path.glob("journal-*.log")
    return path


def test_a_torn_tail_is_ignored(tmp_path: Path, emulator: Emulator) -> None:
    df = interrupted(tmp_path, emulator)
    path = journal(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data + data[:40])  # a record cut off mid-write
    out = run(df, tmp_path, emulator)
    assert_matches_server(out, emulator)


def test_a_torn_tail_with_a_bad_checksum_is_ignored(tmp_path: Path, emulator: Emulator) -> None:
    df = interrupted(tmp_path, emulator)
    path = journal(tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # the last record's payload is garbage
    path.write_bytes(bytes(data))
    out = run(df, tmp_path, emulator)
    assert_matches_server(out, emulator)


def test_corruption_inside_a_journal_is_an_error(tmp_path: Path, emulator: Emulator) -> None:
    df = interrupted(tmp_path, emulator)
    path = journal(tmp_path)
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF  # inside the first record, with valid records after it
    path.write_bytes(bytes(data))
    before = emulator.accounting()
    with pytest.raises(CheckpointError, match="corrupted at byte 0"):
        run(df, tmp_path, emulator)
    with pytest.raises(CheckpointError, match="corrupted"):
        read_checkpoint(tmp_path)
    assert emulator.accounting() == before


def test_a_damaged_segment_or_manifest_is_an_error(tmp_path: Path, emulator: Emulator) -> None:
    df = frame(200)
    run(df, tmp_path, emulator)
    (segment,) = tmp_path.glob("segment-*.parquet")
    segment.write_bytes(segment.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="cannot be read"):
        run(df, tmp_path, emulator)
    (tmp_path / "manifest.json").write_bytes(b'{"format": 1, "mod')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        run(df, tmp_path, emulator)
    assert emulator.accounting().batches_created == 2


def test_a_checkpoint_of_another_format_is_refused_before_any_request(
    tmp_path: Path, emulator: Emulator
) -> None:
    df = frame(100)
    run(df, tmp_path, emulator)
    manifest = orjson.loads((tmp_path / "manifest.json").read_bytes())
    (tmp_path / "manifest.json").write_bytes(orjson.dumps({**manifest, "format": 1}))
    with pytest.raises(
        CheckpointError, match=r"has format 1; this version .* reads formats 4 and 5"
    ):
        run(frame(200), tmp_path, emulator)
    assert emulator.accounting().batches_created == 1


def test_leftover_temporary_files_are_never_read(tmp_path: Path, emulator: Emulator) -> None:
    df = frame(100)
    run(df, tmp_path, emulator)
    (tmp_path / ".segment-000009.parquet.tmp").write_bytes(b"half a parquet file")
    out = run(df, tmp_path, emulator)
    assert emulator.accounting().batches_created == 1
    assert_matches_server(out, emulator)


def test_a_finished_run_leaves_segments_and_at_most_refused_numbers(
    tmp_path: Path, emulator: Emulator
) -> None:
    run(frame(200, start=1000), tmp_path / "clean", emulator)
    assert list((tmp_path / "clean").glob("journal-*.log")) == []  # all in segments
    df = frame(500)
    checkpoint = tmp_path / "interrupted"
    interrupted(checkpoint, emulator)
    run(df, checkpoint, emulator)
    (only,) = checkpoint.glob("journal-*.log")
    # Nothing pending: every intent and answer was folded into segments; only the numbers of
    # chunks never sent are remembered, so that no number is used twice.
    assert {r["t"] for r in _read_journal(only)} == {"x"}
    state = load_state(checkpoint)
    assert state.pending() == []
    assert state.answered_chunks == {}
    assert state.segments.num_rows == 500
    assert len(set(state.segments["chunk"].to_pylist())) == 5
    assert len(list(checkpoint.glob("segment-*.parquet"))) >= 1


# -- cancellation ------------------------------------------------------------------------------


def test_task_cancellation_mid_run_leaves_a_checkpoint_that_resumes(tmp_path: Path) -> None:
    emulator = Emulator(timing=Timing(create_latency=0.02))
    df = frame(3000)

    async def cancelled_run() -> None:
        with anyio.CancelScope() as scope:

            def cancel_once_500_rows_are_in(done: int, _total: int) -> None:
                if done >= 500:
                    scope.cancel()  # mid-run: requests are in flight, 25 chunks to go

            await arun_batches(
                df,
                "acme",
                "echo",
                checkpoint=tmp_path,
                max_concurrency=4,
                api_key=API_KEY,
                base_url=LOCAL,
                transport=httpx.ASGITransport(app=create_app(emulator)),
                progress=cancel_once_500_rows_are_in,
            )
            pytest.fail("the job should have been cancelled")
        assert scope.cancelled_caught

    anyio.run(cancelled_run)
    progress = read_checkpoint(tmp_path).attrs["progress"]
    # What was answered before the cancel is kept; at most the 4 requests in flight were not.
    assert 500 <= progress["rows_submitted"] <= 500 + 4 * 100
    assert emulator.accounting().batches_created < 30
    emulator.timing = Timing()
    out = run(df, tmp_path, emulator)
    assert_matches_server(out, emulator)


@pytest.mark.slow
def test_keyboard_interrupt_in_a_subprocess_leaves_a_checkpoint_that_resumes(
    tmp_path: Path, base_url: str, emulator: Emulator
) -> None:
    import signal
    import subprocess
    import sys

    # 30 creates, 4 at a time, 0.2 s each: the job would run for 1.5 s. The interrupt lands
    # once the emulator has seen the 6th create (4 answered, 2 or more in flight), with over a
    # second of work left whatever the machine's load.
    emulator.timing = Timing(create_latency=0.2)
    script = Path(__file__).with_name("crash_job.py")
    env = {**os.environ, "RUNFLOW_API_KEY": API_KEY}
    cmd = [
        sys.executable,
        str(script),
        base_url,
        str(tmp_path / "ckpt"),
        "3000",
        str(tmp_path / "out.parquet"),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=interruptible
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"READY\n"
    wait_until(lambda: emulator.accounting().batches_created >= 6, "the job's 6th create")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert b"KeyboardInterrupt" in err
    assert 0 < emulator.accounting().batches_created < 30
    emulator.timing = Timing()
    done = subprocess.run(cmd, capture_output=True, env=env, timeout=60, check=True)
    assert done.stdout.endswith(b"DONE\n")
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert len(out) == 3000
    assert_matches_server(out, emulator)


def test_results_dtypes_are_the_same_with_and_without_checkpoint(
    tmp_path: Path, emulator: Emulator
) -> None:
    df = frame(120).assign(x=np.linspace(0, 1, 120))
    with_ckpt = run(df, tmp_path, emulator)
    without = run_batches(
        df,
        "acme",
        "echo",
        api_key=API_KEY,
        base_url=LOCAL,
        transport=httpx.ASGITransport(app=create_app(emulator)),
    )
    assert with_ckpt.dtypes.to_dict() == without.dtypes.to_dict()


# -- segments written mid-run ------------------------------------------------------------------


def test_answers_go_to_segments_during_the_run(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_journal, "SEGMENT_ROWS", 1000)
    df = frame(20_000)
    out = run(df, tmp_path, emulator, max_concurrency=4)
    segments = sorted(tmp_path.glob("segment-*.parquet"))
    assert len(segments) >= 2  # one or more written mid-run, the rest at close
    assert list(tmp_path.glob("journal-*.log")) == []
    assert sorted(read_checkpoint(tmp_path).index) == sorted(df.index)
    assert_matches_server(out, emulator)


def test_a_failed_mid_run_segment_write_loses_nothing(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_journal, "SEGMENT_ROWS", 1000)
    write_table = _journal.pq.write_table

    def disk_full(table: Any, where: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_journal.pq, "write_table", disk_full)
    df = frame(20_000)
    with pytest.raises(SubmissionError, match=r"writing a segment failed .* No space left") as info:
        run(df, tmp_path, emulator, max_concurrency=4)
    assert isinstance(info.value.__cause__, CheckpointError)
    assert emulator.accounting().batches_created == 200  # the job went on to the end
    assert info.value.result["runflow_run_id"].notna().all()  # and every handle came back
    assert info.value.not_submitted == 0

    monkeypatch.setattr(_journal.pq, "write_table", write_table)
    out = run(df, tmp_path, emulator, max_concurrency=4)
    # The journal kept every answer: nothing was sent again, not even a replay.
    assert emulator.accounting().batches_created == 200
    assert sum(emulator.accounting().requests_by_idempotency_key.values()) == 200
    assert_matches_server(out, emulator)


def journal_fd(fd: int) -> bool:
    return "journal-" in str(Path(f"/proc/self/fd/{fd}").readlink())


def test_a_failed_journal_write_stops_the_job_and_leaves_no_torn_record(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = os.write
    calls = 0

    def disk_fills_up(fd: int, data: Any) -> int:
        nonlocal calls
        if journal_fd(fd):
            calls += 1
            if calls >= 3:  # the third write to the journal: half of it, then ENOSPC
                write(fd, bytes(data)[: len(data) // 2])
                raise OSError(28, "No space left on device")
        return write(fd, data)

    monkeypatch.setattr(_journal.os, "write", disk_fills_up)
    monkeypatch.setattr(_journal, "SEGMENT_ROWS", 1000)  # a segment writer thread runs too
    df = frame(20_000)
    with pytest.raises(
        SubmissionError, match=r"writing its journal failed .* No space left"
    ) as info:
        run(df, tmp_path, emulator, max_concurrency=4)
    assert isinstance(info.value.__cause__, CheckpointError)
    sent = emulator.accounting().batches_created
    assert 0 < sent < 200
    # No handle is dropped: every row the server answered is in the error's result.
    answered = info.value.result["runflow_run_id"].dropna()
    assert len(answered) == info.value.submitted > 0
    received = {r["client_ref"]: r["run_id"] for r in emulator.received()}
    assert all(received[ref] == run_id for ref, run_id in answered.items())
    # Closing failed too (the disk is still full), but it stopped its segment writer before it
    # released the lock: a resume must not find a segment still being written.
    assert [t.name for t in threading.enumerate() if t.name.startswith("runflow-")] == []

    monkeypatch.setattr(_journal.os, "write", write)
    out = run(df, tmp_path, emulator, max_concurrency=4)  # no "corrupted" error
    assert emulator.accounting().batches_created == 200
    assert_matches_server(out, emulator)


class LastAnswerWaits(httpx.AsyncBaseTransport):
    """The emulator in-process; the answer to the last create waits until ``until()`` is true
    of the checkpoint directory (``waited``: it became true; the wait is bounded by a guard)."""

    def __init__(self, emulator: Emulator, last: int, until: Callable[[], bool]) -> None:
        self.inner = httpx.ASGITransport(app=create_app(emulator))
        self.last, self.until = last, until
        self.creates = 0
        self.waited = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method == "POST":
            self.creates += 1
            if self.creates == self.last:
                await await_until(self.until, "the checkpoint state the last answer waits for")
                self.waited = True
        return response


def journal_records(checkpoint: Path) -> list[dict[str, Any]]:
    return [r for path in sorted(checkpoint.glob("journal-*.log")) for r in _read_journal(path)]


@pytest.mark.slow
def test_answers_reach_the_journal_within_a_second_when_no_group_follows(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The promise: an answer waits in memory at most SYNC_INTERVAL. Its timer is what is
    # tested, sped up (waiting out a real second proves nothing more, and flakes when loaded).
    assert _journal.SYNC_INTERVAL <= 1.0
    monkeypatch.setattr(_journal, "SYNC_INTERVAL", 0.02)

    # 20 chunks: one group of intents, so no later group's fsync carries the done records.
    def done_on_disk() -> int:
        return sum(r["t"] == "d" for r in journal_records(tmp_path))

    transport = LastAnswerWaits(emulator, last=20, until=lambda: done_on_disk() >= 19)
    out = run(frame(2000), tmp_path, emulator, max_concurrency=1, transport=transport)
    assert transport.waited  # the 19 done records reached the disk while the last answer waited
    assert_matches_server(out, emulator)


@pytest.mark.slow
def test_a_mid_run_segment_retires_the_journal_that_held_its_answers(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_journal, "SEGMENT_ROWS", 1000)

    def on_disk() -> tuple[int, set[int], set[int]]:
        # None written yet is possible while the writer thread works: then no chunk is in one.
        files = sorted(tmp_path.glob("segment-*.parquet"))
        chunks = pq.read_table(files, columns=["chunk"])["chunk"].to_pylist() if files else []
        done = {r["c"] for r in journal_records(tmp_path) if r["t"] == "d"}
        return len(list(tmp_path.glob("journal-*.log"))), set(chunks), done

    # The last create's answer waits until the segment writer has retired the journals it
    # wrote out (one journal left); then no chunk may be in both a segment and the journal.
    seen: list[tuple[int, set[int], set[int]]] = []

    def retired() -> bool:
        seen.append(on_disk())
        return seen[-1][0] == 1

    transport = LastAnswerWaits(emulator, last=200, until=retired)
    out = run(frame(20_000), tmp_path, emulator, max_concurrency=4, transport=transport)
    assert transport.waited
    journals, in_segments, in_journal = seen[-1]
    assert journals == 1
    assert in_segments  # written mid-run (how many depends on how fast the writer thread is)
    assert in_journal
    assert in_segments.isdisjoint(in_journal)
    assert_matches_server(out, emulator)


# -- value hashes: what a resume encodes ---------------------------------------------------------


def test_a_resume_encodes_only_the_rows_it_sends(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recorded rows whose values hash as recorded are not encoded again: only new rows are."""
    run(frame(900), tmp_path, emulator)
    encoded: list[str] = []
    real = _items.encode_rows

    def counting(df: pd.DataFrame, refs: Any, *args: Any, **kwargs: Any) -> list[bytes]:
        encoded.extend(refs)
        return real(df, refs, *args, **kwargs)

    monkeypatch.setattr(_items, "encode_rows", counting)
    out = run(frame(1000), tmp_path, emulator)
    assert sorted(encoded) == [f"k{i:05d}" for i in range(900, 1000)]
    assert emulator.accounting().batches_created == 9 + 1
    assert_matches_server(out, emulator)


def test_values_are_compared_exactly_and_a_dtype_that_keeps_the_bytes_resumes(
    tmp_path: Path, emulator: Emulator
) -> None:
    df = frame(200).assign(x=0.0)
    run(df, tmp_path, emulator)
    # Another dtype, the same bytes: its hash differs, so its bytes are compared, and match.
    same = df.astype({"n": "Int64", "text": object})
    out = run(same, tmp_path, emulator)
    assert emulator.accounting().batches_created == 2
    assert_matches_server(out, emulator)
    signed = df.copy()
    signed.loc["k00042", "x"] = -0.0  # == 0.0, but it is sent as -0.0
    with pytest.raises(CheckpointError, match="1 row") as info:
        run(signed, tmp_path, emulator)
    assert info.value.changes == ["changed row 'k00042'"]
    assert emulator.accounting().batches_created == 2


def test_a_format_4_checkpoint_resumes_by_its_bytes_and_is_upgraded(
    tmp_path: Path, emulator: Emulator
) -> None:
    """Format 4 kept no value hashes (in segments or intents): its rows are compared by their
    bytes, its pending chunk is re-sent and replayed, and what the resume adds is format 5."""
    df = interrupted(tmp_path, emulator)
    for segment in tmp_path.glob("segment-*.parquet"):
        pq.write_table(pq.read_table(segment).drop_columns(["value_hash"]), segment)
    for path in tmp_path.glob("journal-*.log"):
        records = [{k: v for k, v in r.items() if k != "h"} for r in _read_journal(path)]
        path.write_bytes(b"".join(_journal._frame(r) for r in records))
    manifest = orjson.loads((tmp_path / "manifest.json").read_bytes())
    (tmp_path / "manifest.json").write_bytes(orjson.dumps({**manifest, "format": 4}))
    changed = df.copy()
    changed.loc["k00001", "text"] = "edited"
    with pytest.raises(CheckpointError, match="1 row"):
        run(changed, tmp_path, emulator)
    out = run(df, tmp_path, emulator)
    assert_matches_server(out, emulator)
    assert orjson.loads((tmp_path / "manifest.json").read_bytes())["format"] == 5
    assert (load_state(tmp_path).submitted()["value_hash"].to_numpy() != 0).sum() >= 200


def test_a_refused_frame_makes_no_checkpoint_and_leaves_one_usable(
    tmp_path: Path, emulator: Emulator
) -> None:
    """The frame is checked while an existing checkpoint is read: a refusal then releases it."""
    bad = frame(10)
    bad.index = pd.Index([*bad.index[:9], None])
    with pytest.raises(InputError, match="null key"):
        run(bad, tmp_path / "new", emulator)
    assert not (tmp_path / "new").exists()
    run(frame(10), tmp_path, emulator)
    with pytest.raises(InputError, match="null key"):
        run(bad, tmp_path, emulator)
    out = run(frame(10), tmp_path, emulator)  # not "in use by another running job"
    assert emulator.accounting().batches_created == 1
    assert_matches_server(out, emulator)


def test_a_checkpoint_recording_a_row_twice_is_refused_before_any_request(
    tmp_path: Path, emulator: Emulator
) -> None:
    df = frame(200)
    run(df, tmp_path, emulator)
    (segment,) = tmp_path.glob("segment-*.parquet")
    (tmp_path / "segment-000099.parquet").write_bytes(segment.read_bytes())  # every row twice
    with pytest.raises(CheckpointError, match="in more than one chunk"):
        run(frame(300), tmp_path, emulator)
    with pytest.raises(CheckpointError, match="in more than one chunk"):
        read_checkpoint(tmp_path)
    assert emulator.accounting().batches_created == 2


def test_a_frame_without_value_hashes_resumes_by_its_bytes(
    tmp_path: Path, emulator: Emulator
) -> None:
    """Nested values have no value hash: every recorded row is encoded and compared."""
    df = frame(150).assign(meta=[{"i": i, "tags": ["a", "b"]} for i in range(150)])
    run(df, tmp_path, emulator)
    assert (load_state(tmp_path).submitted()["value_hash"].to_numpy() == 0).all()
    out = run(df, tmp_path, emulator)  # the same values: nothing sent
    assert emulator.accounting().batches_created == 2
    assert_matches_server(out, emulator)
    changed = df.copy()
    changed.at["k00003", "meta"] = {"i": 3, "tags": ["a"]}
    with pytest.raises(CheckpointError, match="1 row") as info:
        run(changed, tmp_path, emulator)
    assert info.value.changes == ["changed row 'k00003'"]
    assert emulator.accounting().batches_created == 2
