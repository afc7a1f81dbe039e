"""Frame -> JSON items: every common dtype is faithful, everything else is refused clearly."""

from __future__ import annotations

import datetime as dt
import math
from decimal import Decimal
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import pandas as hpd

from runflow_frames import InputError
from runflow_frames._rows import (
    body_suffix,
    chunk_body,
    client_refs,
    encode_rows,
    item_columns,
)


def encode(df: pd.DataFrame, *, key: str | None = None, **options: Any) -> list[dict[str, Any]]:
    """The items run_batches would send for ``df``, decoded back from a request body."""
    refs = client_refs(df, key)
    items = encode_rows(df, refs, item_columns(df, key, None), **options)
    return orjson.loads(chunk_body(items, body_suffix(None, None)))["input"]


def one(values: Any, **series_kwargs: Any) -> list[Any]:
    """The JSON value of each row of a one-column frame ('<missing>' where the field is left out)."""
    df = pd.DataFrame({"v": pd.Series(values, **series_kwargs)})
    return [item.get("v", "<missing>") for item in encode(df)]


@pytest.mark.parametrize(
    ("values", "kwargs", "expected"),
    [
        ([1, 2, -3], {}, [1, 2, -3]),
        ([2**63 - 1, -(2**63)], {"dtype": "int64"}, [2**63 - 1, -(2**63)]),
        ([2**64 - 1], {"dtype": "uint64"}, [2**64 - 1]),
        ([1.5, np.nan, -0.25], {}, [1.5, "<missing>", -0.25]),
        ([1.5, None], {"dtype": "float32"}, [1.5, "<missing>"]),
        ([True, False], {}, [True, False]),
        ([1, None], {"dtype": "Int64"}, [1, "<missing>"]),
        ([True, None], {"dtype": "boolean"}, [True, "<missing>"]),
        ([0.5, None], {"dtype": "Float64"}, [0.5, "<missing>"]),
        (["a", None, "ü"], {}, ["a", "<missing>", "ü"]),
        (["a", None], {"dtype": "string"}, ["a", "<missing>"]),
        (["a", None], {"dtype": "string[pyarrow]"}, ["a", "<missing>"]),
        (["x", "y", None], {"dtype": "category"}, ["x", "y", "<missing>"]),
        ([1, 2, None], {"dtype": pd.CategoricalDtype([1, 2])}, [1, 2, "<missing>"]),
        ([Decimal("1.10"), Decimal("-3"), None], {}, [1.1, -3, "<missing>"]),
        ([dt.date(2024, 2, 29), None], {}, ["2024-02-29", "<missing>"]),
        ([[1, 2], (3, None), np.array([4.5, np.nan])], {}, [[1, 2], [3, None], [4.5, None]]),
        ([{"a": {"b": [1, "x"]}}, {}], {}, [{"a": {"b": [1, "x"]}}, {}]),
        ([np.int32(7), np.float64(2.5), np.bool_(True)], {"dtype": object}, [7, 2.5, True]),
        ([None, pd.NA, pd.NaT, float("nan")], {"dtype": object}, ["<missing>"] * 4),
        ([[1, 2], None], {"dtype": pd.ArrowDtype(pa.list_(pa.int64()))}, [[1, 2], "<missing>"]),
        (
            [{"a": 1, "b": "x"}],
            {"dtype": pd.ArrowDtype(pa.struct([("a", pa.int64()), ("b", pa.string())]))},
            [{"a": 1, "b": "x"}],
        ),
        ([dt.date(2024, 1, 2)], {"dtype": pd.ArrowDtype(pa.date32())}, ["2024-01-02"]),
    ],
)
def test_dtypes_become_faithful_json(
    values: Any, kwargs: dict[str, Any], expected: list[Any]
) -> None:
    assert one(values, **kwargs) == expected


def test_decimal_goes_out_as_an_exact_number() -> None:
    df = pd.DataFrame({"v": [Decimal("0.1000000000000000000001")]})
    assert encode_rows(df, ["0"], ["v"]) == [b'{"client_ref":"0","v":0.1000000000000000000001}']


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            ["2024-01-01T00:00:00", "2024-06-01T12:30:00"],
            ["2024-01-01T00:00:00", "2024-06-01T12:30:00"],
        ),
        (
            ["2024-01-01T00:00:00", "2024-01-01T00:00:00.5"],
            ["2024-01-01T00:00:00", "2024-01-01T00:00:00.500000"],
        ),
        (["2024-01-01T00:00:00.000001"], ["2024-01-01T00:00:00.000001"]),
        (["2024-01-01T00:00:00.000000001"], ["2024-01-01T00:00:00.000000001"]),
        (["2024-01-01T00:00:00", None], ["2024-01-01T00:00:00", "<missing>"]),
    ],
)
@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_naive_datetimes_are_iso_8601_as_timestamp_isoformat_writes_them(
    values: list[str | None], expected: list[str], unit: str
) -> None:
    series = pd.to_datetime(pd.Series(values), format="ISO8601").astype(f"datetime64[{unit}]")
    # Coarser units cannot hold the fraction: compare with what the stored value really is.
    assert one(series) == [v.isoformat() if v is not pd.NaT else "<missing>" for v in series]
    if unit == "ns":
        assert one(series) == expected


def test_a_values_text_does_not_depend_on_the_other_rows() -> None:
    # A resumed or grown job must encode a recorded row to the same bytes.
    alone = one(pd.to_datetime(pd.Series(["2024-01-01T00:00:00"])))
    with_fraction = one(
        pd.to_datetime(
            pd.Series(["2024-01-01T00:00:00", "2024-01-01T00:00:00.5"]), format="ISO8601"
        )
    )
    assert with_fraction[0] == alone[0] == "2024-01-01T00:00:00"
    df = pd.DataFrame(
        {"v": [1, 2]},
        index=pd.to_datetime(["2024-01-01T00:00:00", "2024-01-01T00:00:00.25"], format="ISO8601"),
    )
    assert client_refs(df, None) == ["2024-01-01T00:00:00", "2024-01-01T00:00:00.250000"]


def test_odd_historical_offsets_keep_their_seconds() -> None:
    series = pd.Series([pd.Timestamp("1900-01-01", tz="Europe/Paris")])
    assert one(series) == [series[0].isoformat()] == ["1900-01-01T00:00:00+00:09:21"]


def test_datetime_arrays_and_nat_inside_object_columns() -> None:
    cells = [
        np.array(["2024-01-01T00:00:00.123456789"], dtype="datetime64[ns]"),
        np.array(5),
        np.datetime64("NaT"),
    ]
    assert one(cells, dtype=object) == [["2024-01-01T00:00:00.123456789"], 5, "<missing>"]


def test_aware_datetimes_keep_their_offset_across_dst() -> None:
    series = pd.Series(pd.date_range("2024-03-31 00:00", periods=3, freq="2h", tz="Europe/Paris"))
    assert one(series) == [
        "2024-03-31T00:00:00+01:00",
        "2024-03-31T03:00:00+02:00",
        "2024-03-31T05:00:00+02:00",
    ]
    utc = pd.Series([pd.Timestamp("2024-01-01 10:00", tz="UTC"), pd.NaT])
    assert one(utc) == ["2024-01-01T10:00:00+00:00", "<missing>"]
    india = pd.Series([pd.Timestamp("2024-01-01 10:00", tz="Asia/Kolkata")])
    assert one(india) == ["2024-01-01T10:00:00+05:30"]


def test_datetimes_inside_objects_use_isoformat() -> None:
    values = [
        dt.datetime(2024, 1, 1, 9, tzinfo=dt.UTC),
        {"at": pd.Timestamp("2024-01-01 09:00:00.000000001")},
    ]
    assert one(values, dtype=object) == [
        "2024-01-01T09:00:00+00:00",
        {"at": "2024-01-01T09:00:00.000000001"},
    ]


def test_missing_values_can_be_sent_as_null() -> None:
    df = pd.DataFrame({"a": [1.0, np.nan], "b": ["x", None]})
    assert encode(df, missing="null") == [
        {"client_ref": "0", "a": 1.0, "b": "x"},
        {"client_ref": "1", "a": None, "b": None},
    ]
    assert encode(df) == [{"client_ref": "0", "a": 1.0, "b": "x"}, {"client_ref": "1"}]


@pytest.mark.parametrize(
    ("values", "kwargs", "reason"),
    [
        ([1.0, math.inf], {}, "infinity"),
        ([1.0, -math.inf], {"dtype": "Float64"}, "infinity"),
        ([b"raw", "ok"], {}, "bytes"),
        ([{1: "int key"}, {}], {}, "not a string"),
        ([object(), 1], {"dtype": object}, "object values"),
        ([{1, 2}, None], {}, "set values"),
        ([Decimal("NaN"), Decimal(1)], {}, "Decimal NaN"),
        ([2**70, 1], {"dtype": object}, "beyond 64 bits"),
        ([[1.0, math.inf], []], {}, "infinity"),
        (pd.to_timedelta(["1s", "2s"]), {}, "timedeltas"),
        ([pd.Timedelta("1s"), 1], {"dtype": object}, "timedeltas"),
        ([np.array([1, 2], dtype="timedelta64[s]"), 1], {"dtype": object}, "timedeltas"),
        (pd.period_range("2024-01", periods=2, freq="M"), {}, "period"),
        (pd.interval_range(0, 2), {}, "interval"),
        (["ok", "bad \ud800 text"], {"dtype": object}, "surrogate"),
    ],
)
def test_values_json_cannot_carry_are_refused_naming_column_and_key(
    values: Any, kwargs: dict[str, Any], reason: str
) -> None:
    keys = ["row-a", "row-b"]
    df = pd.DataFrame({"fine": [1, 2], "bad": pd.Series(values, index=keys, **kwargs)}, index=keys)
    with pytest.raises(InputError, match=reason) as info:
        encode(df)
    assert info.value.column == "bad"
    assert "'bad'" in str(info.value)
    assert "row-a" in str(info.value) or "row-b" in str(info.value)
    assert info.value.keys
    assert set(info.value.keys) <= {"row-a", "row-b"}


def test_a_refusal_lists_every_offending_key_and_counts_them() -> None:
    df = pd.DataFrame({"v": [math.inf] * 8}, index=[f"k{i}" for i in range(8)])
    with pytest.raises(InputError, match="8 value") as info:
        encode(df)
    assert info.value.keys == [f"k{i}" for i in range(8)]
    assert "and 3 more" in str(info.value)


@pytest.mark.parametrize(
    ("index", "message"),
    [
        (pd.Index([1, None, 3], dtype=object), "null key"),
        (pd.Index(["a", "b", "a"]), "not unique"),
        (pd.Index([1, "1", 2], dtype=object), "not unique"),
        (pd.Index(["ok", "x" * 256, "y"]), "longer than 255"),
        (pd.Index(["ok", "", "y"]), "empty string"),
        (pd.MultiIndex.from_tuples([(1, 2), (1, 3), (2, 2)]), "MultiIndex"),
        (pd.Index([object(), object(), object()]), "no stable string form"),
        (pd.Index(["a", " b", "c"]), "whitespace"),
        (pd.Index(["a", "b\n", "c"]), "whitespace"),
    ],
)
def test_bad_index_keys_are_refused(index: pd.Index, message: str) -> None:
    df = pd.DataFrame({"v": [1, 2, 3]}, index=index)
    with pytest.raises(InputError, match=message):
        client_refs(df, None)


def test_key_column_is_used_and_left_out_of_the_items() -> None:
    df = pd.DataFrame({"id": ["a", "b"], "v": [1, 2]})
    assert encode(df, key="id") == [{"client_ref": "a", "v": 1}, {"client_ref": "b", "v": 2}]
    with pytest.raises(InputError, match="not in the frame"):
        client_refs(df, "nope")
    df2 = pd.DataFrame({"id": ["a", None], "v": [1, 2]})
    with pytest.raises(InputError, match="null key") as info:
        client_refs(df2, "id")
    assert info.value.column == "id"


def test_key_strings() -> None:
    df = pd.DataFrame(
        {"v": [1, 2]}, index=pd.to_datetime(["2024-01-01T00:00:00", "2024-01-01T00:00:01"])
    )
    assert client_refs(df, None) == ["2024-01-01T00:00:00", "2024-01-01T00:00:01"]
    assert client_refs(pd.DataFrame({"v": [1]}, index=[1.5]), None) == ["1.5"]
    assert client_refs(pd.DataFrame({"v": [1]}, index=[np.int64(7)]), None) == ["7"]


def test_column_choice_and_collisions() -> None:
    df = pd.DataFrame({"a": [1], "b": [2], "c": [3]})
    assert item_columns(df, None, ["c", "a"]) == ["c", "a"]
    assert item_columns(df, "b", None) == ["a", "c"]
    with pytest.raises(InputError, match="not in the frame"):
        item_columns(df, None, ["zz"])
    with pytest.raises(InputError, match="client_ref"):
        item_columns(pd.DataFrame({"client_ref": [1]}), None, None)
    with pytest.raises(InputError, match="not a string"):
        item_columns(pd.DataFrame({0: [1]}), None, None)
    with pytest.raises(InputError, match="duplicate column"):
        item_columns(pd.DataFrame([[1, 2]], columns=["a", "a"]), None, None)


@pytest.mark.parametrize(
    ("metadata", "callback_url"),
    [(None, None), ({"m": [1, {"x": None}]}, None), (None, "https://cb"), ({}, "https://cb")],
)
def test_bodies_are_exactly_what_orjson_writes_for_the_whole_request(
    metadata: dict[str, Any] | None, callback_url: str | None
) -> None:
    df = pd.DataFrame({"v": [1.5, 2.0], "s": ["x", None]}, index=["a", "b"])
    items = encode_rows(df, ["a", "b"], ["v", "s"])
    expected: dict[str, Any] = {
        "input": [{"client_ref": "a", "v": 1.5, "s": "x"}, {"client_ref": "b", "v": 2.0}]
    }
    if metadata is not None:
        expected["metadata"] = metadata
    if callback_url is not None:
        expected["callback_url"] = callback_url
    assert chunk_body(items, body_suffix(metadata, callback_url)) == orjson.dumps(expected)


def test_metadata_json_cannot_carry_is_refused() -> None:
    with pytest.raises(InputError, match="metadata"):
        body_suffix({"when": object()}, None)


def test_encoding_in_blocks_matches_row_by_row() -> None:
    df = pd.DataFrame({"v": np.arange(45_000) / 3, "s": [f"s{i}" for i in range(45_000)]})
    refs = client_refs(df, None)
    items = encode_rows(df, refs, ["v", "s"])
    assert len(items) == 45_000
    assert orjson.loads(items[44_999]) == {"client_ref": "44999", "v": 44_999 / 3, "s": "s44999"}
    assert orjson.loads(items[20_000]) == {"client_ref": "20000", "v": 20_000 / 3, "s": "s20000"}


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(
    hpd.data_frames(
        columns=[
            hpd.column("i", dtype="int64"),
            hpd.column("f", elements=st.floats(allow_nan=True, allow_infinity=False)),
            hpd.column("s", elements=st.one_of(st.none(), st.text())),
            hpd.column("b", dtype=bool),
        ],
        index=hpd.range_indexes(min_size=1, max_size=50),
    )
)
def test_any_finite_frame_round_trips_through_json(df: pd.DataFrame) -> None:
    items = encode(df)
    assert [i["client_ref"] for i in items] == [str(k) for k in df.index]
    for item, (_, row) in zip(items, df.iterrows(), strict=True):
        assert item["i"] == row["i"]
        assert item["b"] == row["b"]
        if pd.isna(row["f"]):
            assert "f" not in item
        else:
            assert item["f"] == row["f"]
        if row["s"] is None or (isinstance(row["s"], float) and math.isnan(row["s"])):
            assert "s" not in item
        else:
            assert item["s"] == row["s"]


_SCALARS = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8)
# What could look like the cut between two items, inside values.
_TRAPS = st.sampled_from(['},{"client_ref":', "client_ref", '"}]', "},{", "\\", ""])
_VALUES = st.recursive(
    _SCALARS | _TRAPS | st.floats(allow_nan=True, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(_TRAPS | st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=200)
@given(
    st.lists(st.tuples(_VALUES, _VALUES), max_size=30),
    st.sampled_from(["omit", "null"]),
)
@example([([{}, {"client_ref": 1}], 1), ("x", None)], "omit")  # the cut, nested
def test_items_are_byte_for_byte_what_one_dumps_per_item_gives(
    rows: list[tuple[Any, Any]], missing: Any
) -> None:
    """Rows are encoded a block at a time and cut apart; nested values that hold the cut, and
    missing values, must not change a byte."""
    refs = [f"r{i}" for i in range(len(rows))]
    index = pd.Index(refs, dtype=object)
    df = pd.DataFrame(
        {n: pd.Series([r[k] for r in rows], dtype=object, index=index) for k, n in enumerate("ab")}
    )
    expected = []
    for ref, (a, b) in zip(refs, rows, strict=True):
        item: dict[str, Any] = {"client_ref": ref}
        for name, v in (("a", a), ("b", b)):
            if v is None or (isinstance(v, float) and math.isnan(v)):
                if missing == "null":
                    item[name] = None
                continue
            item[name] = v
        expected.append(orjson.dumps(item))
    assert encode_rows(df, refs, ["a", "b"], missing=missing) == expected
