"""Shared fixtures: an emulator per test, served over real loopback HTTP or mounted in-process."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from runflow_frames.emulator import Emulator, create_app, serve

API_KEY = "rf_live_test_secret_0123456789"
# Read once, before the autouse fixture below hides it from every other test.
LIVE_API_KEY = os.environ.get("RUNFLOW_API_KEY")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--live", action="store_true", help="also run tests that call the real api.runflow.io"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--live"):
        return
    skip = pytest.mark.skip(reason="talks to the real API: pass --live and set RUNFLOW_API_KEY")
    for item in items:
        if "live" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_runflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never reach api.runflow.io by accident through a developer's environment.
    for name in ("RUNFLOW_API_KEY", "RUNFLOW_BASE_URL", "RUNFLOW_ORG_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def emulator() -> Emulator:
    return Emulator(seed=1)


@pytest.fixture
def base_url(emulator: Emulator) -> Iterator[str]:
    """The emulator served on a free loopback port: real server, real sockets."""
    with serve(emulator) as url:
        yield url


@pytest.fixture
def asgi(emulator: Emulator) -> httpx.ASGITransport:
    """The emulator mounted in-process, for fast tests."""
    return httpx.ASGITransport(app=create_app(emulator))


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    """A raw HTTP client on the served emulator, authenticated, for contract tests."""
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c
