"""Helpers shared by the benchmark scripts: an emulator in its own process, and RESULTS.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

RESULTS = Path(__file__).with_name("RESULTS.md")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def emulator_process(*args: str) -> Iterator[str]:
    """``runflow-frames emulator`` in a subprocess (its own GIL); yields the base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "runflow_frames.cli", "emulator", "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(url + "/v1/health", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("emulator did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{platform.system()} {platform.machine()} ({cpu}), {os.cpu_count()} CPUs, Python {platform.python_version()}"


def spread(values: Sequence[float]) -> str:
    return f"median {statistics.median(values):,.0f} (min {min(values):,.0f}, max {max(values):,.0f}, n={len(values)})"


def append_results(title: str, command: str, lines: Sequence[str]) -> None:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = [
        f"## {title}",
        "",
        f"- date: {stamp}",
        f"- machine: {machine()}",
        f"- command: `{command}`",
    ]
    block += [f"- {line}" for line in lines]
    text = "\n".join(block) + "\n\n"
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmark results\n\nAppended by the scripts in this folder; newest last.\n\n"
        )
    with RESULTS.open("a") as f:
        f.write(text)
    print(text)
