"""Every row's item: its bytes, encoded when first needed, and a hash of its values (pure).

A resume must prove that the rows a checkpoint recorded still hold the values that were sent.
Encoding a row to compare digests of its bytes costs about 1 us; hashing its values column by
column (numpy and pandas' C hashing) costs about 0.3 us for a text column and 0.01 us for a
numeric one. So the checkpoint keeps both for each
row, and a resume encodes only the rows it will send, plus the recorded rows whose value hash
differs (or is unknown) to compare their bytes.

The value hash covers what decides a row's bytes besides the job's fixed options (columns,
``missing``, key): each column's name and dtype and each value exactly (the bits of a float, so
``-0.0`` is not ``0.0``; every missing value alike, as encoding makes them alike). It exists only
for frames whose every column has a dtype it can hash exactly *and* whose every value can be
encoded (no infinities, no lone surrogates): then encoding later cannot fail, and doing it lazily
loses no refusal. For any other frame every row is encoded up front, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, cast

import numpy as np
import pandas as pd
import xxhash
from pandas.util import hash_array

from ._rows import Missing, encode_rows

Hashes = np.ndarray[Any, np.dtype[np.int64]]

# A recorded hash of 0 means "unknown" (rows recorded before value hashes, or from a frame
# without them); a computed hash is never 0.
UNKNOWN: Final = 0
_MISSING_BITS: Final = np.uint64(0x9E3779B97F4A7C15)  # any missing value, in any column
_MASKED = (pd.arrays.IntegerArray, pd.arrays.FloatingArray, pd.arrays.BooleanArray)


def row_digests(items: Sequence[bytes]) -> Hashes:
    """A 64-bit digest (xxh3) of each row's item bytes: what a re-sent chunk is checked by."""
    digests = np.fromiter(map(xxhash.xxh3_64_intdigest, items), np.uint64, len(items))
    return digests.view(np.int64)


class Items:
    """The item bytes of a frame's rows (``client_ref`` first, as ``encode_rows`` makes them)
    and, when the frame allows it, their value hashes (``hashes``; else every row is encoded
    here, so a value JSON cannot carry is refused now)."""

    def __init__(
        self,
        frame: pd.DataFrame,
        refs: Sequence[str],
        fields: Sequence[str],
        missing: Missing,
    ) -> None:
        self._frame, self._refs, self._fields, self._missing = frame, refs, fields, missing
        self.hashes = value_hashes(frame, refs, fields)
        self._bytes: list[bytes | None] = [None] * len(refs)
        if self.hashes is None:
            self.encode(range(len(refs)))

    def take(self, rows: Sequence[int]) -> list[bytes]:
        """The bytes of the rows at these positions, encoded already."""
        every = self._bytes
        items = [every[r] for r in rows]
        if None in items:
            raise AssertionError("encode() the rows first")
        return cast("list[bytes]", items)

    def encode(self, rows: Sequence[int]) -> None:
        """Encode the rows at these positions that are not encoded yet."""
        every = self._bytes
        if isinstance(rows, range) and rows.step == 1:  # a job's blocks: checked at C speed
            run = slice(rows.start, rows.stop)
            left = every[run].count(None)
            if not left:
                return
            if left == len(rows):  # none encoded yet: by slices
                part, refs = self._frame.iloc[run], self._refs[run]
                encoded = encode_rows(part, refs, self._fields, missing=self._missing)
                if len(encoded) != len(rows):  # a slice takes any length: it must not
                    raise AssertionError("one item per row")
                every[run] = encoded
                return
        todo = [r for r in rows if every[r] is None]
        if not todo:
            return
        part, refs = self._frame.iloc[todo], [self._refs[r] for r in todo]
        encoded = encode_rows(part, refs, self._fields, missing=self._missing)
        for row, item in zip(todo, encoded, strict=True):
            every[row] = item

    def digests(self, rows: Sequence[int]) -> Hashes:
        """``row_digests`` of the rows at these positions (encoding them first)."""
        self.encode(rows)
        return row_digests(self.take(rows))

    def hashes_of(self, rows: Sequence[int]) -> Hashes:
        """The value hashes of these rows (``UNKNOWN`` each when the frame has none)."""
        if self.hashes is None:
            return np.zeros(len(rows), dtype=np.int64)
        return self.hashes.take(rows)


def value_hashes(frame: pd.DataFrame, refs: Sequence[str], fields: Sequence[str]) -> Hashes | None:
    """A hash of each row's values in ``fields`` (never ``UNKNOWN``), or None when a column's
    dtype cannot be hashed exactly or a value (or key) would not encode."""
    try:
        "".join([*fields, *refs]).encode()
    except UnicodeEncodeError:
        return None  # a name or key with a lone surrogate: encoding will refuse it
    acc = np.zeros(len(frame), dtype=np.uint64)
    for name in fields:
        column = frame[name]
        bits = _value_bits(column)
        if bits is None:
            return None
        salt = np.uint64(xxhash.xxh3_64_intdigest(f"{name}\0{column.dtype}".encode()))
        acc = _mix(acc ^ _mix(bits ^ salt))
    acc[acc == UNKNOWN] = 1
    return acc.view(np.int64)


def _value_bits(column: pd.Series) -> np.ndarray[Any, np.dtype[np.uint64]] | None:
    """64 bits per value that differ wherever the encoded values differ, or None."""
    dtype = column.dtype
    if isinstance(dtype, np.dtype) and dtype.kind in "biuM":
        return column.to_numpy().view(f"u{dtype.itemsize}").astype(np.uint64)
    if isinstance(dtype, np.dtype) and dtype.kind == "f":
        return _float_bits(column.to_numpy(), np.isnan(column.to_numpy()))
    if isinstance(column.array, _MASKED):
        missing = column.isna().to_numpy()
        if dtype.kind == "f":
            return _float_bits(column.to_numpy("float64", na_value=0.0), missing)
        values = column.to_numpy("int64" if dtype.kind in "bi" else "uint64", na_value=0)
        bits = values.view(np.uint64).copy()
        bits[missing] = _MISSING_BITS
        return bits
    if isinstance(dtype, pd.StringDtype) or (isinstance(dtype, np.dtype) and dtype.kind == "O"):
        values = column.to_numpy(dtype=object)
        missing = pd.isna(values)
        some_missing = missing.any()
        present = values[~missing] if some_missing else values
        if pd.api.types.infer_dtype(present, skipna=False) not in ("string", "empty"):
            return None  # lists, dicts, numbers, mixed...: encoded, not hashed
        try:
            hashed = hash_array(present, categorize=False)
        except UnicodeEncodeError:
            return None  # a lone surrogate: encoding will refuse it
        if not some_missing:
            return hashed
        bits = np.full(len(values), _MISSING_BITS, dtype=np.uint64)
        bits[~missing] = hashed
        return bits
    return None  # categoricals, time zones, Arrow types, ...: encoded, not hashed


def _float_bits(
    values: np.ndarray[Any, Any], missing: np.ndarray[Any, np.dtype[np.bool_]]
) -> np.ndarray[Any, np.dtype[np.uint64]] | None:
    values = values.astype(np.float64)  # exact for every float width
    if np.isinf(values).any():
        return None  # refused when encoded
    bits = values.view(np.uint64).copy()
    bits[missing | np.isnan(values)] = _MISSING_BITS  # NaN is missing, whatever its payload
    return bits


def _mix(x: np.ndarray[Any, np.dtype[np.uint64]]) -> np.ndarray[Any, np.dtype[np.uint64]]:
    """splitmix64's finaliser: every input bit moves about half the output bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
