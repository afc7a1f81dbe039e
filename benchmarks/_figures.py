"""Today's figure for every goal, and what is made from them.

``figures.json`` holds the latest figure of each goal in ``GOALS``: the scripts that measure one
call ``record`` (with the figure, how it reads, the command and today's date). From it,
``render`` writes the table that opens RESULTS.md (between its markers) and draws
``goals.png``: every goal's figure as a share of its goal, so that a reader sees at a glance
which are met. ``run_all.py`` renders at its end; so does running this file:

    python benchmarks/_figures.py
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

HERE = Path(__file__).parent
FIGURES = HERE / "figures.json"
RESULTS = HERE / "RESULTS.md"
CHART = HERE / "goals.png"
BEGIN, END = "<!-- goals: made by _figures.py -->", "<!-- /goals -->"


@dataclass(frozen=True)
class Goal:
    metric: str
    target: float
    better: Literal["lower", "higher"]
    goal: str  # the goal as a reader reads it


GOALS: dict[str, Goal] = {
    "cpu_per_create_ms": Goal(
        "client CPU per create beyond encoding, worst of C = 1, 8, 64 (bare echo server)",
        0.7,
        "lower",
        "<= 0.7 ms, flat in C (issue 19)",
    ),
    "cpu_per_row_ratio": Goal(
        "client CPU per row (keys, value hashes, encode, bodies, digests, join) / naive "
        "to_dict + json.dumps, worst of 100,000 and 1,000,000 rows",
        0.5,
        "lower",
        "<= 0.5 (issue 19)",
    ),
    "suite_l20_c1": Goal(
        "suite: achieved / ceiling at L = 20 ms, C = 1", 0.95, "higher", ">= 0.95 (issue 19)"
    ),
    "suite_l100": Goal(
        "suite: achieved / ceiling at L = 100 ms, worst C <= 16 the emulator does not bound",
        0.95,
        "higher",
        ">= 0.95 (issue 19)",
    ),
    "suite_free": Goal(
        "suite: achieved / ceiling, worst point the emulator does not bound",
        0.9,
        "higher",
        ">= 0.9",
    ),
    "checkpoint_overhead": Goal(
        "checkpoint overhead at 0 ms latency (200,000 rows, median of side-by-side pairs)",
        0.05,
        "lower",
        "<= 5% (issue 19)",
    ),
    "resume_clean_s": Goal(
        "resume of a 1,000,000-row job 99% done, after a clean stop: first new request",
        1.5,
        "lower",
        "<= 1.5 s (issue 19)",
    ),
    "resume_killed_s": Goal(
        "resume of a 1,000,000-row job after SIGKILL: first new request",
        1.5,
        "lower",
        "<= 1.5 s (issue 19)",
    ),
    "wait_gap_s": Goal(
        "wait=True, 100,000 rows: from the last run's end to the outcomes in hand",
        2.0,
        "lower",
        "<= 2 s (issue 20)",
    ),
    "requests_per_1000": Goal(
        "API requests per 1,000 rows, submit + collect", 25, "lower", "<= 25"
    ),
    "file_rss_ratio": Goal(
        "file job peak RSS, 5,000,000 rows / 1,000,000 rows", 1.2, "lower", "<= 1.2"
    ),
    "object_store_throughput": Goal(
        "file job on a bucket (source, checkpoint, output): throughput / local files",
        0.85,
        "higher",
        ">= 0.85",
    ),
    "object_store_rss": Goal(
        "file job on a bucket: peak RSS / local files", 1.2, "lower", "<= 1.2"
    ),
    "throttle_cases": Goal(
        "throttle, one process: share of the 33 limiter cases (shapes x 0 / 100 ms) meeting "
        "every goal (steady >= 0.95, overall >= 0.85, 429s <= 5%)",
        1.0,
        "higher",
        "all (issue 14)",
    ),
    "throttle_cluster_steady": Goal(
        "throttle, 2-worker Dask cluster: worst steady share of the allowed rate",
        0.9,
        "higher",
        ">= 0.9 (issue 14)",
    ),
    "faulty_throughput": Goal(
        "faulty server (stray 429s, 5xx): throughput, new throttle / old",
        0.9,
        "higher",
        "within 10% (issue 14)",
    ),
    "dask_rate_limit": Goal(
        "Dask cluster against 50 creates/s: achieved / allowed", 0.9, "higher", ">= 0.9"
    ),
    "crash_duplicates": Goal(
        "crash soak, 60 SIGKILLs: duplicate runs plus rows lost", 0, "lower", "0"
    ),
}


def record(
    key: str, value: float, shown: str, command: str, note: str = "", *, path: Path = FIGURES
) -> None:
    """Keep ``value`` (read as ``shown``) as today's figure for goal ``key``."""
    if key not in GOALS:
        raise KeyError(f"no goal {key!r} in _figures.GOALS")
    figures = _load(path)
    figures[key] = {
        "value": value,
        "shown": shown,
        "command": command,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        "note": note,
    }
    path.write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def met(key: str, value: float) -> bool:
    goal = GOALS[key]
    return value <= goal.target if goal.better == "lower" else value >= goal.target


def table(figures: dict[str, Any]) -> str:
    rows = [
        "| metric | figure | goal | met | command | date |",
        "|---|---|---|---|---|---|",
    ]
    for key, goal in GOALS.items():
        f = figures.get(key)
        if f is None:
            rows.append(f"| {goal.metric} | (not measured) | {goal.goal} | - | - | - |")
            continue
        shown = f["shown"] + (f"; {f['note']}" if f["note"] else "")
        verdict = "yes" if met(key, f["value"]) else "**no**"
        rows.append(
            f"| {goal.metric} | {shown} | {goal.goal} | {verdict} | `{f['command']}` | {f['date']} |"
        )
    return "\n".join(rows)


def render(source: Path = FIGURES, results: Path = RESULTS, out: Path = CHART) -> None:
    """The table at the top of ``results``, and the chart ``out``, from ``source``."""
    figures = _load(source)
    text = results.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    results.write_text(f"{head}{BEGIN}\n{table(figures)}\n{END}{tail}")
    chart(figures, out)


def chart(figures: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in GOALS if k in figures]
    shares = []
    for key in keys:
        goal, value = GOALS[key], figures[key]["value"]
        if goal.target == 0:  # a count that must be 0
            share = 1.0 if value == 0 else 0.0
        elif goal.better == "higher":
            share = value / goal.target
        else:
            share = goal.target / value if value > 0 else 2.0
        shares.append(min(share, 2.0))
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(keys) + 1.5))
    colors = ["tab:green" if met(k, figures[k]["value"]) else "tab:red" for k in keys]
    ax.barh(range(len(keys)), shares, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels([f"{k}: {figures[k]['shown'][:40]}" for k in keys], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 2.0)
    ax.set_xlabel("figure as a share of its goal (1 = the goal; right of it: met; capped at 2)")
    ax.set_title("runflow-frames: every goal, today's figure (benchmarks/figures.json)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        raise SystemExit(__doc__)
    render()
