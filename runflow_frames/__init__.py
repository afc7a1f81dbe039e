"""runflow-frames: push a dataframe through Runflow's batch API, exactly once, joined back."""

from ._accessor import RunflowAccessor
from ._api import aretry_failed, arun_batches, retry_failed, run_batches
from ._canary import CanaryReport
from ._client import AsyncRunflowClient
from ._collect import Summary, acollect, collect, summarize
from ._errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BudgetExceeded,
    CanaryFailedError,
    CheckpointError,
    CollectError,
    DeadlineExceeded,
    InputError,
    InsufficientCreditError,
    JobInterrupted,
    PermissionDeniedError,
    ProtocolError,
    RateLimitError,
    RequestInProgressError,
    RequestRejectedError,
    RunflowError,
    ServerError,
    StaleIntentWarning,
    SubmissionError,
)
from ._files import arun_batches_file, run_batches_file
from ._handles import HANDLE_COLUMNS
from ._retry import RetryPolicy
from ._signatures import verify_signature
from ._stores import read_checkpoint
from ._version import __version__

__all__ = [
    "HANDLE_COLUMNS",
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncRunflowClient",
    "AuthenticationError",
    "BudgetExceeded",
    "CanaryFailedError",
    "CanaryReport",
    "CheckpointError",
    "CollectError",
    "DeadlineExceeded",
    "InputError",
    "InsufficientCreditError",
    "JobInterrupted",
    "PermissionDeniedError",
    "ProtocolError",
    "RateLimitError",
    "RequestInProgressError",
    "RequestRejectedError",
    "RetryPolicy",
    "RunflowAccessor",
    "RunflowError",
    "ServerError",
    "StaleIntentWarning",
    "SubmissionError",
    "Summary",
    "__version__",
    "acollect",
    "aretry_failed",
    "arun_batches",
    "arun_batches_file",
    "collect",
    "read_checkpoint",
    "retry_failed",
    "run_batches",
    "run_batches_file",
    "summarize",
    "verify_signature",
]
