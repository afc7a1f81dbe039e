"""What the server says, distrusted: its text is redacted before it is shown anywhere."""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
import httpx
import numpy as np
import orjson
import pandas as pd
import pytest

import runflow_frames
from runflow_frames._client import AsyncRunflowClient, redact
from runflow_frames._errors import APIStatusError
from runflow_frames._retry import RetryPolicy

from .conftest import API_KEY

FAST = RetryPolicy(attempts=3, wait_initial=0.005, wait_max=0.05, timeout=30)


def frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({"v": np.arange(n)}, index=pd.Index([f"k{i:05d}" for i in range(n)]))


# -- server text is redacted -----------------------------------------------------------------------


def echoing(status: int, *, raw: bool = False) -> Callable[[httpx.Request], httpx.Response]:
    """A proxy that answers ``status`` and echoes the request's headers into the body."""

    def handler(request: httpx.Request) -> httpx.Response:
        auth = request.headers["authorization"]
        if raw:
            page = f"<html><pre>Bad gateway\nAuthorization: {auth}\nHost: api.example</pre>"
            return httpx.Response(status, content=page.encode())
        body = {
            "code": f"ECHO {auth}",
            "message": f"rejected: you sent Authorization: {auth}, host api.example",
            "errors": [
                {"loc": ["header", "authorization"], "msg": f"got {auth}", "type": "echo"},
                {"headers": {"Authorization": auth, "Accept": "application/json"}},
            ],
        }
        return httpx.Response(status, content=orjson.dumps(body), headers={"x-request-id": auth})

    return handler


def status_error(
    handler: Callable[[httpx.Request], httpx.Response], key: str = API_KEY
) -> APIStatusError:
    async def main() -> APIStatusError:
        transport = httpx.MockTransport(handler)
        client = AsyncRunflowClient(
            api_key=key, base_url="https://api.example", transport=transport
        )
        async with client:
            with pytest.raises(APIStatusError) as info:
                await client.get_batch("b1")
        return info.value

    return anyio.run(main)


@pytest.mark.parametrize(("status", "raw"), [(400, False), (422, False), (500, False), (502, True)])
def test_an_echoed_authorization_header_never_reaches_an_error(status: int, raw: bool) -> None:
    exc = status_error(echoing(status, raw=raw))
    shown = [str(exc), repr(exc), repr(exc.errors), repr(exc.code), repr(exc.request_id)]
    for text in shown:
        assert API_KEY not in text
        assert "rf_live_" not in text
    assert "[redacted]" in str(exc)
    assert exc.status_code == status
    if not raw:
        assert exc.code is not None
        assert "[redacted]" in exc.code
        assert exc.errors is not None
        assert exc.errors[0]["msg"] == "got Bearer [redacted]"
        assert exc.errors[1]["headers"] == {
            "Authorization": "[redacted]",
            "Accept": "application/json",
        }
        assert "host api.example" not in str(exc)  # an Authorization value runs to the line's end


def test_a_key_of_any_shape_is_redacted_verbatim_and_text_is_cut() -> None:
    key = "plainSecret0123456789"

    def handler(request: httpx.Request) -> httpx.Response:
        message = f"token {key} refused " + "x" * 10_000
        return httpx.Response(401, content=orjson.dumps({"code": key, "message": message}))

    exc = status_error(handler, key=key)
    assert key not in str(exc)
    assert exc.code == "[redacted]"
    assert "token [redacted] refused" in str(exc)
    assert len(str(exc)) < 800  # at most 500 characters of what the server said


@pytest.mark.parametrize(
    "text",
    [
        "missing bearer token",
        "invalid API key",
        "perf_test_results are in",
        "model 'acme/echo' not found",
    ],
)
def test_ordinary_server_text_is_left_alone(text: str) -> None:
    assert redact(text) == text


def test_rejected_rows_runflow_error_never_holds_the_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="runflow_frames")
    out = runflow_frames.run_batches(
        frame(30),
        "acme",
        "echo",
        api_key=API_KEY,
        base_url="https://api.example",
        transport=httpx.MockTransport(echoing(422)),
        errors="keep",
        retry=FAST,
    )
    errors = out["runflow_error"]
    assert errors.notna().all()
    assert not errors.str.contains(API_KEY, regex=False).any()
    assert errors.str.contains("[redacted]", regex=False).all()
    assert API_KEY not in caplog.text
