"""A budget the job cannot overrun (issue 20): measured by the emulator's own billing, with runs
per client_ref counted on the server, across a resume with a higher budget, in a file job and
through the command line."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest

from runflow_frames import BudgetExceeded, InputError, SubmissionError, run_batches
from runflow_frames._budget import Budget
from runflow_frames.emulator import Emulator, ModelSpec, Timing, builtin_models, serve

from .conftest import API_KEY, cli

TIMING = Timing(queued=0.02, running=0.1)  # a price is known a tenth of a second after a POST
PRICE = Decimal("0.05")
MODELS = [
    *builtin_models(),
    ModelSpec("acme/paid", price=PRICE),
    ModelSpec("acme/broken", price=PRICE, fail_share=1.0),
]
IN_FLIGHT = 8 * 100 * PRICE  # what the chunks in flight when the line is reached may add


def frame(rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"text": [f"t{i}" for i in range(rows)]}, index=[f"r{i}" for i in range(rows)]
    )


def test_the_account_waits_for_a_price_then_stops_before_the_line() -> None:
    budget = Budget(Decimal(10), first_round=2)
    assert budget.admit(100) is True
    budget.sending += 100
    assert budget.admit(100) is True
    budget.sending += 100
    assert budget.admit(100) is None  # a round out and no price yet: wait
    budget.sending -= 200
    budget.sent("b1", 100)
    budget.sent("b2", 100)
    half = {"cost": "2.5", "items_succeeded": 50, "items_failed": 0, "items_total": 100}
    budget.seen("b1", half)
    assert budget.price() == Decimal("0.05")
    # spent 2.5 + still going 150 rows x 0.05 = 7.5 = 10: no room for another chunk.
    assert budget.admit(100) is False
    assert budget.stopped
    assert budget.committed() == Decimal("7.5")


def test_a_job_spends_at_most_its_budget_and_a_rerun_with_more_sends_no_row_twice(
    tmp_path: Path,
) -> None:
    server = Emulator(timing=TIMING, models=MODELS)
    df = frame(100_000)
    options = {"api_key": API_KEY, "progress": False, "checkpoint": tmp_path / "ckpt"}
    with serve(server) as url:
        with pytest.raises(BudgetExceeded) as raised:
            run_batches(df, "acme/paid", max_cost=100, base_url=url, **options)
        first = server.accounting().billed
        with pytest.raises(BudgetExceeded):
            run_batches(df, "acme/paid", max_cost=200, base_url=url, **options)
    err = raised.value
    assert isinstance(err, SubmissionError)
    assert Decimal(50) <= first <= 100 + IN_FLIGHT
    assert err.result["runflow_run_id"].notna().sum() == first / PRICE
    assert Decimal(err.budget["spent"]) + Decimal(err.budget["committed"]) <= 100
    assert "spent" in str(err)
    assert "higher max_cost" in str(err)
    accounting = server.accounting()
    assert first < accounting.billed <= 200 + IN_FLIGHT
    assert accounting.duplicate_refs() == {}


def test_without_a_checkpoint_the_error_carries_every_handle() -> None:
    server = Emulator(timing=TIMING, models=MODELS)
    df = frame(5_000)
    with serve(server) as url, pytest.raises(BudgetExceeded) as raised:
        run_batches(df, "acme/paid", max_cost=20, api_key=API_KEY, base_url=url, progress=False)
    sent = raised.value.result["runflow_run_id"].notna()
    assert set(df.index[sent]) == set(server.accounting().runs_by_client_ref)
    assert server.accounting().billed <= 20 + IN_FLIGHT


def test_runs_that_cost_nothing_never_stop_the_job() -> None:
    """Every run fails (no price is ever learned): round after round goes, none is billed."""
    server = Emulator(timing=TIMING, models=MODELS)
    df = frame(2_000)
    with serve(server) as url:
        out = run_batches(
            df, "acme/broken", max_cost=1, api_key=API_KEY, base_url=url, progress=False
        )
    assert out["runflow_run_id"].notna().all()
    assert server.accounting().billed == 0


@pytest.mark.parametrize("value", [-1, "lots", float("nan"), True])
def test_an_impossible_budget_is_refused_before_any_request(value: object) -> None:
    server = Emulator(timing=TIMING, models=MODELS)
    with serve(server) as url, pytest.raises(InputError, match="max_cost"):
        run_batches(
            frame(10), "acme/paid", max_cost=value, api_key=API_KEY, base_url=url, progress=False
        )
    assert server.accounting().batches_created == 0


@pytest.mark.slow
def test_the_command_line_stops_at_its_budget_exits_7_and_resumes_with_more(
    tmp_path: Path,
) -> None:
    source = tmp_path / "in.parquet"
    frame(3_000).rename_axis("id").reset_index().to_parquet(source)
    server = Emulator(timing=TIMING, models=MODELS)
    with serve(server) as url:
        args = ["submit", str(source), "-m", "acme/paid", "--key", "id", "--base-url", url]
        args += ["-o", str(tmp_path / "out.parquet"), "--checkpoint", str(tmp_path / "ckpt")]
        stopped = cli(*args, "--max-cost", "30")
        spent = server.accounting().billed
        done = cli(*args, "--max-cost", "1000")
    assert stopped.returncode == 7, stopped.stderr
    assert "--max-cost 30" in stopped.stderr
    assert 15 <= spent <= 30 + IN_FLIGHT
    assert done.returncode == 0, done.stderr
    assert server.accounting().runs_by_client_ref == {f"r{i}": 1 for i in range(3_000)}
    assert pd.read_parquet(tmp_path / "out.parquet")["runflow_run_id"].notna().all()


@pytest.mark.slow
def test_status_shows_the_money_and_a_dry_run_projects_the_cost(tmp_path: Path) -> None:
    import json

    done, planned = tmp_path / "done.parquet", tmp_path / "planned.parquet"
    frame(300).rename_axis("id").reset_index().to_parquet(done)
    frame(1_000).rename_axis("id").reset_index().to_parquet(planned)
    ckpt = str(tmp_path / "ckpt")
    with serve(Emulator(timing=TIMING, models=MODELS)) as url:
        args = ["submit", str(done), "-m", "acme/paid", "--key", "id", "--base-url", url]
        ran = cli(*args, "-o", str(tmp_path / "out.parquet"), "--checkpoint", ckpt, "--wait")
    assert ran.returncode == 0, ran.stderr
    status = json.loads(cli("status", ckpt, "--json").stdout)
    assert (status["spent"], status["price_per_run"]) == ("15.00", "0.05")
    assert "15.00 spent on the runs collected" in cli("status", ckpt).stdout
    dry = ["submit", str(planned), "-m", "acme/paid", "--key", "id", "--dry-run"]
    learned = cli(*dry, "--price-from", ckpt)
    assert learned.returncode == 0, learned.stderr
    assert "about 50.00 if every run succeeds (1,000 rows x 0.05 per run)" in learned.stdout
    given = cli(*dry, "--price-per-run", "0.1", "--json")
    assert json.loads(given.stdout.splitlines()[-1])["projected_cost"] == "100.00"
    assert cli(*dry, "--price-per-run", "cheap").returncode == 3
    assert cli("submit", str(planned), "-m", "acme/paid", "--price-per-run", "1").returncode == 2


def test_the_progress_bars_show_the_money(capfd: pytest.CaptureFixture[str]) -> None:
    server = Emulator(timing=TIMING, models=MODELS)
    with serve(server) as url:
        run_batches(
            frame(1_000),
            "acme/paid",
            max_cost=1_000,
            wait=True,
            api_key=API_KEY,
            base_url=url,
            progress=True,
        )
    shown = capfd.readouterr().err
    assert "budget=1000" in shown  # the submit bar: spent, committed and the budget
    assert "committed=" in shown
    assert "spent=50.00" in shown  # the collect bar, once every run is in
