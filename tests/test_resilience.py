"""Retries, the shared adaptive throttle, per-row failures, and faults injected by the emulator."""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pandas as pd
import pytest

from runflow_frames import (
    APIConnectionError,
    APIError,
    AsyncRunflowClient,
    AuthenticationError,
    InsufficientCreditError,
    ProtocolError,
    RateLimitError,
    RequestRejectedError,
    RetryPolicy,
    ServerError,
    SubmissionError,
    read_checkpoint,
    run_batches,
)
from runflow_frames._pipeline import Throttle
from runflow_frames._retry import parse_retry_after, retryable, retrying
from runflow_frames.emulator import Emulator, Faults, serve
from runflow_frames.emulator._limits import TokenBucket

from .conftest import API_KEY

CREATE = "POST /v1/models/{model}/batches"
FAST = RetryPolicy(attempts=12, wait_initial=0.005, wait_max=0.05, timeout=60)


def frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({"v": np.arange(n)}, index=pd.Index([f"k{i:05d}" for i in range(n)]))


# -- pure decisions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "body", "now", "expected"),
    [
        ("3", None, 0.0, 3.0),
        ("0", None, 0.0, 0.0),
        (" 2.5 ", None, 0.0, 2.5),
        ("Thu, 01 Jan 1970 00:00:10 GMT", None, 4.0, 6.0),
        ("Thu, 01 Jan 1970 00:00:10 GMT", None, 20.0, 0.0),  # in the past: no wait
        ("-5", None, 0.0, 0.0),
        ("soon", None, 0.0, None),
        (None, {"retry_after": 7}, 0.0, 7.0),
        (None, {"retry_after": "7"}, 0.0, None),
        (None, {"retry_after": True}, 0.0, None),
        ("4", {"retry_after": 9}, 0.0, 4.0),  # the header wins
        (None, None, 0.0, None),
    ],
)
def test_retry_after_parsing(
    header: str | None, body: Any, now: float, expected: float | None
) -> None:
    assert parse_retry_after(header, body, now) == expected


def status(cls: type[Any], code: int, retry_after: float | None = None) -> APIError:
    return cls(f"{code}", status_code=code, retry_after=retry_after)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (APIConnectionError("reset"), True),
        (status(RateLimitError, 429), True),
        (status(ServerError, 500), True),
        (status(ServerError, 503), True),
        (ProtocolError("bad json"), True),
        (ProtocolError("handles do not match", retryable=False), False),
        (status(RequestRejectedError, 400), False),
        (status(AuthenticationError, 401), False),
        (status(InsufficientCreditError, 402), False),
        (status(RequestRejectedError, 404), False),
        (status(RequestRejectedError, 409), False),
        (status(RequestRejectedError, 422), False),
    ],
)
def test_what_is_retried(error: APIError, expected: bool) -> None:
    assert retryable(error) is expected


class FakeTime:
    """A clock that moves only when someone sleeps: waits are asserted, never slept."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def script(*outcomes: APIError | str) -> Any:
    """A call that raises the given errors in turn, then returns "ok"."""
    queue = list(outcomes)
    calls: list[int] = []

    async def call() -> str:
        calls.append(1)
        outcome = queue.pop(0) if queue else "ok"
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    call.calls = calls  # type: ignore[attr-defined]
    return call


def run_retrying(
    call: Any, policy: RetryPolicy, time: FakeTime, seed: int = 7, throttle: Throttle | None = None
) -> Any:
    gate = throttle or Throttle(4, clock=time.clock, sleep=time.sleep)

    async def main() -> Any:
        return await retrying(
            call,
            policy=policy,
            gate=gate,
            clock=time.clock,
            sleep=time.sleep,
            rng=random.Random(seed),
        )

    return anyio.run(main)


def test_backoff_is_exponential_with_full_jitter_exact_waits() -> None:
    time = FakeTime()
    policy = RetryPolicy(attempts=5, wait_initial=1.0, wait_max=5.0)
    call = script(
        APIConnectionError("a"),
        status(ServerError, 500),
        APIConnectionError("b"),
        APIConnectionError("c"),
    )
    assert run_retrying(call, policy, time) == "ok"
    rng = random.Random(7)
    expected = [rng.uniform(0, b) for b in (1.0, 2.0, 4.0, 5.0)]  # capped at wait_max
    assert time.sleeps == pytest.approx(expected)
    assert len(call.calls) == 5


def test_retry_after_is_honoured_and_capped() -> None:
    time = FakeTime()
    policy = RetryPolicy(attempts=4, retry_after_max=10.0)
    call = script(
        status(RateLimitError, 429, retry_after=3.0), status(ServerError, 500, retry_after=60.0)
    )
    assert run_retrying(call, policy, time) == "ok"
    # Each wait is the request's own: the 429's as asked, the 500's capped.
    assert time.sleeps == [3.0, 10.0]


def test_a_429_is_retried_without_backoff_and_does_not_use_up_the_attempts() -> None:
    time = FakeTime()
    call = script(*[status(RateLimitError, 429)] * 5, APIConnectionError("x"))
    assert run_retrying(call, RetryPolicy(attempts=2, wait_initial=1.0), time) == "ok"
    assert len(call.calls) == 7
    # The 429s wait for nothing but the throttle's pace (set by them, a few tries a second);
    # the connection error backs off on its own, up to 1 s.
    assert sum(time.sleeps) < 1.0 + 5 * 0.5


@pytest.mark.parametrize("code", [400, 401, 402, 403, 404, 409, 422])
def test_client_errors_are_never_retried(code: int) -> None:
    time = FakeTime()
    cls = {401: AuthenticationError, 402: InsufficientCreditError}.get(code, RequestRejectedError)
    call = script(status(cls, code))
    with pytest.raises(cls):
        run_retrying(call, RetryPolicy(), time)
    assert len(call.calls) == 1
    assert time.sleeps == []


def test_attempts_and_time_budget_bound_the_retries() -> None:
    time = FakeTime()
    call = script(*[APIConnectionError("x")] * 10)
    with pytest.raises(APIConnectionError):
        run_retrying(call, RetryPolicy(attempts=3, wait_initial=0.1), time)
    assert len(call.calls) == 3
    time = FakeTime()
    call = script(*[status(ServerError, 500, retry_after=4.0)] * 10)
    with pytest.raises(ServerError):
        run_retrying(call, RetryPolicy(attempts=100, timeout=10.0), time)
    assert time.sleeps == [4.0, 4.0]  # a third wait would end past the 10 s budget
    assert len(call.calls) == 3


def test_a_503_halves_concurrency_once_per_episode_pauses_everyone_and_grows_back() -> None:
    time = FakeTime()
    throttle = Throttle(8, clock=time.clock, sleep=time.sleep)
    admission = throttle.admission

    async def main() -> None:
        tickets = [await throttle.acquire() for _ in range(8)]
        assert admission.in_flight == 8
        # Five 503s of one episode: one cut, one pause.
        for wait in (2.0, 1.0, 2.0, 0.5, 1.5):
            throttle.release(tickets.pop(), status(ServerError, 503), wait=wait)
        assert admission.limit == 4.0
        assert admission.paused_until == 1002.0
        tickets.append(await throttle.acquire())  # 4 in flight < 4? no: 3 + this one
        assert time.sleeps == [2.0]  # it waited out the pause first
        # A later episode cuts again.
        throttle.release(tickets.pop(), status(ServerError, 503), wait=1.0)
        assert admission.limit == 2.0
        assert throttle.pace()["rate"] is None  # a 503 says nothing of a rate
        while tickets:
            throttle.release(tickets.pop(), None)
        # Additive increase: about +1 per `limit` successes, up to the maximum.
        for _ in range(60):
            throttle.release(await throttle.acquire(), None)
        assert admission.limit == 8.0

    anyio.run(main)


def test_the_throttle_admits_no_more_than_its_limit() -> None:
    time = FakeTime()
    throttle = Throttle(3, clock=time.clock, sleep=time.sleep)
    admitted: list[int] = []

    async def main() -> None:
        async def one() -> None:
            ticket = await throttle.acquire()
            admitted.append(ticket.in_flight)
            await anyio.sleep(0.01)
            throttle.release(ticket, None)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for _ in range(12):
                    tg.start_soon(one)

    anyio.run(main)
    assert max(admitted) == 3
    assert len(admitted) == 12


def tries(throttle: Throttle, time: FakeTime, outcomes: str) -> Any:
    """One try per 0.05 s (or as the pace allows): "." succeeds, "x" gets a 429."""

    async def main() -> None:
        for outcome in outcomes:
            ticket = await throttle.acquire()
            time.now += 0.05
            throttle.release(ticket, None if outcome == "." else status(RateLimitError, 429))

    return main


def test_a_rate_limit_paces_the_tries_and_holds_nobody_back() -> None:
    time = FakeTime()
    throttle = Throttle(4, clock=time.clock, sleep=time.sleep)
    bucket = TokenBucket(20, 1)  # strict spacing: 20 a second, 1/20 s apart
    admitted: list[bool] = []

    async def main() -> None:
        for _ in range(400):  # one request at a time, answered in 1 ms
            ticket = await throttle.acquire()
            refused = bucket.admit(time.now)
            time.now += 0.001
            throttle.release(ticket, None if refused is None else status(RateLimitError, 429))
            admitted.append(refused is None)

    anyio.run(main)
    rate = throttle.pace()["rate"]
    assert rate is not None
    assert 17 < rate < 21
    assert admitted[200:].count(False) <= 10  # at most 5% refused once learned
    assert throttle.admission.limit == 4.0  # a 429 does not cut the concurrency
    assert throttle.admission.paused_until < time.now  # nor pause anyone
    # Admissions are spaced about 1/rate apart, without a burst.
    assert statistics.median(time.sleeps[-100:]) == pytest.approx(1 / rate - 0.001, rel=0.1)


def test_a_stray_429_sets_no_pace() -> None:
    time = FakeTime()
    throttle = Throttle(4, clock=time.clock, sleep=time.sleep)
    # One 429 in 40 tries (a flaky server, not a limit): slowing down for good would not help.
    anyio.run(tries(throttle, time, "." * 39 + "x"))
    assert throttle.pace() == {"rate": None, "cap": None}
    assert throttle.admission.limit == 4.0


def test_other_errors_neither_cut_nor_pause() -> None:
    time = FakeTime()
    throttle = Throttle(4, clock=time.clock, sleep=time.sleep)

    async def main() -> None:
        throttle.release(await throttle.acquire(), status(ServerError, 500), wait=5.0)
        assert throttle.admission.limit == 4.0
        await throttle.acquire()
        assert time.sleeps == []

    anyio.run(main)


# -- against the emulator, over real HTTP ----------------------------------------------------------


def served(faults: Faults, **kwargs: Any) -> tuple[Emulator, Any]:
    emulator = Emulator(faults=faults, **kwargs)
    return emulator, serve(emulator)


@pytest.mark.parametrize(
    "faults",
    [
        Faults(reset_after=0.3, seed=1, routes="create"),
        Faults(slow=0.2, slow_seconds=0.6, seed=2, routes="create"),
        Faults(malformed=0.3, seed=3, routes="create"),
    ],
    ids=["reset-after-processing", "slower-than-timeout", "malformed-201"],
)
def test_a_processed_request_whose_answer_is_lost_never_makes_a_second_batch(
    faults: Faults,
) -> None:
    emulator, server = served(faults)
    df = frame(3000)
    with server as url:
        out = run_batches(
            df, "acme", "echo", base_url=url, api_key=API_KEY, timeout=0.3, retry=FAST
        )
    seen = emulator.accounting()
    assert sum(seen.faults.values()) > 0
    assert seen.batches_created == 30
    assert seen.runs_by_client_ref == dict.fromkeys(df.index, 1)
    if faults.slow:
        # An answer slower than the timeout is waited for, not asked for again.
        assert seen.idempotent_replays == 0
        assert set(seen.requests_by_idempotency_key.values()) == {1}
    else:
        assert seen.idempotent_replays >= 1
    received = {r["client_ref"]: r["run_id"] for r in emulator.received()}
    assert out["runflow_run_id"].to_dict() == received


def test_client_errors_are_sent_once(emulator: Emulator, base_url: str) -> None:
    with pytest.raises(SubmissionError):
        run_batches(frame(10), "acme", "solo", base_url=base_url, api_key=API_KEY)
    assert emulator.accounting().requests_by_route == {CREATE: 1}


def test_rejected_chunks_are_kept_per_row_with_errors_keep() -> None:
    emulator, server = served(Faults(rejected=0.2, seed=5, routes="create"))
    df = frame(2000)
    with server as url:
        out = run_batches(
            df, "acme", "echo", base_url=url, api_key=API_KEY, errors="keep", retry=FAST
        )
    failed = out[out["runflow_error"].notna()]
    ok = out[out["runflow_error"].isna()]
    assert emulator.accounting().faults["rejected"] * 100 == len(failed) > 0
    assert failed["runflow_run_id"].isna().all()
    assert failed["runflow_error"].str.contains("422 VALIDATION_ERROR").all()
    assert ok["runflow_run_id"].notna().all()
    assert set(emulator.accounting().runs_by_client_ref) == set(ok.index)


def test_errors_raise_lets_in_flight_work_finish_and_says_how_to_resume(tmp_path: Path) -> None:
    emulator, server = served(Faults(rejected=0.1, seed=11, routes="create"))
    df = frame(3000)
    options: dict[str, Any] = {"api_key": API_KEY, "checkpoint": tmp_path, "retry": FAST}
    with server as url:
        with pytest.raises(SubmissionError) as info:
            run_batches(df, "acme", "echo", base_url=url, max_concurrency=4, **options)
        err = info.value
        message = str(err)
        assert "RequestRejectedError 422 VALIDATION_ERROR" in message
        assert f"checkpoint={str(tmp_path)!r}" in message
        submitted = err.result["runflow_run_id"].notna()
        assert submitted.sum() == err.submitted == len(emulator.accounting().runs_by_client_ref)
        failed = err.result["runflow_error"].notna()
        assert failed.any()
        assert err.result.loc[failed, "runflow_run_id"].isna().all()
        # Everything submitted is in the checkpoint; the refused rows are unsent again.
        recorded = read_checkpoint(tmp_path)
        assert set(recorded[recorded["state"] == "submitted"].index) == set(df.index[submitted])
        assert set(df.index[failed]).isdisjoint(recorded.index)
        # Once the server is healthy again, a resume sends what is left, once.
        emulator.faults = None
        out = run_batches(df, "acme", "echo", base_url=url, **options)
    assert out["runflow_run_id"].notna().all()
    assert out["runflow_error"].isna().all()
    assert emulator.accounting().runs_by_client_ref == dict.fromkeys(df.index, 1)


@pytest.mark.parametrize("errors", ["raise", "keep"])
def test_no_credit_or_a_bad_key_stops_the_job_early_in_both_modes(errors: str) -> None:
    emulator = Emulator(credit=250)
    with serve(emulator) as url, pytest.raises(SubmissionError) as info:
        run_batches(
            frame(2000),
            "acme",
            "echo",
            base_url=url,
            api_key=API_KEY,
            errors=errors,
            max_concurrency=2,
        )  # type: ignore[arg-type]
    assert isinstance(info.value.__cause__, InsufficientCreditError)
    assert info.value.submitted == 200
    assert emulator.accounting().requests_by_route[CREATE] <= 4  # stopped, not 20 requests
    emulator = Emulator(api_keys={"other"})
    with serve(emulator) as url, pytest.raises(SubmissionError) as info:
        run_batches(
            frame(2000),
            "acme",
            "echo",
            base_url=url,
            api_key=API_KEY,
            errors=errors,
            max_concurrency=2,
        )  # type: ignore[arg-type]
    assert isinstance(info.value.__cause__, AuthenticationError)
    assert emulator.accounting().requests_by_route[CREATE] <= 2


def test_a_server_rate_limit_is_met_by_backing_off_together() -> None:
    # 80 creates against 40 a second, the bucket starting full: the first 40 go through at
    # once, the other 40 meet the limit. (With 40 creates no 429 was ever sent.)
    emulator, server = served(Faults(rate_limit=40, routes="create"))
    with server as url:
        out = run_batches(
            frame(8000),
            "acme",
            "echo",
            base_url=url,
            api_key=API_KEY,
            max_concurrency=16,
            retry=FAST,
        )
    seen = emulator.accounting()
    assert out["runflow_run_id"].notna().all()
    assert seen.runs_by_client_ref == dict.fromkeys(out.index, 1)
    limited = seen.faults.get("limited", 0)
    assert limited > 0  # the limit was met
    # Backing off together keeps the 429s near the 40 creates that had to wait, not a storm.
    # (Measured: 47 to 75 on an idle 2-core machine, 26 to 52 with both cores busy; each
    # request backing off on its own draws about 200, and runs out of retries.)
    assert limited < 100


@pytest.mark.slow
def test_fault_matrix(tmp_path: Path) -> None:
    """Every fault at once, at realistic rates, over 10,000 rows: every row ends with exactly one
    handle or an explained error, and the server made no duplicate run; healed, the same call
    resumes to a handle for every row."""
    faults = Faults(
        seed=2061,  # every kind strikes at least twice in the first 90 draws
        rate_limited=0.03,
        retry_after=None,
        server_error=0.03,
        reset_before=0.02,
        reset_after=0.03,
        slow=0.02,
        slow_seconds=0.5,
        malformed=0.02,
        rejected=0.02,
        concurrency_limit=6,
    )
    emulator = Emulator(faults=faults)
    df = frame(10_000)
    options: dict[str, Any] = {"api_key": API_KEY, "checkpoint": tmp_path, "max_concurrency": 8}
    with serve(emulator) as url:
        out = run_batches(
            df, "acme", "echo", base_url=url, timeout=0.3, errors="keep", retry=FAST, **options
        )
        seen = emulator.accounting()
        kinds = {"rate_limited", "server_error", "reset_before", "reset_after", "slow", "malformed"}
        assert kinds | {"rejected"} <= set(seen.faults)
        assert seen.duplicate_refs() == {}
        handled = out["runflow_run_id"].notna()
        explained = out["runflow_error"].notna()
        assert (handled ^ explained).all()  # exactly one of the two, for every row
        received = {r["client_ref"]: r["run_id"] for r in emulator.received()}
        assert out.loc[handled, "runflow_run_id"].to_dict() == {
            r: received[r] for r in out.index[handled]
        }
        # A row the server has but the client does not was in a chunk whose answer was lost on
        # every try: its error says so.
        unknown = sorted(set(received) - set(out.index[handled]))
        assert out.loc[unknown, "runflow_error"].str.contains("may have it").all()

        # Healed, the same call resumes: lost answers are replayed, refused rows sent again.
        emulator.faults = None
        again = run_batches(df, "acme", "echo", base_url=url, **options)
    assert again["runflow_run_id"].notna().all()
    assert emulator.accounting().runs_by_client_ref == dict.fromkeys(df.index, 1)
    received = {r["client_ref"]: r["run_id"] for r in emulator.received()}
    assert again["runflow_run_id"].to_dict() == received


def test_a_shared_pause_grows_with_episodes_not_with_one_requests_retries() -> None:
    time = FakeTime()

    async def pause_while_others_succeed(seconds: float) -> None:
        await time.sleep(seconds)
        # another request got through during the pause
        throttle.release(throttle.admission.take(time.now), None)

    throttle = Throttle(4, clock=time.clock, sleep=pause_while_others_succeed)
    policy = RetryPolicy(attempts=10, wait_initial=1.0, wait_max=100.0)
    call = script(*[status(ServerError, 503)] * 4)

    async def main() -> str:
        return await retrying(
            call,
            policy=policy,
            gate=throttle,
            clock=time.clock,
            sleep=time.sleep,
            rng=random.Random(3),
        )

    assert anyio.run(main) == "ok"
    rng = random.Random(3)
    # Each pause drew from [0, 1 s] (a first episode each time), not from the [0, 8 s] that this
    # request's fourth retry would allow.
    assert time.sleeps == pytest.approx([rng.uniform(0, 1.0) for _ in range(4)])
    assert throttle.strikes == 0

    time = FakeTime()
    throttle = Throttle(4, clock=time.clock, sleep=time.sleep)  # nobody else succeeds
    call = script(*[status(ServerError, 503)] * 4)
    assert anyio.run(main) == "ok"
    rng = random.Random(3)
    assert time.sleeps == pytest.approx([rng.uniform(0, 2.0**n) for n in range(4)])


@pytest.mark.parametrize(("precise", "held"), [(True, True), (False, False)])
def test_a_precise_long_retry_after_holds_everyone_a_whole_second_one_only_its_request(
    precise: bool, held: bool
) -> None:
    # "Retry-After: 2.5" says when a closed window opens: nobody goes sooner. "Retry-After: 3"
    # (whole seconds, rounded up) or a date says little more than "later".
    time = FakeTime()
    throttle = Throttle(4, clock=time.clock, sleep=time.sleep)
    refused = RateLimitError("429", status_code=429, retry_after=2.5, retry_after_precise=precise)

    async def main() -> None:
        first = await throttle.acquire()
        throttle.release(first, refused, wait=2.5)
        await throttle.acquire()  # another request

    anyio.run(main)
    assert (time.now >= 1002.5) is held


def test_the_client_tells_a_precise_retry_after_from_whole_seconds_and_dates() -> None:
    answers = {"2.345": True, "3": False, "3.0": False, "Thu, 01 Jan 2099 00:00:02 GMT": False}
    for header, precise in answers.items():
        transport = httpx.MockTransport(
            lambda request, h=header: httpx.Response(429, headers={"Retry-After": h}, json={})
        )
        client = AsyncRunflowClient(api_key=API_KEY, base_url="https://x.test", transport=transport)

        async def create(c: AsyncRunflowClient = client) -> None:
            async with c:
                await c.create_batch("acme/echo", b'{"input":[{}]}', idempotency_key="k")

        with pytest.raises(RateLimitError) as info:
            anyio.run(create)
        assert info.value.retry_after_precise is precise, header
