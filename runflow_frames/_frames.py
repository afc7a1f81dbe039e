"""Frame types other than pandas: a pyarrow Table or a polars DataFrame goes in, the same comes out.

The core works on pandas; these convert at the edge (nested Arrow types kept as Arrow dtypes, so
nothing is lost on the way in). On the way out, an output column of dicts that does not fit one
Arrow struct type (outputs of different shapes) becomes JSON text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pandas as pd
import pyarrow as pa

from ._errors import InputError


def to_pandas(frame: Any) -> tuple[pd.DataFrame, Callable[[pd.DataFrame], Any]]:
    """``frame`` as pandas, and the function that turns a result back into its type."""
    if isinstance(frame, pd.DataFrame):
        return frame, lambda df: df
    if isinstance(frame, pa.Table):
        return frame.to_pandas(types_mapper=pd.ArrowDtype), _to_arrow
    if type(frame).__module__.split(".")[0] == "polars":
        import polars as pl

        if isinstance(frame, pl.DataFrame):
            return frame.to_pandas(use_pyarrow_extension_array=True), lambda df: pl.from_arrow(
                _to_arrow(df)
            )
    raise InputError(
        f"expected a pandas DataFrame, a pyarrow Table or a polars DataFrame, got "
        f"{type(frame).__name__}"
    )


def _to_arrow(df: pd.DataFrame) -> pa.Table:
    try:
        return pa.Table.from_pandas(df, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        fixed = df.copy()
        fixed["runflow_output"] = [
            None if v is None else orjson.dumps(v).decode() for v in fixed["runflow_output"]
        ]
        return pa.Table.from_pandas(fixed, preserve_index=False)
