"""Value hashes: a resume trusts them to say a recorded row did not change, so two rows of a
column must hash alike exactly when they encode alike; and a frame they cannot vouch for gets
none (every row is then encoded and compared by its bytes)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runflow_frames import InputError
from runflow_frames._items import UNKNOWN, Items, value_hashes
from runflow_frames._rows import encode_rows


def hashes_and_bytes(values: list[Any], dtype: Any = None) -> tuple[list[int], list[bytes]]:
    refs = [f"r{i}" for i in range(len(values))]
    df = pd.DataFrame({"v": pd.Series(values, dtype=dtype, index=refs)})
    hashes = value_hashes(df, refs, ["v"])
    assert hashes is not None
    # The ref is part of the bytes, not of the hash: compare the items without it.
    items = [
        b.replace(f'"client_ref":"{r}"'.encode(), b"")
        for r, b in zip(refs, encode_rows(df, refs, ["v"]), strict=True)
    ]
    return hashes.tolist(), items


def alike_exactly_when_encoded_alike(values: list[Any], dtype: Any = None) -> None:
    hashes, items = hashes_and_bytes(values, dtype)
    assert UNKNOWN not in hashes
    assert any(b'"v":' in item for item in items)  # the values did reach the column
    for i in range(len(values)):
        for j in range(len(values)):
            assert (hashes[i] == hashes[j]) == (items[i] == items[j]), (values[i], values[j])


@given(st.lists(st.floats(allow_infinity=False), min_size=2, max_size=8))
def test_floats_hash_alike_exactly_when_they_encode_alike(values: list[float]) -> None:
    alike_exactly_when_encoded_alike([*values, 0.0, -0.0, float("nan")])


@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=2, max_size=8))
def test_integers_hash_alike_exactly_when_they_encode_alike(values: list[int]) -> None:
    alike_exactly_when_encoded_alike(values, "int64")
    alike_exactly_when_encoded_alike([*values, None], "Int64")


@given(st.lists(st.none() | st.text(st.characters(exclude_categories=["Cs"])), min_size=2))
def test_text_hashes_alike_exactly_when_it_encodes_alike(values: list[str | None]) -> None:
    alike_exactly_when_encoded_alike([*values, "", None], object)
    alike_exactly_when_encoded_alike([*values, "", None], "string")


def test_booleans_and_datetimes() -> None:
    alike_exactly_when_encoded_alike([True, False, True, None], "boolean")
    alike_exactly_when_encoded_alike([True, False, True])
    stamps = ["2024-01-01", "2024-01-01T00:00:00.000001", "2024-01-01", None]
    alike_exactly_when_encoded_alike(pd.to_datetime(stamps, format="ISO8601").tolist())


def test_the_same_bits_in_another_dtype_or_column_hash_differently() -> None:
    df = pd.DataFrame(
        {"i": [4607182418800017408], "f": [1.0], "g": [1.0]}, index=["r0"]
    )  # 1.0's bits as an integer
    ((i,), (f,), (g,)) = (value_hashes(df, ["r0"], [c]).tolist() for c in "ifg")  # type: ignore[union-attr]
    assert len({i, f, g}) == 3
    both = value_hashes(df, ["r0"], ["f", "g"])
    assert both is not None
    assert both.tolist() not in ([f], [g])


@pytest.mark.parametrize(
    ("column", "why"),
    [
        ([{"a": 1}, {"a": 2}], "dicts"),
        ([[1], [2]], "lists"),
        (["a", 1], "mixed"),
        (pd.Categorical(["a", "b"]), "categorical"),
        (pd.to_datetime(["2024-01-01", "2024-01-02"]).tz_localize("UTC"), "time zone"),
        ([1.0, float("inf")], "infinity"),
        (pd.array([1.0, float("inf")], dtype="Float64"), "infinity, masked"),
        (pd.Series(["a", "b\ud800"], dtype=object, index=["r0", "r1"]), "lone surrogate"),
    ],
)
def test_no_hashes_for_what_they_cannot_vouch_for(column: Any, why: str) -> None:
    df = pd.DataFrame({"v": column}, index=["r0", "r1"])
    assert value_hashes(df, ["r0", "r1"], ["v"]) is None, why


def test_no_hashes_for_a_key_or_name_that_will_not_encode() -> None:
    df = pd.DataFrame({"v": [1, 2]}, index=["r0", "r1"])
    assert value_hashes(df, ["r0", "r\ud800"], ["v"]) is None
    df.columns = pd.Index(["v\ud800"], dtype=object)
    assert value_hashes(df, ["r0", "r1"], ["v\ud800"]) is None


def test_without_hashes_every_row_is_encoded_at_once_so_bad_values_are_refused_first() -> None:
    df = pd.DataFrame({"v": [1.0, float("inf")]}, index=["r0", "r1"])
    with pytest.raises(InputError, match=r"column 'v'.*infinity.*'r1'"):
        Items(df, ["r0", "r1"], ["v"], "omit")
    fine = pd.DataFrame({"v": [{"a": 1}, None]}, index=["r0", "r1"])
    items = Items(fine, ["r0", "r1"], ["v"], "omit")
    assert items.hashes is None
    assert items.take([0, 1]) == [b'{"client_ref":"r0","v":{"a":1}}', b'{"client_ref":"r1"}']


def test_with_hashes_rows_are_encoded_when_asked_and_as_encode_rows_would() -> None:
    df = pd.DataFrame(
        {"t": ["x", None, "z"], "d": [dt.datetime(2024, 1, 1), None, dt.datetime(2024, 1, 2)]},
        index=["a", "b", "c"],
    )
    items = Items(df, ["a", "b", "c"], ["t", "d"], "null")
    assert items.hashes is not None
    with pytest.raises(AssertionError):
        items.take([2])  # not encoded yet
    items.encode([2, 0])
    assert items.take([0, 2]) == [
        encode_rows(df, ["a", "b", "c"], ["t", "d"], missing="null")[i] for i in (0, 2)
    ]
    assert items.digests([1]).dtype == np.int64
