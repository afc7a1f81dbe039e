"""The exception tree of runflow-frames.

Every error the library raises on purpose derives from ``RunflowError``::

    RunflowError
    ├── InputError (also ValueError)      bad input or options, refused before any request
    ├── CheckpointError                    a checkpoint is corrupted or belongs to another job
    ├── SubmissionError                    a job stopped part-way; carries the rows it did submit
    ├── CollectError                       waiting for outcomes stopped; carries every handle
    │   └── DeadlineExceeded               collect's deadline passed
    └── APIError                           something went wrong talking to the API
        ├── APIConnectionError             no usable HTTP response (DNS, refused, reset, TLS)
        │   └── APITimeoutError            the request timed out
        ├── ProtocolError                  a response that breaks the contract (bad JSON,
        │                                  handles that do not match the submitted rows)
        └── APIStatusError                 the API answered with an error status
            ├── AuthenticationError        401: missing or invalid API key
            ├── PermissionDeniedError      403
            ├── InsufficientCreditError    402: out of credit
            ├── RateLimitError             429
            ├── RequestInProgressError     409 "in progress": the key's first try is still
            │                              being processed (waited out, then replayed)
            ├── RequestRejectedError       400, 404, 409, 422, other 4xx: a wrong request
            └── ServerError                5xx

``StaleIntentWarning`` (a UserWarning) warns before re-sending old intents. ``JobInterrupted``
(a KeyboardInterrupt, deliberately outside the tree: ``except Exception`` must not swallow
Ctrl-C) carries what an interrupted job had.

``InputError`` is a misuse error (fix the call); the ``APIError`` family is operational. HTTP
library exceptions are translated into this tree in exactly one place, ``_client.py``; the API
key never appears in any message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


class RunflowError(Exception):
    """Base class of every error runflow-frames raises on purpose."""


class InputError(RunflowError, ValueError):
    """The input frame or an option cannot work; nothing was sent.

    ``column`` and ``keys`` name where the problem is, when it is in the data.
    """

    def __init__(
        self, message: str, *, column: str | None = None, keys: Sequence[object] = ()
    ) -> None:
        super().__init__(message)
        self.column = column
        self.keys = list(keys)


class CheckpointError(RunflowError):
    """A checkpoint cannot be used: corrupted, or made by a different job.

    ``changes`` lists what differs when the job's fingerprint does not match.
    """

    def __init__(self, message: str, *, changes: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.changes = list(changes)


class APIError(RunflowError):
    """Something went wrong talking to the Runflow API."""


class APIConnectionError(APIError):
    """No usable HTTP response: the connection failed, was reset, or TLS failed."""


class APITimeoutError(APIConnectionError):
    """The request timed out before a response arrived."""


class ProtocolError(APIError):
    """A response broke the API contract (unparseable body, handles that do not match).

    ``retryable`` is False when asking again cannot help: the server would replay the same
    answer (handles that do not match the rows sent).
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class APIStatusError(APIError):
    """The API answered with an error status.

    Attributes
    ----------
    status_code : int
        The HTTP status.
    code : str or None
        The machine-readable ``code`` of the error envelope, when the body had one.
    errors : list or None
        Field-level details of a 422.
    request_id : str or None
        The request id header of the response, for support tickets.
    retry_after : float or None
        Seconds the server asked to wait (``Retry-After`` or a ``retry_after`` body field).
    retry_after_precise : bool
        The wait was given to a fraction of a second (``Retry-After: 2.345``), not in whole
        seconds or as an HTTP date: it says when the server admits again.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        code: str | None = None,
        errors: list[Any] | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        retry_after_precise: bool = False,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.errors = errors
        self.request_id = request_id
        self.retry_after = retry_after
        self.retry_after_precise = retry_after_precise


class AuthenticationError(APIStatusError):
    """401: the API key is missing or invalid. Set ``RUNFLOW_API_KEY`` or pass ``api_key=``."""


class PermissionDeniedError(APIStatusError):
    """403: the key may not do this (role, organization, unverified email)."""


class InsufficientCreditError(APIStatusError):
    """402: the organization is out of credit."""


class RateLimitError(APIStatusError):
    """429: too many requests."""


class RequestInProgressError(APIStatusError):
    """409 saying the request's Idempotency-Key belongs to a request still being processed:
    this request's own first try, which the client gave up waiting for (a timeout, a dropped
    connection). Not a refusal: the same key and bytes are sent again after ``Retry-After``
    (or a backoff) until the server replays the first try's answer."""


class RequestRejectedError(APIStatusError):
    """400, 404, 409, 422 and other 4xx: the request is wrong and retrying will not help."""


class ServerError(APIStatusError):
    """5xx: the API failed; usually worth retrying later."""


class SubmissionError(RunflowError):
    """A job stopped before every row was submitted.

    Nothing already submitted is lost: ``result`` is the input frame with the handles of every
    row the server accepted (rows not submitted have null handle columns). The underlying error
    is ``__cause__``.

    Some of the rows without a handle may have been created all the same: a request that timed
    out, lost its connection, got a 5xx or an unreadable 201 may have been processed by the
    server. ``uncertain`` counts them. With ``checkpoint=``, resuming re-sends them with their
    Idempotency-Key, so the server replays rather than duplicates them.

    Attributes
    ----------
    result : pandas.DataFrame
        The joined frame, with handles for the rows that were submitted.
    submitted : int
        Rows the server accepted.
    not_submitted : int
        Rows without a handle.
    uncertain : int
        Of those, rows whose request may have been processed although no answer came back.
    """

    def __init__(
        self,
        message: str,
        *,
        result: pd.DataFrame,
        submitted: int,
        not_submitted: int,
        uncertain: int = 0,
    ) -> None:
        super().__init__(message)
        self.result = result
        self.submitted = submitted
        self.not_submitted = not_submitted
        self.uncertain = uncertain


class CanaryFailedError(SubmissionError):
    """More of the canary's runs failed than ``canary_max_failed`` allows: nothing but the
    canary's rows was sent.

    Attributes
    ----------
    result : pandas.DataFrame
        The whole input with the canary rows' handles and outcomes (the other rows have none).
    canary : pandas.DataFrame
        The canary's rows alone, with their outcomes.
    report : CanaryReport
        Its success rate, cost per run and failures by code (``str(report)`` reads them).
    """

    def __init__(
        self, message: str, *, result: pd.DataFrame, canary: pd.DataFrame, report: Any
    ) -> None:
        submitted = int(result["runflow_run_id"].notna().sum())
        super().__init__(
            message, result=result, submitted=submitted, not_submitted=len(result) - submitted
        )
        self.canary = canary
        self.report = report


class BudgetExceeded(SubmissionError):  # noqa: N818 - reads as what happened
    """The next chunk could have taken the job over ``max_cost``: no chunk started after it,
    the requests in flight finished.

    Attributes
    ----------
    result : pandas.DataFrame
        The joined frame, with handles for the rows that were submitted.
    budget : dict
        ``max_cost``, ``spent`` (runs over), ``committed`` (runs still going, at the price
        learned), ``price_per_run``, as decimal text.
    """

    def __init__(self, message: str, *, result: pd.DataFrame, budget: dict[str, Any]) -> None:
        submitted = int(result["runflow_run_id"].notna().sum())
        super().__init__(
            message, result=result, submitted=submitted, not_submitted=len(result) - submitted
        )
        self.budget = budget


class CollectError(RunflowError):
    """Waiting for the runs stopped before every batch was over (polling retries exhausted, an
    API error). The runs exist: ``result`` holds every row's handle and the outcomes collected
    so far; collect again (from that frame or the checkpoint) to finish. ``__cause__`` says
    what stopped it.
    """

    def __init__(self, message: str, *, result: pd.DataFrame) -> None:
        super().__init__(message)
        self.result = result


class DeadlineExceeded(CollectError):  # noqa: N818 - reads as what happened
    """Some batches were still running when ``deadline`` passed.

    ``result`` holds what was collected: finished rows have their outcome, the others their
    last known status. Collect again later (from the frame or the checkpoint) to finish.
    """


class StaleIntentWarning(UserWarning):
    """A resume is about to re-send chunks whose first POST is older than ``max_intent_age``.

    The server keeps Idempotency-Keys for an undocumented time; if it has forgotten them, a chunk
    whose first POST did reach it would be created a second time.
    """


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C (a KeyboardInterrupt) stopped a job from synchronous code.

    A KeyboardInterrupt, not a RunflowError, so ``except Exception`` does not swallow it.
    ``result`` holds every row that had a handle when it stopped (the submitted frame, or what
    collect had joined); with a checkpoint, re-running the same call resumes.
    """

    def __init__(self, message: str, *, result: Any) -> None:
        super().__init__(message)
        self.result = result
