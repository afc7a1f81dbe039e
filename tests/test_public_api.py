"""The public surface is small and deliberate: pinned here so that growing it is a decision."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import runflow_frames
import runflow_frames.dask
import runflow_frames.emulator


def test_public_names() -> None:
    assert sorted(runflow_frames.__all__) == sorted(
        [
            "HANDLE_COLUMNS",
            "APIConnectionError",
            "APIError",
            "APIStatusError",
            "APITimeoutError",
            "AsyncRunflowClient",
            "AuthenticationError",
            "BudgetExceeded",
            "CanaryFailedError",
            "CanaryReport",
            "CheckpointError",
            "CollectError",
            "DeadlineExceeded",
            "InputError",
            "InsufficientCreditError",
            "JobInterrupted",
            "PermissionDeniedError",
            "ProtocolError",
            "RateLimitError",
            "RequestInProgressError",
            "RequestRejectedError",
            "RetryPolicy",
            "RunflowAccessor",
            "RunflowError",
            "ServerError",
            "StaleIntentWarning",
            "SubmissionError",
            "Summary",
            "__version__",
            "acollect",
            "aretry_failed",
            "arun_batches",
            "arun_batches_file",
            "collect",
            "read_checkpoint",
            "retry_failed",
            "run_batches",
            "run_batches_file",
            "summarize",
            "verify_signature",
        ]
    )
    for name in runflow_frames.__all__:
        assert getattr(runflow_frames, name) is not None
    for name in runflow_frames.emulator.__all__:
        assert getattr(runflow_frames.emulator, name) is not None
    assert sorted(runflow_frames.dask.__all__) == ["collect", "partition_checkpoint", "run_batches"]


def test_every_error_is_a_runflow_error() -> None:
    for name in runflow_frames.__all__:
        obj = getattr(runflow_frames, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and not issubclass(obj, Warning):
            assert issubclass(obj, runflow_frames.RunflowError)
    assert issubclass(runflow_frames.InputError, ValueError)
    # Ctrl-C stays a KeyboardInterrupt (carrying what the job had): `except Exception` must not
    # swallow it.
    assert issubclass(runflow_frames.JobInterrupted, KeyboardInterrupt)
    assert not issubclass(runflow_frames.JobInterrupted, Exception)
    assert issubclass(runflow_frames.DeadlineExceeded, runflow_frames.CollectError)


def test_sync_functions_are_generated_with_the_whole_signature_and_docstring() -> None:
    import inspect

    for name in ("run_batches", "retry_failed", "collect", "run_batches_file"):
        sync, asynchronous = getattr(runflow_frames, name), getattr(runflow_frames, "a" + name)
        assert sync.__name__ == name
        assert not inspect.iscoroutinefunction(sync)
        assert inspect.iscoroutinefunction(asynchronous)
        assert inspect.signature(sync) == inspect.signature(asynchronous)
        doc = inspect.getdoc(sync)
        assert doc is not None
        assert "Examples" in doc, name
    documented = inspect.getdoc(runflow_frames.run_batches) or ""
    for column in runflow_frames.HANDLE_COLUMNS:  # help() names every column the result gets
        assert column in documented


def test_import_needs_no_server_extra() -> None:
    # Importing the library must not import the emulator's server (an optional extra).
    # Nor dask (another optional extra).
    code = (
        "import runflow_frames, sys; "
        "print(*(m in sys.modules for m in ('starlette', 'uvicorn', 'dask', 'distributed')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"] * 4


@pytest.mark.slow
def test_console_script_runs_the_demo() -> None:
    script = Path(sys.executable).with_name("runflow-frames")  # installed by pip next to python
    out = subprocess.run(
        [str(script), "demo", "--rows", "150"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "150 rows -> 2 batches, 150 runs" in out.stdout
    assert "duplicates: 0" in out.stdout
    assert "ROW NUMBER 0" in out.stdout  # the model's output, shown as it is
    assert max(map(len, out.stdout.splitlines())) <= 100  # fits a terminal without wrapping


@pytest.mark.slow
def test_console_script_serves_the_emulator() -> None:
    import socket
    import time

    import httpx
    import pandas as pd

    from runflow_frames import run_batches

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(sys.executable).with_name("runflow-frames")
    proc = subprocess.Popen([str(script), "emulator", "--port", str(port)], stdout=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/v1/health").raise_for_status()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the emulator did not come up"
                time.sleep(0.05)
        out = run_batches(
            pd.DataFrame({"v": range(150)}), "acme", "echo", base_url=url, api_key="k"
        )
        seen = httpx.get(url + "/_emulator/accounting").json()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()
    assert seen["runs_by_client_ref"] == {str(i): 1 for i in range(150)}
    assert out["runflow_run_id"].notna().all()


def test_extras_let_users_take_only_what_they_use() -> None:
    from importlib.metadata import metadata

    extras = set(metadata("runflow-frames").get_all("Provides-Extra") or [])
    assert {"emulator", "dask", "polars", "notebook", "all", "test"} <= extras
    requires = metadata("runflow-frames").get_all("Requires-Dist") or []
    # Polars and notebook users do not pull a JVM's worth of pyspark: only [test] does.
    spark = [r for r in requires if r.startswith("pyspark")]
    assert spark
    assert all(r.replace("'", '"').endswith('extra == "test"') for r in spark)
    notebook = [r.replace("'", '"') for r in requires if r.startswith("ipywidgets")]
    assert any(r.endswith('extra == "notebook"') for r in notebook)
