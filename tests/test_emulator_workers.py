"""``runflow-frames emulator --workers N``: N processes serve one port, each with its own state."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from runflow_frames import run_batches

from .conftest import API_KEY


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/v1/health", timeout=1).is_success
    except httpx.TransportError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; workers fork")
def test_workers_share_the_port_serve_a_create_only_job_and_end_with_it() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "runflow_frames.cli", "emulator", "--port", "0", "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[3]  # "Runflow emulator on http://127.0.0.1:PORT"
        deadline = time.monotonic() + 20
        while len(children(proc.pid)) < 2 or not healthy(url):
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.05)
        workers = children(proc.pid)
        assert len(workers) == 2
        df = pd.DataFrame({"text": [f"t{i}" for i in range(2000)]})
        out = run_batches(df, "acme", "echo", base_url=url, api_key=API_KEY, max_concurrency=8)
        assert out["runflow_run_id"].notna().all()
        assert out["runflow_run_id"].is_unique
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert "2 workers, each with its own state" in err
    assert not [w for w in workers if alive(w)]  # a SIGTERM ends the workers too
