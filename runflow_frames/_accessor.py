"""``df.runflow``: the pandas accessor, registered when runflow_frames is imported.

    import runflow_frames  # registers it
    out = df.runflow.run("acme/echo", checkpoint="ckpt", wait=True)
    out.runflow.summary()

Each method is the function of the same job with the frame as its first argument; the options
are the function's.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from ._api import retry_failed, run_batches
from ._collect import Summary, collect, summarize


@pd.api.extensions.register_dataframe_accessor("runflow")
class RunflowAccessor:
    """``df.runflow.run(model, ...)``, ``.collect(...)``, ``.retry_failed(model, ...)`` and
    ``.summary()``: ``run_batches``, ``collect``, ``retry_failed`` and ``summarize`` on this
    frame."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self._frame = frame

    def run(self, model: str, **options: Any) -> pd.DataFrame:
        """``run_batches(df, model, **options)``: submit every row, join the handles."""
        return run_batches(self._frame, model, **options)

    def collect(self, **options: Any) -> pd.DataFrame:
        """``collect(df, **options)``: wait for the runs, join their outcomes."""
        return collect(self._frame, **options)

    def retry_failed(self, model: str, **options: Any) -> pd.DataFrame:
        """``retry_failed(df, model, **options)``: submit the failed rows again."""
        return retry_failed(self._frame, model, **options)  # type: ignore[no-any-return]

    def summary(self) -> Summary:
        """``summarize(df)``: rows by status, cost, failures by code."""
        return summarize(self._frame)
