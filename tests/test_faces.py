"""Small things the faces owe their users: a model named as one argument, metadata JSON cannot
carry refused, a signature check that cannot be switched off by an unset secret."""

from __future__ import annotations

import ast
import inspect
import math
import re
import socket
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pytest

from runflow_frames import InputError, collect, run_batches, verify_signature
from runflow_frames._signatures import sign
from runflow_frames.emulator import Emulator, Faults, Timing, serve

from .conftest import API_KEY, cli


def test_the_model_may_be_one_argument_as_the_cli_takes_it() -> None:
    emulator = Emulator(timing=Timing(queued=0.01, running=0.02))
    df = pd.DataFrame({"text": ["a", "b", "c"]})
    with serve(emulator) as url:
        out = run_batches(
            df, "acme/uppercase", api_key=API_KEY, base_url=url, wait=True, progress=False
        )
        with pytest.raises(InputError, match="names no slug"):
            run_batches(df, "acme", api_key=API_KEY, base_url=url)
    # acme/uppercase, not some other path, made these outputs.
    assert [o["text"] for o in out["runflow_output"]] == ["A", "B", "C"]
    assert emulator.accounting().batches_created == 1


@pytest.mark.parametrize(
    "metadata",
    [{"t": math.nan}, {"deep": {"x": [1.0, math.inf]}}, {"neg": -math.inf}],
)
def test_metadata_json_cannot_carry_is_refused_before_any_request(
    metadata: dict[str, object],
) -> None:
    emulator = Emulator()
    with serve(emulator) as url, pytest.raises(InputError, match=r"metadata.*no JSON"):
        run_batches(
            pd.DataFrame({"text": ["a"]}), "acme", "echo", api_key=API_KEY, base_url=url,
            metadata=metadata,
        )  # fmt: skip
    assert emulator.accounting().requests_by_route == {}


def test_an_empty_secret_is_refused_not_a_silent_pass() -> None:
    body = b'{"event":"batch.succeeded"}'
    forged = sign(body, "")  # what anyone can compute when the secret is unset
    with pytest.raises(InputError, match="non-empty signing secret"):
        verify_signature(body, forged, "")
    with pytest.raises(InputError, match="non-empty signing secret"):
        verify_signature(body, forged, ["whsec_real", ""])
    with pytest.raises(InputError, match="non-empty signing secret"):
        verify_signature(body, forged, [])
    assert verify_signature(body, sign(body, "whsec_real"), ["whsec_real"])
    assert not verify_signature(body, forged, ["whsec_real"])


@pytest.mark.slow
def test_log_level_info_shows_retries_on_stderr_and_the_default_does_not(tmp_path: Path) -> None:
    df = pd.DataFrame({"id": [f"r{i}" for i in range(300)], "text": ["a"] * 300})
    df.to_csv(tmp_path / "in.csv", index=False)
    emulator = Emulator(faults=Faults(server_error=0.3, seed=4, routes="create"))
    with serve(emulator) as url:
        command = ["submit", str(tmp_path / "in.csv"), "-m", "acme/echo", "--key", "id"]
        command += ["--base-url", url]
        runs = [
            cli(*level, *command, "-o", str(tmp_path / f"out{n}.parquet"))
            for n, level in enumerate([["--log-level", "info"], []])
        ]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr
    assert "trying again in" in runs[0].stderr
    assert "with the same Idempotency-Key" in runs[0].stderr
    assert API_KEY not in runs[0].stderr
    assert "trying again" not in runs[1].stderr


def test_a_busy_port_is_one_line_and_exit_2_not_a_traceback() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli("emulator", "--port", str(port))
    assert done.returncode == 2
    assert done.stdout == ""  # no address announced that nothing serves
    assert done.stderr.strip().splitlines() == [
        f"runflow-frames: error: cannot serve on 127.0.0.1:{port}: Address already in use; "
        "try another --port"
    ]


@pytest.mark.slow
def test_the_readme_names_every_option_of_every_command() -> None:
    readme = Path(__file__).parents[1].joinpath("README.md").read_text()
    for command in ("submit", "collect", "status", "emulator"):
        shown = cli(command, "--help").stdout
        options = set(re.findall(r"(--[a-z][a-z-]+)", shown)) - {"--help", "--no-progress"}
        missing = sorted(o for o in options if not re.search(rf"{o}(?![a-z-])", readme))
        assert missing == [], f"{command}: {missing}"


ONE_BY_ONE = ("--chunk-size", "1", "--concurrency", "1")


def readme_table(after: str) -> dict[str, list[str]]:
    """The README's first table after the text ``after``: first cell (unquoted) -> the rest."""
    readme = Path(__file__).parents[1].joinpath("README.md").read_text()
    lines = readme[readme.index(after) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2 :]:  # past the header and its rule
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in line.strip("|").split("|")])
    return {row[0]: row[1:] for row in rows}


def test_the_readme_output_column_tables_are_what_the_frames_hold() -> None:
    submitted = readme_table("### Output columns")
    outcomes = readme_table("`collect` adds")
    df = pd.DataFrame({"text": ["a", None, "c"]}, index=pd.Index(["x", "y", "z"], name="id"))
    with serve(Emulator(timing=Timing(queued=0.01, running=0.02))) as url:
        out = run_batches(df, "acme/uppercase", api_key=API_KEY, base_url=url, progress=False)
        done = collect(out, api_key=API_KEY, base_url=url, progress=False)
    added = [c for c in out.columns if c.startswith("runflow_")]
    assert added == list(submitted)
    assert {c: str(out[c].dtype) for c in added} == {c: d[0] for c, d in submitted.items()}
    expected = {**{c: d[0] for c, d in submitted.items()}, **{c: d[0] for c, d in outcomes.items()}}
    assert {c: str(done[c].dtype) for c in done.columns if c.startswith("runflow_")} == expected
    named = set(re.findall(r"`(\w+)`", outcomes["runflow_status"][1]))
    assert set(done["runflow_status"]) == {"succeeded", "failed"} <= named
    assert done.loc["x", "runflow_output"] == {"text": "A"}
    assert isinstance(done.loc["x", "runflow_cost"], Decimal)
    assert done.loc["y", "runflow_failure_code"] is not None  # the row with no text


@pytest.mark.slow
def test_the_readme_exit_code_table_is_what_the_command_exits_with(tmp_path: Path) -> None:
    """Each code's case through the entry point (130, Ctrl-C, is test_seams' interrupt test)."""
    table = readme_table("From a shell or a scheduler")
    assert sorted(map(int, table)) == [0, 1, 2, 3, 4, 5, 6, 7, 130]
    good = tmp_path / "good.csv"
    pd.DataFrame({"id": ["a", "b", "c"], "text": ["x", "", "z"]}).to_csv(good, index=False)
    doubled = tmp_path / "doubled.csv"
    pd.DataFrame({"id": ["a", "a"], "text": ["x", "y"]}).to_csv(doubled, index=False)

    def submit(url: str, source: Path, model: str, *more: str) -> int:
        out = str(tmp_path / f"out-{model.replace('/', '-')}-{source.stem}.parquet")
        args = ["submit", str(source), "-m", model, "--key", "id", "-o", out, "--base-url", url]
        return cli(*args, *more).returncode

    timing = Timing(queued=0.01, running=0.02)
    with serve(Emulator(timing=timing)) as url:
        exits = {
            0: submit(url, good, "acme/echo"),
            1: submit(url, good, "acme/uppercase", "--wait"),  # the empty text fails its run
            2: cli("submit", str(good), "-m", "acme/echo").returncode,  # no --output
            3: submit(url, doubled, "acme/echo"),  # a repeated key
            # One run of the canary's three fails (the empty text): more than a fifth.
            6: submit(url, good, "acme/uppercase", "--canary", "3", "--canary-max-failed", "0.2"),
            # A row per chunk, one at a time: after the first run (0.002) the next would cross.
            7: submit(url, good, "acme/uppercase", "--max-cost", "0.003", *ONE_BY_ONE),
        }
    with serve(Emulator(timing=timing, api_keys={"rf_live_another_key"})) as url:
        exits[4] = submit(url, good, "acme/echo")
    with serve(Emulator(timing=timing, faults=Faults(rejected=1.0))) as url:
        exits[5] = submit(url, good, "acme/echo", "--errors", "raise")
    assert exits == {code: code for code in exits}


def test_the_readme_options_table_names_every_option_with_its_default() -> None:
    table = readme_table("### Options")
    shown = {name.strip("` "): row[0] for names, row in table.items() for name in names.split(",")}
    signature = inspect.signature(run_batches).parameters
    options = {n: p.default for n, p in signature.items() if p.kind is p.KEYWORD_ONLY}
    assert sorted(shown) == sorted(options)
    for name, default in shown.items():
        try:
            stated = ast.literal_eval(default)
        except (ValueError, SyntaxError):  # words: "the index", "environment", "none"...
            continue
        assert stated == options[name], name
