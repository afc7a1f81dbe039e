"""The rate-limit shapes a server may enforce (emulator/_limits.py), on simulated time, and the
emulator enforcing them over real HTTP as ``Faults`` selects them."""

from __future__ import annotations

import copy
import email.utils
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.client import HTTPConnection

import httpx
import orjson
import pytest

from runflow_frames._retry import parse_retry_after
from runflow_frames.emulator import Emulator, Faults, Timing, serve
from runflow_frames.emulator._limits import (
    AllOf,
    ConcurrencyCap,
    FixedWindow,
    Limiter,
    Shape,
    SlidingWindow,
    TokenBucket,
    retry_after_header,
)

from .conftest import API_KEY, GUARD, wait_until

ECHO = "/v1/models/acme/echo/batches"

# Offers at k / 16 seconds: exact in binary floating point, so the expected counts are exact.
PER_SECOND = 16


def offer(limiter: Limiter, seconds: float = 10.0) -> tuple[list[float], list[tuple[float, float]]]:
    """Offer ``PER_SECOND`` requests a second for ``seconds`` simulated seconds (each done at
    once); the admission times, and each refusal's time and wait. Every refusal's wait is
    checked on a copy of the limiter: a retry after exactly that wait is admitted, and one a
    little earlier is not."""
    admitted: list[float] = []
    refused: list[tuple[float, float]] = []
    for k in range(int(seconds * PER_SECOND)):
        now = k / PER_SECOND
        wait = limiter.admit(now)
        if wait is None:
            admitted.append(now)
            limiter.done(now)
            continue
        refused.append((now, wait))
        assert wait >= 0
        assert copy.deepcopy(limiter).admit(now + wait) is None, (now, wait)
        if wait > 0.01:
            assert copy.deepcopy(limiter).admit(now + wait - 0.01) is not None, (now, wait)
    return admitted, refused


def most_in_any_window(times: list[float], window: float) -> int:
    return max(sum(1 for u in times if t <= u < t + window) for t in times)


# -- the shapes, on simulated time -----------------------------------------------------------------


def test_token_bucket_admits_its_burst_then_its_rate() -> None:
    admitted, refused = offer(TokenBucket(rate=4, burst=3))
    # Full at start (3), then one token every 1/4 s: by the last offer (9.9375 s), 39 more.
    assert len(admitted) == 3 + 39
    assert admitted[:3] == [0.0, 1 / 16, 2 / 16]
    assert len(admitted) + len(refused) == 160
    # Never more than the burst plus what the rate refilled, over any stretch.
    assert all(
        j - i + 1 <= 3 + 4 * (admitted[j] - admitted[i]) + 1e-9
        for i in range(len(admitted))
        for j in range(i, len(admitted))
    )


def test_a_token_bucket_of_burst_one_spaces_requests_strictly() -> None:
    admitted, refused = offer(TokenBucket(rate=4, burst=1))
    assert admitted == [i / 4 for i in range(40)]
    # Just after an admission, the wait is the rest of the interval, exactly.
    assert refused[0] == (1 / 16, 3 / 16)


def test_token_bucket_waits_from_an_idle_start_and_fractional_bursts() -> None:
    bucket = TokenBucket(rate=2, burst=1.5)
    assert bucket.admit(100.0) is None  # any clock origin: it starts full
    assert bucket.admit(100.0) == pytest.approx(0.25)  # half a token left: 1/4 s to a whole one
    assert bucket.admit(100.25) is None
    assert bucket.admit(100.25) == pytest.approx(0.5)


def test_fixed_window_resets_on_its_boundaries() -> None:
    admitted, refused = offer(FixedWindow(limit=3, window=1.0))
    assert admitted == [s + k / 16 for s in range(10) for k in range(3)]
    # Refused at 3/16 s: the window ends at 1 s.
    assert refused[0] == (3 / 16, 13 / 16)


def test_fixed_windows_start_at_the_limiters_first_request_and_let_a_burst_straddle_one() -> None:
    window = FixedWindow(limit=3, window=1.0)
    assert [window.admit(0.5) for _ in range(4)] == [None, None, None, 1.0]
    assert window.admit(1.4) == pytest.approx(0.1)
    assert window.admit(1.5) is None  # the next window, from the first request's 0.5 s
    anchored = FixedWindow(limit=3, window=1.0, start=0.0)
    straddle = [anchored.admit(t) for t in (0.9, 0.9, 0.9, 1.0, 1.0, 1.0)]
    assert straddle == [None] * 6  # six in a tenth of a second: what fixed windows allow


def test_sliding_window_admits_at_most_its_limit_in_any_window() -> None:
    admitted, refused = offer(SlidingWindow(limit=3, window=1.0))
    assert admitted == [s + k / 16 for s in range(10) for k in range(3)]
    assert most_in_any_window(admitted, 1.0) == 3
    # Refused at 3/16 s: the admission at 0 s stops counting at 1 s.
    assert refused[0] == (3 / 16, 13 / 16)
    window = SlidingWindow(limit=3, window=1.0)
    straddle = [window.admit(t) for t in (0.9, 0.9, 0.9, 1.0)]
    assert straddle[:3] == [None] * 3
    assert straddle[3] == pytest.approx(0.9)  # until the 0.9 s admissions leave the window


def test_sliding_window_under_an_uneven_load() -> None:
    times = [0.0, 0.1, 0.15, 0.7, 1.05, 1.1, 1.12, 1.6, 2.0, 2.05, 2.1, 2.2, 3.5]
    window = SlidingWindow(limit=2, window=0.5)
    admitted = [t for t in times if window.admit(t) is None]
    assert admitted == [0.0, 0.1, 0.7, 1.05, 1.6, 2.0, 2.1, 3.5]
    assert most_in_any_window(admitted, 0.5) == 2


def test_concurrency_cap_counts_requests_in_flight() -> None:
    cap = ConcurrencyCap(limit=2)
    assert [cap.admit(0.0) for _ in range(3)] == [None, None, 0.0]  # 0.0: the wait is unknown
    cap.done(0.1)
    assert cap.admit(0.1) is None
    assert cap.admit(0.1) == 0.0
    assert cap.in_flight == 2


def test_all_of_refused_by_one_consumes_nothing_of_the_others() -> None:
    bucket, cap = TokenBucket(rate=1, burst=2), ConcurrencyCap(limit=1)
    both = AllOf(bucket, cap)
    assert both.admit(0.0) is None
    assert both.admit(0.0) == 0.0  # the cap refuses: the bucket keeps its second token
    both.done(0.0)
    assert both.admit(0.0) is None  # so it admits at once when the cap frees
    assert bucket.admit(0.0) == pytest.approx(1.0)

    cap, bucket = ConcurrencyCap(limit=5), TokenBucket(rate=1, burst=1)
    both = AllOf(cap, bucket)
    assert both.admit(0.0) is None
    assert both.admit(0.0) == pytest.approx(1.0)  # the bucket refuses: no slot taken from the cap
    assert cap.in_flight == 1


def test_all_of_waits_for_the_longest_and_its_wait_is_true() -> None:
    limits = AllOf(TokenBucket(rate=4, burst=3), FixedWindow(limit=5, window=2.0))
    admitted, refused = offer(limits)
    # Each window: the bucket's 3 at once, then one every 1/4 s until the window's 5; then the
    # window refuses until its end (and the bucket refills meanwhile).
    assert admitted == [s + k / 16 for s in range(0, 10, 2) for k in (0, 1, 2, 4, 8)]
    assert refused[0] == (3 / 16, 1 / 16)  # the bucket's wait: the window has room
    assert refused[4] == (9 / 16, 2 - 9 / 16)  # both refuse: the window's, the longer
    assert AllOf().admit(0.0) is None  # nothing to enforce


@pytest.mark.parametrize(
    "make",
    [
        lambda: TokenBucket(0),
        lambda: TokenBucket(-1),
        lambda: TokenBucket(1, burst=0.5),
        lambda: TokenBucket(math.inf),
        lambda: FixedWindow(0),
        lambda: FixedWindow(3, window=0),
        lambda: SlidingWindow(-2),
        lambda: SlidingWindow(2, window=-1.0),
        lambda: ConcurrencyCap(0),
    ],
)
def test_shapes_refuse_limits_that_admit_nothing(make: object) -> None:
    with pytest.raises(ValueError, match="must be"):
        make()  # type: ignore[operator]


def test_all_of_takes_only_shapes_it_can_check_before_committing() -> None:
    class Opaque:
        def admit(self, now: float) -> float | None:
            return None

        def done(self, now: float) -> None:
            pass

    with pytest.raises(TypeError, match="combines"):
        AllOf(Opaque())  # type: ignore[arg-type]
    assert isinstance(TokenBucket(1), Shape)


# -- Retry-After ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wait", "mode", "wall_now", "header"),
    [
        (0.25, "none", 0.0, None),
        (0.25, "exact", 0.0, "0.25"),
        (0.1, "exact", 0.0, "0.1"),  # 0.1 * 1000 is 100.00000000000001: still 100 ms
        (1.23401, "exact", 0.0, "1.235"),  # rounded up: a client waiting this long is admitted
        (2.0, "exact", 0.0, "2"),
        (0.0, "exact", 0.0, "0"),
        (0.0, "ceil", 0.0, "1"),  # at least 1
        (0.2, "ceil", 0.0, "1"),
        (1.0, "ceil", 0.0, "1"),
        (1.01, "ceil", 0.0, "2"),
        (59.5, "ceil", 0.0, "60"),
        (1.5, "date", 0.0, "Thu, 01 Jan 1970 00:00:02 GMT"),
        (0.0, "date", 10.2, "Thu, 01 Jan 1970 00:00:11 GMT"),
        (2.0, "date", 0.0, "Thu, 01 Jan 1970 00:00:02 GMT"),
        (-1.0, "exact", 0.0, "0"),
    ],
)
def test_retry_after_header_in_each_form(
    wait: float, mode: str, wall_now: float, header: str | None
) -> None:
    assert retry_after_header(wait, mode, wall_now) == header


@pytest.mark.parametrize("mode", ["exact", "ceil", "date"])
@pytest.mark.parametrize("wait", [0.001, 0.3, 1.0, 7.25, 59.999])
def test_the_client_reads_each_form_as_at_least_the_true_wait(mode: str, wait: float) -> None:
    now = 1_700_000_000.4
    header = retry_after_header(wait, mode, now)
    asked = parse_retry_after(header, None, now)
    assert asked is not None
    assert wait <= asked + 1e-9
    assert asked < wait + 1.0 + 1e-9


def test_retry_after_header_refuses_an_unknown_form() -> None:
    with pytest.raises(ValueError, match="Retry-After mode"):
        retry_after_header(1.0, "soon", 0.0)


# -- Faults: selecting the limits -----------------------------------------------------------------


def test_faults_parse_the_limit_fields() -> None:
    faults = Faults.parse(
        "rate_limit=10, burst=1, window_limit=100, window=60, window_kind=sliding,"
        "concurrency_limit=8, limit_retry_after=ceil, seed=3"
    )
    assert faults == Faults(
        seed=3,
        rate_limit=10.0,
        burst=1.0,
        window_limit=100,
        window=60.0,
        window_kind="sliding",
        concurrency_limit=8,
        limit_retry_after="ceil",
    )
    assert isinstance(faults.window_limit, int)
    assert Faults.parse("limit_retry_after=none").limit_retry_after == "none"
    assert Faults.parse("window=0.5,window_limit=2").window == 0.5
    assert Faults.parse("burst=none,rate_limit=3").burst is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("window_kind=rolling", "window_kind must be"),
        ("limit_retry_after=soon", "limit_retry_after must be"),
        ("burst=5", "set rate_limit too"),
        ("window_limit=2.5", "window_limit takes an integer"),
        ("concurrency_limit=x", "concurrency_limit takes an integer"),
        ("rate_limit=fast", "rate_limit takes a number"),
        ("rate_limit=0", "rate must be a positive number"),
        ("rate_limit=5,burst=0.5", "burst must be at least 1"),
        ("window_limit=0", "limit must be a positive number"),
        ("window=0", "window must be a positive number"),
        ("window_limit=3,window=-1", "window must be a positive number"),
        ("concurrency_limit=0", "limit must be a positive number"),
        ("quota=3", "unknown fault"),
    ],
)
def test_faults_refuse_limits_clearly(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Faults.parse(spec)


def test_faults_build_the_limits_they_name() -> None:
    assert repr(Faults().limiter()) == "AllOf()"
    # rate_limit alone: a bucket of one second's worth, as before the shapes were options.
    assert repr(Faults(rate_limit=20).limiter()) == "AllOf(TokenBucket(rate=20, burst=20))"
    assert repr(Faults(rate_limit=0.5).limiter()) == "AllOf(TokenBucket(rate=0.5, burst=1.0))"
    limits = Faults(
        rate_limit=4, burst=1, window_limit=3, window_kind="sliding", concurrency_limit=2
    ).limiter()
    assert repr(limits) == (
        "AllOf(TokenBucket(rate=4, burst=1), SlidingWindow(limit=3, window=1.0),"
        " ConcurrencyCap(limit=2))"
    )
    assert repr(Faults(window_limit=3, window=2).limiter()) == (
        "AllOf(FixedWindow(limit=3, window=2))"
    )
    # Deterministic: two limiters of one Faults admit alike.
    faults = Faults(rate_limit=3, burst=2, window_limit=5)
    assert offer(faults.limiter()) == offer(faults.limiter())


# -- over HTTP: the emulator enforces them ---------------------------------------------------------


@contextmanager
def served(faults: Faults, timing: Timing | None = None) -> Iterator[tuple[Emulator, httpx.Client]]:
    emulator = Emulator(faults=faults, timing=timing, seed=1)
    with (
        serve(emulator) as url,
        httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=GUARD
        ) as http,
    ):
        yield emulator, http


def create(http: httpx.Client, ref: str) -> httpx.Response:
    body = orjson.dumps({"input": [{"client_ref": ref, "text": "x"}]})
    return http.post(ECHO, content=body, headers={"Content-Type": "application/json"})


def burst(http: httpx.Client, n: int) -> list[httpx.Response]:
    """``n`` creates sent back to back."""
    return [create(http, f"r{i}") for i in range(n)]


def refusals(responses: list[httpx.Response]) -> list[httpx.Response]:
    limited = [r for r in responses if r.status_code != 201]
    for r in limited:
        assert r.status_code == 429
        assert r.json() == {
            "code": "RATE_LIMITED",
            "message": "Rate limit exceeded",
            "errors": None,
        }
    return limited


def test_http_token_bucket_admits_its_burst_and_says_the_exact_wait() -> None:
    # One token every 20 s: none comes back while 20 requests are sent.
    with served(Faults(rate_limit=0.05, burst=5, limit_retry_after="exact")) as (emulator, http):
        responses = burst(http, 20)
    limited = refusals(responses)
    assert [r.status_code for r in responses[:5]] == [201] * 5
    assert len(limited) == 15
    assert emulator.accounting().batches_created == 5
    assert emulator.accounting().faults == {"limited": 15}
    waits = [float(r.headers["retry-after"]) for r in limited]
    assert all(0 < w <= 20 for w in waits)
    assert waits == sorted(waits, reverse=True)  # the same token, nearer with every refusal


def test_http_rate_limit_alone_is_todays_bucket_without_a_header() -> None:
    start = time.monotonic()
    with served(Faults(rate_limit=3)) as (emulator, http):
        responses = burst(http, 12)
    elapsed = time.monotonic() - start
    limited = refusals(responses)
    admitted = emulator.accounting().batches_created
    assert 3 <= admitted <= 3 + math.ceil(3 * elapsed)  # a second's worth, then 3 a second
    assert len(limited) == 12 - admitted
    assert all("retry-after" not in r.headers for r in limited)


def test_http_retry_after_still_applies_to_a_limits_429_without_a_form_of_its_own() -> None:
    with served(Faults(rate_limit=1, retry_after=3)) as (_, http):
        responses = burst(http, 3)
    assert [r.headers.get("retry-after") for r in refusals(responses)] == ["3", "3"]
    with served(Faults(rate_limit=1, retry_after=3, limit_retry_after="exact")) as (_, http):
        responses = burst(http, 2)
    assert 0 < float(refusals(responses)[0].headers["retry-after"]) <= 1


def test_http_fixed_window_admits_its_limit_and_says_whole_seconds() -> None:
    faults = Faults(window_limit=4, window=60, limit_retry_after="ceil")
    with served(faults) as (emulator, http):
        responses = burst(http, 12)
    limited = refusals(responses)
    assert emulator.accounting().batches_created == 4
    assert len(limited) == 8
    # The window started at the first request and ends 60 s later, rounded up to whole seconds.
    assert all(30 < int(r.headers["retry-after"]) <= 60 for r in limited)


def test_http_sliding_window_admits_its_limit_and_says_an_http_date() -> None:
    faults = Faults(window_limit=4, window=60, window_kind="sliding", limit_retry_after="date")
    with served(faults) as (emulator, http):
        responses = burst(http, 10)
    limited = refusals(responses)
    assert emulator.accounting().batches_created == 4
    assert len(limited) == 6
    for r in limited:
        when = email.utils.parsedate_to_datetime(r.headers["retry-after"]).timestamp()
        assert time.time() + 30 < when <= time.time() + 61


def held_create(base_url: httpx.URL, ref: str) -> tuple[HTTPConnection, bytes]:
    """A create whose body is sent but for its last byte: the server holds it in flight (past
    every limit) until ``conn.send(rest)`` completes it. Returns the connection and the rest."""
    body = orjson.dumps({"input": [{"client_ref": ref, "text": "x"}]})
    conn = HTTPConnection(base_url.host, base_url.port, timeout=GUARD)
    conn.putrequest("POST", ECHO)
    for name, value in (
        ("Authorization", f"Bearer {API_KEY}"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
    ):
        conn.putheader(name, value)
    conn.endheaders(body[:-1])
    return conn, body[-1:]


def test_http_concurrency_cap_refuses_beyond_its_requests_in_flight() -> None:
    faults = Faults(concurrency_limit=3, limit_retry_after="ceil")
    # Three creates are held in flight (their bodies unfinished) while four others arrive: no
    # timing decides whether those meet a full cap.
    with served(faults) as (emulator, http):
        held = [held_create(http.base_url, f"h{i}") for i in range(3)]
        wait_until(lambda: emulator.accounting().max_creates_in_flight >= 3, "3 creates held")
        responses = burst(http, 4)
        for conn, rest in held:
            conn.send(rest)
            assert conn.getresponse().status == 201
            conn.close()
        after = create(http, "after")  # the slots are free again
    limited = refusals(responses)
    assert len(limited) == 4
    assert {r.headers["retry-after"] for r in limited} == {"1"}  # unknown wait: at least 1 s
    assert after.status_code == 201
    assert emulator.accounting().batches_created == 4


def test_http_limits_combine_and_the_strictest_refuses() -> None:
    faults = Faults(rate_limit=0.05, burst=5, window_limit=3, window=60, limit_retry_after="exact")
    with served(faults) as (emulator, http):
        responses = burst(http, 10)
    limited = refusals(responses)
    assert emulator.accounting().batches_created == 3  # the window's 3, not the bucket's 5
    assert len(limited) == 7
    # The window's wait (to 60 s), not the bucket's (it still holds two tokens).
    assert all(30 < float(r.headers["retry-after"]) <= 60 for r in limited)
