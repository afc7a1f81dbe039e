"""Helpers shared by the benchmark scripts: an emulator in its own process, and RESULTS.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The emulator in its own process, started as the crash test starts it.
from tests.crash_harness import emulator_process  # noqa: E402

__all__ = ["RESULTS", "append_results", "emulator_process", "machine", "spread"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{platform.system()} {platform.machine()} ({cpu}), {os.cpu_count()} CPUs, Python {platform.python_version()}"


def spread(values: Sequence[float], fmt: str = ",.0f") -> str:
    low, mid, high = (format(v, fmt) for v in (min(values), statistics.median(values), max(values)))
    return f"median {mid} (min {low}, max {high}, n={len(values)})"


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
        RESULTS.write_text("# Benchmark results\n\n## Log of runs (newest last)\n\n")
    with RESULTS.open("a") as f:
        f.write(text)
    print(text)


# Code for a child process's script: its own peak RSS, in kB. Not ``ru_maxrss``: Linux keeps
# that across ``execve``, so a child of a parent that held 400 MB when it forked reports at
# least 400 MB whatever it used itself. VmHWM belongs to the process's own address space.
PEAK_KB = """
def peak_kb():
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1])
"""
