"""The public surface is small and deliberate: pinned here so that growing it is a decision."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import runflow_frames
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
            "InputError",
            "InsufficientCreditError",
            "PermissionDeniedError",
            "ProtocolError",
            "RateLimitError",
            "RequestRejectedError",
            "RunflowError",
            "ServerError",
            "SubmissionError",
            "__version__",
            "arun_batches",
            "run_batches",
        ]
    )
    for name in runflow_frames.__all__:
        assert getattr(runflow_frames, name) is not None
    for name in runflow_frames.emulator.__all__:
        assert getattr(runflow_frames.emulator, name) is not None


def test_every_error_is_a_runflow_error() -> None:
    for name in runflow_frames.__all__:
        obj = getattr(runflow_frames, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, runflow_frames.RunflowError)
    assert issubclass(runflow_frames.InputError, ValueError)


def test_import_reads_no_environment_and_needs_no_server_extra() -> None:
    # Importing the library must not import the emulator's server (an optional extra).
    code = "import runflow_frames, sys; print('starlette' in sys.modules, 'uvicorn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


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
