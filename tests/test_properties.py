"""Invariants over any frame: every row is submitted exactly once and gets exactly its handle."""

from __future__ import annotations

import httpx
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runflow_frames import run_batches
from runflow_frames.emulator import Emulator, create_app

from .conftest import API_KEY

ints = st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=1000, unique=True)
# Keys the library accepts: non-empty, no surrounding whitespace, valid Unicode text.
key_text = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40).filter(
    lambda t: t == t.strip()
)
texts = st.lists(key_text, min_size=1, max_size=1000, unique=True)
times = st.lists(
    st.datetimes(
        min_value=pd.Timestamp("1970-01-01").to_pydatetime(),
        max_value=pd.Timestamp("2200-01-01").to_pydatetime(),
    ),
    min_size=1,
    max_size=1000,
    unique=True,
)
indexes = st.one_of(
    ints.map(pd.Index),
    texts.map(lambda v: pd.Index(v, dtype=object)),
    times.map(pd.DatetimeIndex),
)


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=indexes, chunk_size=st.integers(1, 100), concurrency=st.integers(1, 16), data=st.data()
)
def test_every_row_exactly_once_with_its_own_handle(
    index: pd.Index, chunk_size: int, concurrency: int, data: st.DataObject
) -> None:
    n = len(index)
    values = data.draw(st.lists(st.integers(0, 10**6), min_size=n, max_size=n))
    df = pd.DataFrame({"v": values}, index=index).sample(frac=1, random_state=n)  # any order
    emulator = Emulator()
    out = run_batches(
        df,
        "acme",
        "echo",
        chunk_size=chunk_size,
        max_concurrency=concurrency,
        api_key=API_KEY,
        base_url="http://localhost",
        transport=httpx.ASGITransport(app=create_app(emulator)),
    )
    refs = out["runflow_client_ref"].tolist()
    seen = emulator.accounting()
    assert seen.runs_by_client_ref == dict.fromkeys(refs, 1)
    assert seen.batches_created == -(-n // chunk_size)
    assert out.index.equals(df.index)
    received = {r["client_ref"]: r for r in emulator.received()}
    for ref, v, run_id in zip(refs, out["v"], out["runflow_run_id"], strict=True):
        assert received[ref]["input"] == {"v": v}
        assert received[ref]["run_id"] == run_id
