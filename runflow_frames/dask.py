"""run_batches and collect on a Dask cluster (``pip install 'runflow-frames[dask]'``).

Each partition is a task that runs the ordinary, exactly-once ``run_batches`` on its pandas
frame, under its own sub-checkpoint ``<checkpoint>/partition-<n>``. The checkpoint root must be
storage every worker sees (a shared or network file system; a LocalCluster's local disk is).
When Dask re-runs a partition, because a worker died or the graph is computed again, the task
resumes from that sub-checkpoint: rows already sent are not sent again, and a chunk whose
answer was lost is re-sent with its Idempotency-Key, which the server replays.

All partitions share one throttle, held by the scheduler (see ``_cluster``): at most
``max_concurrency`` requests are in flight across the whole cluster, and a 429 seen by one
worker pauses and slows every worker.

Examples
--------
>>> import dask.dataframe as dd
>>> from distributed import Client
>>> from runflow_frames import dask as rfd
>>> client = Client()  # doctest: +SKIP
>>> ddf = dd.read_parquet("prompts/")  # doctest: +SKIP
>>> out = rfd.run_batches(ddf, "acme", "echo", checkpoint="/shared/ckpt")  # doctest: +SKIP
>>> out.to_parquet("handles/")  # doctest: +SKIP
>>> done = rfd.collect(out, checkpoint="/shared/ckpt").compute()  # doctest: +SKIP
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Hashable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

try:
    import dask.dataframe as dd
    from distributed import default_client
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "runflow_frames.dask needs dask and distributed: pip install 'runflow-frames[dask]'"
    ) from exc

import httpx
import pandas as pd

from ._api import run_batches as _run_batches
from ._cluster import ClusterGate, ensure_coordinator
from ._collect import collect as _collect
from ._config import Errors, _Secret  # the key in a task graph: pickled, never shown
from ._errors import InputError
from ._handles import HANDLE_SCHEMA, join_handles
from ._objectstore import inside
from ._pipeline import SHARED_GATE
from ._retry import RetryPolicy
from ._rows import Missing

__all__ = ["collect", "partition_checkpoint", "run_batches"]

DEFAULT_MAX_CONCURRENCY: Final = 16


def partition_checkpoint(checkpoint: str | os.PathLike[str], number: int) -> str | Path:
    """Where partition ``number`` of a Dask job keeps its checkpoint (in a directory or
    under a URL on object storage)."""
    return inside(checkpoint, f"partition-{number:06d}")


def run_batches(
    ddf: dd.DataFrame,
    owner: str,
    slug: str | None = None,
    *,
    checkpoint: str | os.PathLike[str],
    key: Hashable | None = None,
    columns: Sequence[Hashable] | None = None,
    chunk_size: int = 100,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    metadata: Mapping[str, Any] | None = None,
    callback_url: str | None = None,
    missing: Missing = "omit",
    errors: Errors = "raise",
    retry: RetryPolicy | None = None,
    api_key: str | None = None,
    base_url: str | None = None,
    org_id: str | None = None,
    timeout: float = 60.0,
    storage_options: Mapping[str, Any] | None = None,
) -> dd.DataFrame:
    """Submit every row of a Dask DataFrame, partition by partition, exactly once.

    Lazy, like any Dask operation: nothing is sent until the result is computed (or written).
    Takes the options of :func:`runflow_frames.run_batches` but ``canary`` and ``max_cost``
    (each partition would judge and spend on its own: a budget needs one account for the
    cluster, not built yet); ``max_concurrency`` caps requests in flight across the whole
    cluster. Row keys must be unique within each partition (they
    are checked there); a key repeated in two partitions is sent twice, as two rows.

    Raises
    ------
    InputError
        Without ``checkpoint``: Dask re-runs the partitions of a worker that died, and without
        a checkpoint that would send their rows a second time. Also without a running
        ``distributed`` client.
    """
    if checkpoint is None:
        raise InputError(
            "runflow_frames.dask.run_batches needs checkpoint= (a directory or an s3:// URL "
            "every worker can reach): Dask re-runs the partitions of a worker that dies, and only a checkpoint "
            "keeps that from sending their rows twice"
        )
    if max_concurrency < 1:
        raise InputError(f"max_concurrency must be at least 1, got {max_concurrency}")
    ensure_coordinator(_client())
    # The API key travels to the workers inside the task graph only when given here; else
    # each worker reads RUNFLOW_API_KEY from its own environment.
    options = {
        "key": key,
        "columns": columns,
        "chunk_size": chunk_size,
        "max_concurrency": max_concurrency,
        "metadata": metadata,
        "callback_url": callback_url,
        "missing": missing,
        "errors": errors,
        "retry": retry,
        "api_key": _Secret(api_key) if api_key is not None else None,
        "base_url": base_url,
        "org_id": org_id,
        "timeout": timeout,
        "storage_options": storage_options,
    }
    meta = _submit_meta(ddf._meta)
    return ddf.map_partitions(
        _submit_partition,
        owner,
        slug,
        os.fspath(checkpoint),
        f"rff-{uuid.uuid4().hex}",
        options,
        meta=meta,
    )


def collect(
    ddf: dd.DataFrame,
    *,
    checkpoint: str | os.PathLike[str],
    deadline: float | None = None,
    poll_interval: tuple[float, float] = (1.0, 15.0),
    max_concurrency: int = 4,
    retry: RetryPolicy | None = None,
    api_key: str | None = None,
    base_url: str | None = None,
    org_id: str | None = None,
    timeout: float = 60.0,
    storage_options: Mapping[str, Any] | None = None,
) -> dd.DataFrame:
    """:func:`runflow_frames.collect` on what :func:`run_batches` returned, partition by
    partition (lazy). Outcomes are kept in each partition's sub-checkpoint, so computing it
    again fetches only batches that had not finished. ``max_concurrency`` is per partition."""
    options = {
        "deadline": deadline,
        "poll_interval": poll_interval,
        "max_concurrency": max_concurrency,
        "retry": retry,
        "api_key": _Secret(api_key) if api_key is not None else None,
        "base_url": base_url,
        "org_id": org_id,
        "timeout": timeout,
        "storage_options": storage_options,
    }
    return ddf.map_partitions(
        _collect_partition, os.fspath(checkpoint), options, meta=_collect_meta(ddf._meta)
    )


def _client() -> Any:
    try:
        return default_client()
    except ValueError:
        raise InputError(
            "runflow_frames.dask needs a running distributed client (from distributed import "
            "Client; client = Client(...)): its scheduler holds the cluster-wide throttle"
        ) from None


@contextmanager
def _cluster_gate(job: str, max_concurrency: int) -> Any:
    token = SHARED_GATE.set(ClusterGate(job, max_concurrency))
    try:
        yield
    finally:
        SHARED_GATE.reset(token)


def _submit_partition(
    pdf: pd.DataFrame,
    owner: str,
    slug: str | None,
    root: str,
    job: str,
    options: dict[str, Any],
    partition_info: dict[str, Any] | None = None,
) -> pd.DataFrame:
    if partition_info is None:  # Dask's meta inference on a fake frame: nothing to send
        return _submit_meta(pdf)
    checkpoint, options = _for_partition(root, options, partition_info)
    with _cluster_gate(job, options["max_concurrency"]):
        return _run_batches(pdf, owner, slug, checkpoint=checkpoint, progress=False, **options)


def _collect_partition(
    pdf: pd.DataFrame,
    root: str,
    options: dict[str, Any],
    partition_info: dict[str, Any] | None = None,
) -> pd.DataFrame:
    if partition_info is None:  # Dask's meta inference on a fake frame: nothing to fetch
        return _collect_meta(pdf)
    checkpoint, options = _for_partition(root, options, partition_info)
    return _collect(pdf, checkpoint=checkpoint, progress=False, **options)


def _for_partition(
    root: str, options: dict[str, Any], partition_info: dict[str, Any]
) -> tuple[str | Path, dict[str, Any]]:
    """The partition's checkpoint, and the options with the API key revealed (on the worker)."""
    checkpoint = partition_checkpoint(root, partition_info["number"])
    return checkpoint, {**options, "api_key": _reveal(options["api_key"])}


def _submit_meta(frame: pd.DataFrame) -> pd.DataFrame:
    """The columns and dtypes run_batches gives ``frame``, from none of its rows."""
    return join_handles(frame.iloc[:0], [], HANDLE_SCHEMA.empty_table())


def _collect_meta(frame: pd.DataFrame) -> pd.DataFrame:
    """The columns and dtypes collect gives ``frame``, from none of its rows."""
    return _collect(
        frame.iloc[:0], api_key="meta", base_url="http://127.0.0.1", transport=_NoRequests()
    )


def _reveal(secret: _Secret | None) -> str | None:
    return None if secret is None else secret.reveal()


class _NoRequests(httpx.AsyncBaseTransport):
    """For computing a result's columns from an empty frame: sends nothing."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"no request expected, got {request.method} {request.url}")
