"""run_batches / arun_batches: argument checks and the wiring of the parts."""

from __future__ import annotations

import time
import uuid
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any, Final

import pandas as pd

from ._client import DEFAULT_TIMEOUT, AsyncRunflowClient, model_path
from ._errors import InputError, SubmissionError
from ._join import Handle, check_no_collision, join_handles
from ._pipeline import submit_chunks
from ._rows import (
    MAX_CALLBACK_URL_LEN,
    MAX_CHUNK_SIZE,
    Chunk,
    Missing,
    client_refs,
    item_columns,
    iter_chunks,
)
from ._sync import run_sync

if TYPE_CHECKING:
    import httpx

DEFAULT_CHUNK_SIZE: Final = MAX_CHUNK_SIZE
DEFAULT_MAX_CONCURRENCY: Final = 8


async def arun_batches(
    df: pd.DataFrame,
    owner: str,
    slug: str,
    *,
    key: Hashable | None = None,
    columns: Sequence[Hashable] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    metadata: dict[str, Any] | None = None,
    callback_url: str | None = None,
    missing: Missing = "omit",
    api_key: str | None = None,
    base_url: str | None = None,
    org_id: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    transport: httpx.AsyncBaseTransport | None = None,
) -> pd.DataFrame:
    """Async twin of :func:`run_batches`, for code already inside an event loop.

    Examples
    --------
    >>> result = await arun_batches(df, "acme", "echo")  # doctest: +SKIP
    """
    if not isinstance(df, pd.DataFrame):
        raise InputError(f"expected a pandas DataFrame, got {type(df).__name__}")
    if not (isinstance(chunk_size, int) and 1 <= chunk_size <= MAX_CHUNK_SIZE):
        raise InputError(
            f"chunk_size must be an integer from 1 to {MAX_CHUNK_SIZE}, got {chunk_size!r}"
        )
    if not (isinstance(max_concurrency, int) and max_concurrency >= 1):
        raise InputError(f"max_concurrency must be a positive integer, got {max_concurrency!r}")
    if missing not in ("omit", "null"):
        raise InputError(f"missing must be 'omit' or 'null', got {missing!r}")
    if metadata is not None and not isinstance(metadata, dict):
        raise InputError(f"metadata must be a dict, got {type(metadata).__name__}")
    if callback_url is not None and (
        not isinstance(callback_url, str) or len(callback_url) > MAX_CALLBACK_URL_LEN
    ):
        raise InputError(
            f"callback_url must be a string of at most {MAX_CALLBACK_URL_LEN} characters"
        )

    path = model_path(owner, slug)
    check_no_collision(list(df.columns))
    fields = item_columns(df, key, columns)
    refs = client_refs(df, key)
    # Encode everything before the first request: every refusal happens while nothing is sent.
    chunks = list(
        iter_chunks(
            df,
            refs,
            fields,
            chunk_size=chunk_size,
            missing=missing,
            metadata=metadata,
            callback_url=callback_url,
        )
    )
    client = AsyncRunflowClient(
        api_key=api_key, base_url=base_url, org_id=org_id, timeout=timeout, transport=transport
    )

    handles: dict[str, Handle] = {}

    def on_submitted(_chunk: Chunk, chunk_handles: dict[str, Handle]) -> None:
        handles.update(chunk_handles)

    started = time.monotonic()
    async with client:
        failures = await submit_chunks(
            client,
            path,
            chunks,
            job_id=uuid.uuid4().hex,
            max_concurrency=max_concurrency,
            on_submitted=on_submitted,
        )
    result = join_handles(df, refs, handles)
    if failures:
        first = failures[0].error
        not_submitted = len(refs) - len(handles)
        raise SubmissionError(
            f"{not_submitted} of {len(refs)} rows were not submitted after "
            f"{time.monotonic() - started:.1f} s: {first}. The {len(handles)} submitted rows' "
            "handles are in this error's .result; to send the rest, pass "
            "df[err.result['runflow_run_id'].isna()].",
            result=result,
            submitted=len(handles),
            not_submitted=not_submitted,
        ) from first
    return result


def run_batches(
    df: pd.DataFrame,
    owner: str,
    slug: str,
    *,
    key: Hashable | None = None,
    columns: Sequence[Hashable] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    metadata: dict[str, Any] | None = None,
    callback_url: str | None = None,
    missing: Missing = "omit",
    api_key: str | None = None,
    base_url: str | None = None,
    org_id: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    transport: httpx.AsyncBaseTransport | None = None,
) -> pd.DataFrame:
    """Submit every row of ``df`` to a Runflow model as batch items and join the handles back.

    Each row becomes one input item whose ``client_ref`` is the row's key; items go out in
    chunks of ``chunk_size``, ``max_concurrency`` requests at a time. Works the same in a script
    and in a notebook cell (inside a running event loop).

    Parameters
    ----------
    df : pandas.DataFrame
        One row per item.
    owner, slug : str
        The model, e.g. ``"acme", "echo"``; ``slug`` may contain ``/`` for longer model paths.
    key : column label, optional
        Column whose values are the row keys; defaults to the index. Keys must be unique,
        non-null and at most 255 characters as strings.
    columns : list of column labels, optional
        Columns that become item fields; defaults to every column but the key.
    chunk_size : int, default 100
        Items per request, 1 to 100.
    max_concurrency : int, default 8
        Requests in flight at once.
    metadata : dict, optional
        Sent as the ``metadata`` of every batch.
    callback_url : str, optional
        Sent as the ``callback_url`` of every batch.
    missing : {"omit", "null"}, default "omit"
        Whether a missing value (None, NaN, NaT, pd.NA) leaves its field out of the item or
        sends it as ``null``.
    api_key, base_url, org_id : str, optional
        Default to ``RUNFLOW_API_KEY``, ``RUNFLOW_BASE_URL`` (then ``https://api.runflow.io``)
        and ``RUNFLOW_ORG_ID``.
    timeout : float, default 60
        Seconds one request may take.
    transport : httpx.AsyncBaseTransport, optional
        For tests, e.g. ``httpx.ASGITransport(emulator.app)``.

    Returns
    -------
    pandas.DataFrame
        A new frame with ``df``'s index, order and columns, plus ``runflow_client_ref``,
        ``runflow_batch_id``, ``runflow_item_id``, ``runflow_run_id``,
        ``runflow_sequence_index`` and ``runflow_status``.

    Raises
    ------
    InputError
        Before any request, for bad keys, unencodable values or impossible options.
    SubmissionError
        When the job stopped part-way; ``.result`` holds every submitted row's handle.

    Examples
    --------
    >>> import pandas as pd
    >>> from runflow_frames import run_batches
    >>> df = pd.DataFrame({"prompt": ["a cat", "a dog"]}, index=["r1", "r2"])
    >>> out = run_batches(df, "acme", "echo")  # doctest: +SKIP
    >>> out["runflow_run_id"].notna().all()  # doctest: +SKIP
    True
    """

    async def job() -> pd.DataFrame:
        return await arun_batches(
            df,
            owner,
            slug,
            key=key,
            columns=columns,
            chunk_size=chunk_size,
            max_concurrency=max_concurrency,
            metadata=metadata,
            callback_url=callback_url,
            missing=missing,
            api_key=api_key,
            base_url=base_url,
            org_id=org_id,
            timeout=timeout,
            transport=transport,
        )

    return run_sync(job)
