"""Kill a checkpointed job with SIGKILL at random moments, resume it until it finishes, and read
back what the server saw. Used by the crash test and by benchmarks/soak_crash.py."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pandas as pd

JOB = Path(__file__).with_name("crash_job.py")
API_KEY = "rf_live_crash_test_key"


@contextmanager
def emulator_process(*args: str) -> Iterator[str]:
    """``runflow-frames emulator`` in its own process; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "runflow_frames.cli", "emulator", "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/v1/health", timeout=1).raise_for_status()
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the emulator process did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@dataclass
class Soak:
    rows: int
    kill_delays: list[float] = field(default_factory=list)
    attempts: int = 0
    runs_by_ref: dict[str, int] = field(default_factory=dict)
    replays: int = 0  # creates the server answered by replaying an earlier batch
    result: pd.DataFrame | None = None
    received: dict[str, dict[str, Any]] = field(default_factory=dict)
    wall: float = 0.0

    @property
    def duplicates(self) -> dict[str, int]:
        return {r: n for r, n in self.runs_by_ref.items() if n != 1}

    def mismatches(self) -> list[str]:
        """Rows whose final handle is not the server's record of that row."""
        assert self.result is not None
        bad = []
        for ref, run_id, item_id in zip(
            self.result["runflow_client_ref"],
            self.result["runflow_run_id"],
            self.result["runflow_item_id"],
            strict=True,
        ):
            r = self.received.get(ref)
            if r is None or (r["run_id"], r["item_id"]) != (run_id, item_id):
                bad.append(ref)
        return bad


def soak(
    workdir: Path,
    *,
    rows: int,
    kills: int,
    seed: int,
    latency: float,
    concurrency: int,
    max_delay: float,
    chunk_size: int = 100,
    segment_rows: int = 25_000,
    max_attempts: int = 200,
    checkpoint: str | None = None,
    lease_seconds: float = 60.0,
) -> Soak:
    """Run the crash job against an emulator process, SIGKILLing it ``kills`` times after a
    random delay (uniform up to ``max_delay`` s past READY), then let it finish. The checkpoint
    is ``workdir/ckpt``, or ``checkpoint`` (a URL on object storage, whose lease lasts
    ``lease_seconds``)."""
    rng = random.Random(seed)
    out = workdir / "out.parquet"
    result = Soak(rows)
    env = {**os.environ, "RUNFLOW_API_KEY": API_KEY}
    started = time.monotonic()
    with emulator_process("--latency", str(latency)) as url:
        cmd = [
            sys.executable,
            str(JOB),
            url,
            checkpoint or str(workdir / "ckpt"),
            str(rows),
            str(out),
            f"--concurrency={concurrency}",
            f"--chunk-size={chunk_size}",
            f"--segment-rows={segment_rows}",
            f"--lease-seconds={lease_seconds}",
        ]
        while result.attempts < max_attempts:
            result.attempts += 1
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            assert proc.stdout is not None
            if proc.stdout.readline() != b"READY\n":
                raise RuntimeError(proc.communicate()[1].decode())
            if len(result.kill_delays) < kills:
                delay = rng.uniform(0, max_delay)
                time.sleep(delay)
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
                    result.kill_delays.append(delay)
                    continue
            stdout, stderr = proc.communicate(timeout=120)
            if proc.returncode != 0 or not stdout.endswith(b"DONE\n"):
                raise RuntimeError(f"the job failed:\n{stderr.decode()}")
            break
        accounting = httpx.get(url + "/_emulator/accounting").json()
        result.runs_by_ref = accounting["runs_by_client_ref"]
        result.replays = accounting["idempotent_replays"]
        received = httpx.get(url + "/_emulator/received").json()["runs"]
    result.received = {r["client_ref"]: r for r in received}
    result.result = pd.read_parquet(out)
    result.wall = time.monotonic() - started
    return result
