"""A canary before the flood (issue 20): the first rows sent and waited for, the rest sent only
when few of them failed; counted on the server, with and without a checkpoint, in Python, in a
file job and through the command line."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest

from runflow_frames import (
    CanaryFailedError,
    InputError,
    SubmissionError,
    run_batches,
    run_batches_file,
)
from runflow_frames.emulator import Emulator, ModelSpec, Timing, builtin_models, serve

from .conftest import API_KEY, cli

FAST = Timing(queued=0.01, running=0.02)
MODELS = [
    *builtin_models(),
    ModelSpec("acme/flaky-80", fail_share=0.8, price=Decimal("0.05")),
    ModelSpec("acme/flaky-2", fail_share=0.02, price=Decimal("0.05")),
]


def frame(rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"text": [f"t{i}" for i in range(rows)]}, index=[f"r{i}" for i in range(rows)]
    )


def emulator() -> Emulator:
    return Emulator(timing=FAST, models=MODELS)


def test_a_model_that_fails_most_runs_stops_the_job_after_the_canary() -> None:
    server = emulator()
    df = frame(100_000)
    with serve(server) as url, pytest.raises(CanaryFailedError) as raised:
        run_batches(df, "acme/flaky-80", canary=100, api_key=API_KEY, base_url=url, progress=False)
    err = raised.value
    runs = server.accounting().runs_by_client_ref
    assert sorted(runs) == sorted(df.index[:100])  # the canary's rows, and only them
    assert set(runs.values()) == {1}
    assert isinstance(err, SubmissionError)
    assert (err.submitted, err.not_submitted) == (100, 99_900)
    assert err.report.failed == (err.canary["runflow_status"] == "failed").sum()
    assert err.report.failed > 50
    assert next(iter(err.report.failures)) == "PREPROCESSING_FAILED"
    assert "PREPROCESSING_FAILED" in str(err)
    assert "Nothing else was sent" in str(err)
    assert list(err.canary.index) == list(df.index[:100])
    assert err.result["runflow_run_id"].notna().sum() == 100
    assert err.result.loc["r0", "runflow_status"] in ("succeeded", "failed")


def test_a_model_that_fails_a_few_runs_passes_the_canary_and_the_job_runs_to_the_end() -> None:
    server = emulator()
    df = frame(3_000)
    with serve(server) as url:
        out = run_batches(
            df, "acme/flaky-2", canary=100, api_key=API_KEY, base_url=url, progress=False
        )
    assert server.accounting().runs_by_client_ref == dict.fromkeys(df.index, 1)
    assert out["runflow_run_id"].notna().all()
    report = out.attrs["runflow"]["canary"]
    assert report["passed"] is True
    assert report["rows"] == 100
    assert report["cost_per_run"] == "0.05"
    assert report["failed"] < 10


def test_with_a_checkpoint_a_rerun_sends_no_canary_row_twice(tmp_path: Path) -> None:
    server = emulator()
    df = frame(1_000)
    ckpt = tmp_path / "ckpt"
    options = {"api_key": API_KEY, "progress": False, "checkpoint": ckpt, "canary": 100}
    with serve(server) as url:
        with pytest.raises(CanaryFailedError):
            run_batches(df, "acme/flaky-80", base_url=url, **options)
        assert server.accounting().batches_created == 1
        # Judged again from what was recorded (nothing re-sent), still failing.
        with pytest.raises(CanaryFailedError):
            run_batches(df, "acme/flaky-80", base_url=url, **options)
        assert server.accounting().batches_created == 1
        # The user accepts the failures: the canary passes and the rest goes.
        out = run_batches(df, "acme/flaky-80", base_url=url, canary_max_failed=1.0, **options)
        created = server.accounting().batches_created
        # A re-run after a passed canary sends nothing at all.
        again = run_batches(df, "acme/flaky-80", base_url=url, **options | {"canary": False})
    assert created == 10
    assert server.accounting().batches_created == 10
    assert server.accounting().runs_by_client_ref == dict.fromkeys(df.index, 1)
    assert out["runflow_run_id"].notna().all()
    assert again["runflow_run_id"].tolist() == out["runflow_run_id"].tolist()


def test_a_file_jobs_canary_is_its_first_rows(tmp_path: Path) -> None:
    server = emulator()
    source = tmp_path / "in.parquet"
    frame(500).rename_axis("id").reset_index().to_parquet(source)
    options = {
        "output": tmp_path / "out.parquet",
        "checkpoint": tmp_path / "ckpt",
        "key": "id",
        "block_rows": 200,
        "api_key": API_KEY,
        "progress": False,
        "canary": 50,
    }
    with serve(server) as url:
        with pytest.raises(CanaryFailedError):
            run_batches_file(source, "acme/flaky-80", base_url=url, **options)
        assert set(server.accounting().runs_by_client_ref) == {f"r{i}" for i in range(50)}
        counts = run_batches_file(
            source, "acme/flaky-80", base_url=url, canary_max_failed=1.0, **options
        )
    assert counts["rows"] == 500
    assert server.accounting().runs_by_client_ref == {f"r{i}": 1 for i in range(500)}


@pytest.mark.parametrize(
    ("option", "value"),
    [("canary", -1), ("canary", 1.5), ("canary_max_failed", 2.0), ("canary_max_failed", "x")],
)
def test_an_impossible_canary_is_refused_before_any_request(option: str, value: object) -> None:
    server = emulator()
    with serve(server) as url, pytest.raises(InputError, match=option):
        run_batches(
            frame(10), "acme/echo", api_key=API_KEY, base_url=url, progress=False, **{option: value}
        )
    assert server.accounting().batches_created == 0


def test_the_emulator_fails_the_same_inputs_by_its_rule_and_prices_by_a_field() -> None:
    spec = ModelSpec("acme/x", fail_share=0.3, fail_seed=7, price_per="seconds")
    inputs = [{"text": f"t{i}"} for i in range(2_000)]
    failing = [spec.preprocess_failure(item) is not None for item in inputs]
    assert 0.25 < sum(failing) / len(inputs) < 0.35
    assert failing == [spec.preprocess_failure(item) is not None for item in inputs]
    other = ModelSpec("acme/x", fail_share=0.3, fail_seed=8)
    assert failing != [other.preprocess_failure(item) is not None for item in inputs]
    assert spec.cost({"seconds": 4}) == Decimal("0.004")
    assert spec.cost({}) == Decimal("0.001")


@pytest.mark.slow
def test_the_command_line_canary_exits_6_and_a_rerun_with_a_checkpoint_goes_on(
    tmp_path: Path,
) -> None:
    source = tmp_path / "in.csv"
    pd.DataFrame({"id": ["a", "b", "c", "d"], "text": ["x", "", "z", "w"]}).to_csv(
        source, index=False
    )
    server = Emulator(timing=FAST)
    with serve(server) as url:
        args = ["submit", str(source), "-m", "acme/uppercase", "--key", "id", "--base-url", url]
        args += ["-o", str(tmp_path / "out.parquet"), "--checkpoint", str(tmp_path / "ckpt")]
        # b's empty text fails its run: one of the canary's two rows.
        failed = cli(*args, "--canary", "2", "--canary-max-failed", "0.25")
        assert server.accounting().batches_created == 1
        passed = cli(*args, "--canary", "2")
    assert failed.returncode == 6, failed.stderr
    assert "canary of 2 rows: 1 succeeded, 1 failed" in failed.stderr
    assert "nothing else was sent" in failed.stderr
    assert passed.returncode == 0, passed.stderr
    assert "canary of 2 rows: 1 succeeded, 1 failed (50%" in passed.stderr
    assert server.accounting().runs_by_client_ref == dict.fromkeys("abcd", 1)
