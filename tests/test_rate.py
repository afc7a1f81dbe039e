"""The throttle against every limiter shape: in simulated time (the pure policy against the
emulator's own limiter shapes, hundreds of seconds in milliseconds), and one short job per shape
over HTTP against the emulator.

The bounds are issue 14's goals (steady state >= 0.95 of the allowed rate, >= 0.85 overall,
<= 5% of the creates refused in steady state) where the throttle meets them, and what it reaches
where it does not yet: a window of 5 s, whose closing a probe beyond the limit finds out up to
5 s late, and whose whole-second Retry-After sends each refused request back when the window
may still be closed.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from runflow_frames import SubmissionError, run_batches
from runflow_frames._admission import Admission
from runflow_frames._journal import read_pace
from runflow_frames._rate import RateController
from runflow_frames.emulator import Emulator, Faults, serve
from runflow_frames.emulator._limits import ConcurrencyCap, TokenBucket
from runflow_frames.emulator._records import Timing
from runflow_frames.emulator._simulate import SHAPES, Flaky, Job, Outcome, figures, simulate

from .conftest import API_KEY

GOAL = {"overall": 0.85, "steady": 0.95, "share": 0.05}
# Where the throttle does not meet a goal yet: what it does reach (see the module docstring).
SHORT_OF_GOAL: dict[tuple[str, str], dict[str, float]] = {
    ("window-5s", "none"): {"share": 0.09},
    ("window-5s", "ceil"): {"share": 0.07},
}


def run_shape(name: str, latency: float, form: str, seeds: int = 5) -> dict[str, float]:
    return figures(SHAPES[name], latency, form, seeds)


CASES = [
    (name, latency, form)
    for name in SHAPES
    for latency in (0.003, 0.1)
    for form in ("none", "exact", "ceil")
    if not (SHAPES[name].cap and latency < 0.01)  # at no latency a cap of 8 binds nothing
]


@pytest.mark.parametrize(("name", "latency", "form"), CASES)
def test_the_throttle_reaches_each_limit_in_simulated_time(
    name: str, latency: float, form: str
) -> None:
    got = run_shape(name, latency, form)
    bound = {**GOAL, **SHORT_OF_GOAL.get((name, form), {})}
    assert got["overall"] >= bound["overall"], got
    assert got["steady"] >= bound["steady"], got
    assert got["share"] <= bound["share"], got


@pytest.mark.parametrize("share", [0.02, 0.05, 0.1])
def test_stray_429s_barely_slow_a_job_down(share: float) -> None:
    # A share of the requests refused at random (a flaky server, no limit): 16 workers at 100 ms.
    runs = [simulate(Flaky(share, seed), Job(1600, 16, 0.1, "none", seed)) for seed in range(5)]
    assert statistics.median(r.fraction(160) for r in runs) >= 0.9


def test_a_resumed_job_starts_at_the_pace_it_learned() -> None:
    fresh = simulate(TokenBucket(20, 1), Job(100, 16, 0.1, "none", 1))
    learned = Admission(16, rate=19.0)
    resumed = simulate(TokenBucket(20, 1), Job(100, 16, 0.1, "none", 1), learned)

    def refused_first_second(outcome: Outcome) -> int:
        return sum(not ok for at, ok in outcome.answers if at < 1.0)

    assert refused_first_second(fresh) >= 10  # sixteen at once: fifteen refused
    assert refused_first_second(resumed) <= 2
    assert resumed.fraction(20) >= 0.9  # near the limit from its first second


def test_the_pace_cuts_a_little_when_a_little_over_and_climbs_back() -> None:
    pace = RateController(rate=20.0)
    now = 0.0
    for _ in range(60):  # 3 s at 20/s, all admitted: it probes upward
        pace.sent(now)
        now += 0.05
        pace.answered(now, now - 0.05, limited=False)
    probed = pace.rate
    assert probed is not None
    assert probed > 20.0
    for limited in [True, False] * 3:  # half refused: over a strict limit
        pace.sent(now)
        now += 1 / probed
        pace.answered(now, now - 1 / probed, limited=limited)
    assert pace.rate is not None
    assert 0.8 * probed < pace.rate < probed  # a cut, not a collapse


class _Rising:
    """Strict spacing at 20/s that becomes 40/s at ``at`` seconds."""

    def __init__(self, at: float) -> None:
        self.before, self.after, self.at = TokenBucket(20, 1), TokenBucket(40, 1), at

    def admit(self, now: float) -> float | None:
        return (self.before if now < self.at else self.after).admit(now)

    def done(self, now: float) -> None:
        return None


def test_a_limit_that_rises_is_found() -> None:
    # The pace stays just under a limit it found, and probes beyond only after 10 quiet seconds.
    outcome = simulate(_Rising(10.0), Job(1600, 16, 0.003, "none", 0))
    late = [at for at, ok in outcome.answers if ok and 30.0 <= at < outcome.duration - 1]
    assert len(late) / (outcome.duration - 31.0) >= 0.9 * 40


def test_an_opening_burst_answered_out_of_order_leaves_a_pace_to_climb_from() -> None:
    """Over HTTP the first answer can be an admission that overtakes the burst's 429s. Sixteen
    sent at once, one admitted (answered first), fifteen refused with a whole-second
    Retry-After: when they come back, one more refusal among the first answers is judged by
    those answers, not by the burst's."""
    pace = RateController()
    for i in range(16):
        pace.sent(i * 0.0003)
    pace.answered(0.06, 0.0, limited=False)
    pace.sent(0.06)  # the admitted one's worker goes on at once
    for i in range(1, 16):
        pace.answered(0.07, i * 0.0003, limited=True)
    pace.answered(0.071, 0.06, limited=True)
    assert pace.rate is not None
    assert 5 < pace.rate < 30  # one admitted in 70 ms, not sixteen sent
    now, answers = 1.07, [False, False, True, False, False]  # back after a second
    for limited in answers:
        now = max(now, now + pace.delay(now))
        pace.sent(now)
        pace.answered(now + 0.003, now, limited=limited)
        now += 0.003
    assert pace.rate > 5  # cut a little, not to a tenth


def test_a_cap_on_requests_in_flight_is_learned_as_a_cap_not_a_rate() -> None:
    admission = Admission(16)
    outcome = simulate(ConcurrencyCap(8), Job(800, 16, 0.1, "none", 2), admission)
    assert admission.learned() == {"rate": None, "cap": 8}  # the pace its 429s set, forgotten
    assert outcome.steady(80) >= 0.95
    assert outcome.refused_share() <= 0.05


# -- over HTTP, against the emulator -------------------------------------------------------------

HTTP_SHAPES = {
    "strict": "rate_limit=40,burst=1",
    "bucket": "rate_limit=40,burst=40",
    "fixed": "window_limit=40,window=1",
    "sliding": "window_limit=40,window=1,window_kind=sliding",
    "cap": "concurrency_limit=4",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HTTP_SHAPES))
def test_a_job_over_http_meets_each_shape(name: str) -> None:
    """120 creates (12,000 rows) at 40 a second (3 s), or 300 under a cap of 4 at 50 ms: every
    row gets one run, at most of the allowed rate."""
    faults = Faults.parse(f"{HTTP_SHAPES[name]},routes=create")
    emulator = Emulator(faults=faults, timing=Timing(create_latency=0.05))
    # Under the cap, 300 creates (about 4 s): a cap takes more evidence to tell from a rate
    # than a rate takes to learn, and in 1.5 s a job that first took its 429s for a rate had
    # no time left to recover (1 run in 6 fell under 0.6).
    rows = 30_000 if name == "cap" else 12_000
    df = pd.DataFrame({"x": np.arange(rows)}, index=[f"r{i}" for i in range(rows)])
    with serve(emulator) as url:
        run_batches(df, "acme/echo", base_url=url, api_key=API_KEY, max_concurrency=16)
    seen = emulator.accounting()
    assert seen.runs_by_client_ref == dict.fromkeys(df.index, 1)
    start, end = seen.timeline[0][0], seen.timeline[-1][0]
    created = [t for t, ok in seen.timeline if ok]
    allowed = 4 / 0.05 if name == "cap" else 40.0
    # A job of 3 s is mostly learning (the simulated-time tests hold the steady state to its
    # goals): it gets most of the allowed rate, without a storm of 429s.
    # Under a cap, 0.5: the cap learned sometimes stays under the true one for seconds (1 run
    # in 8 made 0.55 of the allowed rate over 300 creates): issue 14 leaves this open.
    floor = 0.5 if name == "cap" else 0.6
    assert len(created) / (end - start) >= floor * allowed
    # No storm. A sliding window of 1 s, spent by the job's opening burst, refuses every try
    # until it opens: tries then leave no faster than what got through (_rate's hold), and it
    # refuses 60-110 of the 120 creates' tries (115-270 before the hold, once the client's
    # requests got cheaper with aiohttp).
    storm = 1.5 if name == "sliding" else 2
    assert seen.faults.get("limited", 0) <= storm * len(created)
    if name == "cap":
        assert seen.max_creates_in_flight <= 4


@pytest.mark.slow
def test_a_resumed_checkpoint_starts_at_the_pace_its_first_run_learned(tmp_path: Path) -> None:
    """A job stopped part-way (out of credit) kept its pace; resumed, it sends at that pace
    from its first request instead of learning the limit again with a burst of 429s."""
    emulator = Emulator(faults=Faults.parse("rate_limit=20,burst=1,routes=create"), credit=6_000)
    df = pd.DataFrame({"x": np.arange(10_000)}, index=[f"r{i}" for i in range(10_000)])
    options: dict[str, Any] = {"api_key": API_KEY, "checkpoint": tmp_path, "max_concurrency": 16}
    with serve(emulator) as url:
        with pytest.raises(SubmissionError):
            run_batches(df, "acme/echo", base_url=url, **options)
        kept = read_pace(tmp_path)
        assert kept is not None
        assert kept["rate"] is not None
        assert 10 < kept["rate"] < 21
        first_run = len(emulator.accounting().timeline)
        emulator.credit = None
        out = run_batches(df, "acme/echo", base_url=url, **options)
    assert out["runflow_run_id"].notna().all()
    seen = emulator.accounting()
    assert seen.runs_by_client_ref == dict.fromkeys(df.index, 1)
    fresh = seen.timeline[:first_run]
    resumed = seen.timeline[first_run:]

    def refused_in_first_second(timeline: list[tuple[float, bool]]) -> int:
        return sum(not ok for t, ok in timeline if t < timeline[0][0] + 1.0)

    assert refused_in_first_second(fresh) >= 10  # sixteen at once: most refused
    assert refused_in_first_second(resumed) <= 3
