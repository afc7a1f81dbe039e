"""Frame -> request bodies: row keys become ``client_ref``s, values become faithful JSON (pure).

Everything here runs before the first request, so every refusal (duplicate or null keys, values
JSON cannot carry) happens while nothing has been sent. Columns are converted column-wise, with
vectorised fast paths for numeric, boolean and datetime dtypes, and a per-value path for object
and extension dtypes.

JSON mapping (documented in the README):

- integers, booleans, strings: as themselves; floats as numbers, NaN is a missing value,
  infinities are refused;
- ``Decimal``: an exact JSON number (``Decimal("1.10")`` goes out as ``1.10``);
- datetimes: ISO 8601, with the offset when time-zone aware, at the finest unit the column needs
  (``2024-01-01T12:00:00``, ``2024-01-01T12:00:00.123456789+01:00``); dates: ``2024-01-01``;
- categoricals: their category values; lists, tuples, arrays, dicts and nested Arrow types: arrays
  and objects, recursively (a missing value inside them is ``null``);
- missing values (None, NaN, NaT, pd.NA) in a column: the field is left out of the item, or sent
  as ``null`` with ``missing="null"``;
- anything else (bytes, timedeltas, sets, arbitrary objects, dicts with non-string keys,
  integers beyond 64 bits): refused, naming the column and the row keys.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Literal, cast

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa

from ._errors import InputError

MAX_CLIENT_REF_LEN: Final = 255
MAX_CHUNK_SIZE: Final = 100
MAX_CALLBACK_URL_LEN: Final = 2048
CLIENT_REF_FIELD: Final = "client_ref"

# Rows converted at a time: bounds the Python objects alive during encoding.
_BLOCK_ROWS: Final = 20_000
# Offending keys named in an error message; the rest are counted.
_KEYS_SHOWN: Final = 5

Missing = Literal["omit", "null"]


class _MissingType:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _MissingType()
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1
_Unit = Literal["s", "ms", "us", "ns"]
_PER_SECOND: Final[dict[_Unit, int]] = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


@dataclass(frozen=True, slots=True)
class Chunk:
    """One request's worth of rows: their client_refs in order, the exact body to POST, and the
    ``Idempotency-Key`` that every POST of this body carries."""

    number: int
    rows: tuple[int, ...]  # positions in the frame
    refs: tuple[str, ...]
    body: bytes
    key: str
    resent: bool = False  # an intent from an earlier run: it may already exist on the server


class _Unencodable(Exception):  # noqa: N818 - internal signal, never escapes this module
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# keys


def client_refs(df: pd.DataFrame, key: Hashable | None) -> list[str]:
    """The ``client_ref`` of every row: the string form of the index, or of column ``key``.

    Refuses null, empty, over-long and duplicate keys (duplicates after conversion to strings
    too: ``1`` and ``"1"`` would be the same ``client_ref``).
    """
    if key is None:
        if isinstance(df.index, pd.MultiIndex):
            raise InputError(
                "a MultiIndex cannot be a row key; pass key='<column>' or reset_index() first"
            )
        keys = pd.Series(df.index, index=df.index)
        where = "index"
    else:
        if key not in df.columns:
            raise InputError(f"key column {key!r} is not in the frame", column=str(key))
        keys = df[key]
        if isinstance(keys, pd.DataFrame):
            raise InputError(f"key column {key!r} appears more than once", column=str(key))
        where = f"key column {key!r}"

    nulls = keys.isna().to_numpy()
    if nulls.any():
        positions = np.flatnonzero(nulls)
        raise InputError(
            f"{where} has {len(positions)} null key(s), at row position(s) "
            f"{_show(positions.tolist())}; every row needs a unique, non-null key",
            column=None if key is None else str(key),
            keys=[None] * len(positions),
        )

    if isinstance(keys.dtype, np.dtype) and keys.dtype.kind in "iu":  # the common RangeIndex
        refs: list[str] = list(map(str, keys.to_numpy().tolist()))
        # Their text is short, trimmed and never empty, and unique when the integers are.
        if keys.is_unique:
            return refs
    else:
        refs = _key_strings(keys, where)
    if max(map(len, refs), default=0) > MAX_CLIENT_REF_LEN:
        too_long = [r for r in refs if len(r) > MAX_CLIENT_REF_LEN]
        raise InputError(
            f"{where}: {len(too_long)} key(s) are longer than {MAX_CLIENT_REF_LEN} characters "
            f"as strings, e.g. {too_long[0][:40]!r}...",
            keys=too_long,
        )
    unique = set(refs)
    if "" in unique:
        raise InputError(f"{where}: the empty string cannot be a row key", keys=[""])
    # The contract says client_ref is "stripped": if the server trims whitespace, such keys
    # would come back different and could not be joined. Refuse them up front.
    padded = [r for r in refs if r != r.strip()]
    if padded:
        raise InputError(
            f"{where}: {len(padded)} key(s) start or end with whitespace, e.g. {padded[0]!r}; "
            "strip them first (the API may trim client_ref)",
            column=None if key is None else str(key),
            keys=padded,
        )
    if len(unique) != len(refs):
        ref_index = pd.Index(refs)
        dup = ref_index[ref_index.duplicated(keep=False)]
        originals = keys[ref_index.isin(dup)].tolist()
        raise InputError(
            f"{where}: {dup.nunique()} key(s) are not unique as strings: "
            f"{_show(sorted(set(dup.tolist())))} (rows {_show(originals)})",
            column=None if key is None else str(key),
            keys=sorted(set(dup.tolist())),
        )
    return refs


def _key_strings(keys: pd.Series, where: str) -> list[str]:
    dtype = keys.dtype
    if dtype.kind == "M" or isinstance(dtype, pd.DatetimeTZDtype):
        return [str(v) for v in _datetime_strings(keys)]
    if isinstance(dtype, pd.StringDtype):  # nulls were refused above
        strings: list[str] = keys.to_numpy(dtype=object).tolist()
        return strings
    out: list[str] = []
    for value in keys.tolist():
        v = value.item() if isinstance(value, np.generic) else value
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, bool | int | Decimal):
            out.append(str(v))
        elif isinstance(v, float):
            out.append(repr(v))
        elif isinstance(v, dt.datetime | dt.date):
            out.append(v.isoformat())
        else:
            raise InputError(
                f"{where}: key {value!r} of type {type(value).__name__} has no stable string "
                "form; use strings, integers or datetimes as keys",
                keys=[value],
            )
    return out


# ---------------------------------------------------------------------------------------------
# values


def item_columns(
    df: pd.DataFrame, key: Hashable | None, columns: Sequence[Hashable] | None
) -> list[str]:
    """The columns that become item fields: ``columns``, or every column but the key."""
    chosen: list[Hashable]
    if columns is None:
        chosen = [c for c in df.columns if key is None or c != key]
    else:
        chosen = list(columns)
        missing = [c for c in chosen if c not in df.columns]
        if missing:
            raise InputError(f"columns not in the frame: {_show(missing)}")
        if len(set(chosen)) != len(chosen):
            raise InputError("columns= names a column more than once")
    if not df.columns.is_unique:
        dup = [c for c in chosen if (df.columns == c).sum() > 1]
        if dup:
            raise InputError(f"the frame has duplicate column names: {_show(dup)}")
    names: list[str] = []
    for c in chosen:
        if not isinstance(c, str):
            raise InputError(
                f"column name {c!r} is not a string; JSON field names must be strings "
                "(rename it, e.g. df.columns = df.columns.map(str))",
                column=str(c),
            )
        if c == CLIENT_REF_FIELD:
            raise InputError(
                f"column {c!r} would collide with the item's client_ref; pass key={c!r} to use "
                "it as the row key, or rename it",
                column=c,
            )
        names.append(c)
    return names


def column_values(series: pd.Series, name: str, refs: Sequence[str]) -> list[Any]:
    """JSON-ready values of one column; ``MISSING`` marks a missing value.

    Raises InputError naming the column and the keys of the rows it cannot encode.
    """
    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        return _each(series.tolist(), name, refs)
    if isinstance(dtype, np.dtype):
        return _numpy_values(series, name, refs)
    if isinstance(dtype, pd.DatetimeTZDtype):
        return _datetime_strings(series)
    if isinstance(dtype, pd.StringDtype):  # pandas' text columns: str or missing, nothing else
        strings: list[Any] = series.to_numpy(dtype=object).tolist()
        for i in np.flatnonzero(series.isna().to_numpy()).tolist():
            strings[i] = MISSING
        return strings
    if isinstance(dtype, pd.PeriodDtype | pd.IntervalDtype | pd.SparseDtype):
        raise _refusal(
            name,
            refs[:1],
            f"{dtype} values have no faithful JSON form; convert them first, e.g. s.astype(str)",
        )
    try:
        array = pa.array(series, from_pandas=True)
    except (pa.ArrowException, TypeError, ValueError):
        return _each(series.tolist(), name, refs)
    # Extension dtypes (Int64, boolean, Float64, string, Arrow types): Arrow gives us Python
    # values with None for missing ones; _each then normalises them. An Arrow map (at any
    # depth) is a JSON object, not a list of pairs; one that repeats a key is refused.
    try:
        values = array.to_pylist(maps_as_pydicts="strict")
    except KeyError:
        bad = [refs[i] for i, value in enumerate(array) if _repeats_a_key(value)]
        raise _refusal(name, bad, "a map repeats a key, which a JSON object cannot") from None
    return _each(values, name, refs)


def _repeats_a_key(value: pa.Scalar) -> bool:
    try:
        value.as_py(maps_as_pydicts="strict")
    except KeyError:
        return True
    return False


def _numpy_values(series: pd.Series, name: str, refs: Sequence[str]) -> list[Any]:
    """``column_values`` of a column with a numpy dtype."""
    kind = series.dtype.kind
    if kind in "biu":
        ints: list[Any] = series.to_numpy().tolist()
        return ints
    if kind == "f":
        arr = series.to_numpy()
        inf = np.isinf(arr)
        if inf.any():
            bad = [refs[i] for i in np.flatnonzero(inf).tolist()]
            raise _refusal(name, bad, "infinity has no JSON representation")
        values: list[Any] = arr.tolist()
        for i in np.flatnonzero(np.isnan(arr)).tolist():
            values[i] = MISSING
        return values
    if kind == "M":
        return _datetime_strings(series)
    if kind == "m":
        raise _refusal(
            name,
            refs[:1],
            "timedeltas have no JSON form; convert them first, e.g. "
            "s.dt.total_seconds() or s.astype(str)",
        )
    return _each(series.tolist(), name, refs)  # object, bytes and str columns


def _each(values: list[Any], name: str, refs: Sequence[str]) -> list[Any]:
    bad: list[str] = []
    reason = ""
    for i, v in enumerate(values):
        try:
            values[i] = _top(v)
        except _Unencodable as exc:
            if not bad:
                reason = exc.reason
            bad.append(refs[i])
    if bad:
        raise _refusal(name, bad, reason)
    return values


def _top(v: Any) -> Any:
    """A column value: missing values become MISSING, the rest goes through _json."""
    if v is None or v is pd.NaT or v is pd.NA:
        return MISSING
    if isinstance(v, float | np.floating) and math.isnan(v):
        return MISSING
    if isinstance(v, np.datetime64 | np.timedelta64) and np.isnat(v):
        return MISSING
    return _json(v)


def _json(v: Any) -> Any:
    # Order: most common types first; the rest in _json_other.
    if isinstance(v, str | bool):
        return v
    if isinstance(v, int):
        if not _INT64_MIN <= v <= _UINT64_MAX:
            raise _Unencodable(f"integer {v} is beyond 64 bits")
        return v
    if isinstance(v, float):
        if math.isinf(v):
            raise _Unencodable("infinity has no JSON representation")
        return None if math.isnan(v) else float(v)  # float(): np.float64 is a float subclass
    if v is None or v is pd.NaT or v is pd.NA:
        return None
    return _json_other(v)


def _json_other(v: Any) -> Any:
    if isinstance(v, np.generic):
        return _json_numpy(v)
    if isinstance(v, Decimal):
        if not v.is_finite():
            raise _Unencodable(f"Decimal {v} has no JSON representation")
        return orjson.Fragment(str(v).encode())
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        raise _Unencodable("timedeltas have no JSON form")
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            k = next(k for k in v if not isinstance(k, str))
            raise _Unencodable(f"dict key {k!r} is not a string")
        return {k: _json(item) for k, item in v.items()}
    if isinstance(v, np.ndarray):
        if v.ndim == 0:
            return _json(v[()])
        # Datetime and timedelta arrays element by element: tolist() would give raw integers.
        return [_json(x) for x in (v if v.dtype.kind in "Mm" else v.tolist())]
    if isinstance(v, list | tuple):
        return [_json(x) for x in v]
    raise _Unencodable(f"{type(v).__name__} values have no JSON form")


def _json_numpy(v: np.generic) -> Any:
    if isinstance(v, np.datetime64):
        return None if np.isnat(v) else pd.Timestamp(v).isoformat()
    if isinstance(v, np.timedelta64):
        raise _Unencodable("timedeltas have no JSON form")
    if isinstance(v, np.bytes_ | np.void):
        raise _Unencodable(f"{type(v).__name__} values have no JSON form")
    return _json(v.item())


def _datetime_strings(series: pd.Series) -> list[Any]:
    """ISO 8601 strings for a datetime column, vectorised; NaT becomes MISSING.

    Each value is written on its own, by the rule of ``Timestamp.isoformat()`` (whole seconds
    without a fraction, else 6 or 9 fractional digits), so a row's text never depends on the
    other rows: a resumed or grown job encodes it to the same bytes.
    """
    tz = getattr(series.dtype, "tz", None)
    local = series.dt.tz_localize(None) if tz is not None else series
    wall: np.ndarray[Any, np.dtype[np.datetime64]] = local.to_numpy()
    per_tick = _PER_SECOND[cast("_Unit", np.datetime_data(wall.dtype)[0])]
    nat = np.isnat(wall)
    ticks = wall.view("i8")
    text: list[Any] = np.datetime_as_string(wall, unit="s").tolist()
    fraction = (ticks % per_tick != 0) & ~nat
    if fraction.any():
        nanos = (ticks % max(1, per_tick // 1_000_000) != 0) & fraction
        for unit, mask in (("us", fraction & ~nanos), ("ns", nanos)):
            where = np.flatnonzero(mask)
            chosen: Any = wall[where]
            for i, t in zip(
                where.tolist(),
                np.datetime_as_string(chosen, unit=cast("_Unit", unit)).tolist(),
                strict=True,
            ):
                text[i] = t
    if tz is not None:
        utc = series.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy()
        offsets = np.zeros(len(wall), dtype="i8")
        offsets[~nat] = (wall[~nat] - utc[~nat]) // np.timedelta64(1, "s")
        suffix = {o: _offset(o) for o in np.unique(offsets[~nat]).tolist()}
        text = [
            t if n else t + suffix[o]
            for t, o, n in zip(text, offsets.tolist(), nat.tolist(), strict=True)
        ]
    for i in np.flatnonzero(nat).tolist():
        text[i] = MISSING
    return text


def _offset(seconds: int) -> str:
    """``+HH:MM``, or ``+HH:MM:SS`` for the odd historical offset (what isoformat() writes)."""
    sign = "+" if seconds >= 0 else "-"
    m, sec = divmod(abs(seconds), 60)
    h, m = divmod(m, 60)
    return f"{sign}{h:02d}:{m:02d}" + (f":{sec:02d}" if sec else "")


def _refusal(column: str, keys: Sequence[str], reason: str) -> InputError:
    return InputError(
        f"column {column!r}: {len(keys)} value(s) cannot be sent as JSON ({reason}); "
        f"row key(s) {_show(list(keys))}",
        column=column,
        keys=keys,
    )


def _show(values: Sequence[Any]) -> str:
    shown = ", ".join(repr(v) for v in values[:_KEYS_SHOWN])
    more = len(values) - _KEYS_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


# ---------------------------------------------------------------------------------------------
# bodies


def encode_rows(
    df: pd.DataFrame, refs: Sequence[str], columns: Sequence[str], *, missing: Missing = "omit"
) -> list[bytes]:
    """The JSON bytes of every row's item (``client_ref`` first), in frame order.

    Converts ``_BLOCK_ROWS`` rows at a time; raises InputError (naming column and row keys) for
    anything JSON cannot carry, so a job refuses bad data before its first request.
    """
    make = _item_maker(tuple(columns))
    out: list[bytes] = []
    for start in range(0, len(df), _BLOCK_ROWS):
        part = df.iloc[start : start + _BLOCK_ROWS]
        part_refs = refs[start : start + _BLOCK_ROWS]
        cols = [column_values(part[c], c, part_refs) for c in columns]
        out += _encode_block(part_refs, columns, cols, missing, make)
    return out


@functools.lru_cache(maxsize=8)
def _item_maker(columns: tuple[str, ...]) -> Callable[..., dict[str, Any]]:
    """``f(ref, *values)``: an item's dict. A dict display compiled for these names makes it in
    a third of the time of ``dict(zip(names, values))``; the names go in as ``repr`` literals.
    Kept: a job encodes its rows block by block, and compiling costs 0.06 ms."""
    params = ", ".join(f"v{i}" for i in range(len(columns) + 1))
    fields = ", ".join(f"{name!r}: v{i}" for i, name in enumerate([CLIENT_REF_FIELD, *columns]))
    maker: Callable[..., dict[str, Any]] = eval(f"lambda {params}: {{{fields}}}")  # noqa: S307
    return maker


def _encode_block(
    refs: Sequence[str],
    columns: Sequence[str],
    cols: list[list[Any]],
    missing: Missing,
    make: Callable[..., dict[str, Any]],
) -> list[bytes]:
    """One block's items: the rows with every field at once, the rows that omit a missing
    field one by one."""
    gaps: set[int] = set()
    for n, col in enumerate(cols):
        if col.count(MISSING):  # at C speed; a column without a missing value is the rule
            if missing == "null":
                cols[n] = [None if v is MISSING else v for v in col]
            else:
                gaps.update(i for i, v in enumerate(col) if v is MISSING)
    if not gaps:
        return _all_at_once(refs, columns, cols, make)
    out = [b""] * len(refs)
    whole = [i for i in range(len(refs)) if i not in gaps]
    values = [[col[i] for i in whole] for col in cols]
    out_whole = _all_at_once([refs[i] for i in whole], columns, values, make)
    for i, item in zip(whole, out_whole, strict=True):
        out[i] = item
    part = sorted(gaps)
    out_part = _one_by_one([refs[i] for i in part], columns, [[c[i] for i in part] for c in cols])
    for i, item in zip(part, out_part, strict=True):
        out[i] = item
    return out


_HEAD: Final = b'{"' + CLIENT_REF_FIELD.encode() + b'":'
# Between two items in a JSON array. Inside a string a quote is escaped, so only a nested
# value can hold it; then a block has more of them than rows, and is encoded item by item.
_SEP: Final = b"}," + _HEAD


def _all_at_once(
    refs: Sequence[str],
    columns: Sequence[str],
    cols: list[list[Any]],
    make: Callable[..., dict[str, Any]],
) -> list[bytes]:
    """The items of rows without a missing value, from one ``orjson.dumps`` of all of them,
    cut at the item boundaries: byte for byte what dumping each would give, in a quarter of
    the time (a call per item costs orjson a fresh 4 KiB buffer)."""
    if not refs:
        return []
    try:
        whole = orjson.dumps(list(map(make, refs, *cols)))
    except orjson.JSONEncodeError:
        return _one_by_one(refs, columns, cols)  # names the value it cannot encode
    inner = whole[len(_HEAD) + 1 : -2].split(_SEP)  # [{"client_ref":...},...,{...}]
    if len(inner) != len(refs):
        return _one_by_one(refs, columns, cols)
    return [_HEAD + item + b"}" for item in inner]


def _one_by_one(refs: Sequence[str], columns: Sequence[str], cols: list[list[Any]]) -> list[bytes]:
    """Items one ``orjson.dumps`` each; a missing value's field is left out."""
    dumps = orjson.dumps
    out = []
    rows = zip(*cols, strict=True) if cols else itertools.repeat((), len(refs))
    for ref, values in zip(refs, rows, strict=True):
        item = {CLIENT_REF_FIELD: ref}
        item.update((n, v) for n, v in zip(columns, values, strict=True) if v is not MISSING)
        try:
            # A compact copy: orjson's own result keeps its whole 4 KiB working buffer, which
            # for a million kept rows is 4 GB of RSS and seconds of page faults (measured).
            out.append(memoryview(dumps(item)).tobytes())
        except orjson.JSONEncodeError as exc:
            raise _unencodable_item(item, exc) from None
    return out


def _unencodable_item(item: dict[str, Any], exc: Exception) -> InputError:
    """Which field of an item orjson refused (in practice: text with lone surrogates)."""
    ref = item[CLIENT_REF_FIELD]
    for name, value in item.items():
        try:
            orjson.dumps(value)
        except orjson.JSONEncodeError:
            if name == CLIENT_REF_FIELD:
                return InputError(f"row key {ref!r} cannot be sent as JSON: {exc}", keys=[ref])
            return _refusal(name, [ref], str(exc))
    return InputError(f"row {ref!r} cannot be sent as JSON: {exc}", keys=[ref])


def body_suffix(metadata: dict[str, Any] | None, callback_url: str | None) -> bytes:
    """What follows the items in a create body: ``]``, the batch options, ``}``."""
    extra: dict[str, Any] = {}
    if metadata is not None:
        _check_finite(metadata, "metadata")
        extra["metadata"] = metadata
    if callback_url is not None:
        extra["callback_url"] = callback_url
    try:
        encoded = orjson.dumps(extra)
    except orjson.JSONEncodeError as exc:
        raise InputError(f"metadata cannot be sent as JSON: {exc}") from exc
    # orjson writes {"k":v,...} compactly: its inside is what follows "input":[...].
    return b"]" + (b"," + encoded[1:] if extra else b"}")


def _check_finite(value: Any, where: str) -> None:
    """Refuse NaN and infinities anywhere in ``value``: JSON has no such numbers, and orjson
    would send ``null`` in their place (an item's values are refused the same way)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{where} is {value!r}, which has no JSON representation")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{where}[{k!r}]")
    elif isinstance(value, list | tuple):
        for n, v in enumerate(value):
            _check_finite(v, f"{where}[{n}]")


def chunk_body(items: Iterable[bytes], suffix: bytes) -> bytes:
    """A create body, byte for byte what ``orjson.dumps({"input": [...], **options})`` gives."""
    return b'{"input":[' + b",".join(items) + suffix
