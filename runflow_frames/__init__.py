"""runflow-frames: push a dataframe through Runflow's batch API, exactly once, joined back."""

from ._api import arun_batches, run_batches
from ._checkpoint import read_checkpoint
from ._client import AsyncRunflowClient
from ._errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    CheckpointError,
    InputError,
    InsufficientCreditError,
    PermissionDeniedError,
    ProtocolError,
    RateLimitError,
    RequestRejectedError,
    RunflowError,
    ServerError,
    StaleIntentWarning,
    SubmissionError,
)
from ._join import HANDLE_COLUMNS
from ._retry import RetryPolicy
from ._version import __version__

__all__ = [
    "HANDLE_COLUMNS",
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncRunflowClient",
    "AuthenticationError",
    "CheckpointError",
    "InputError",
    "InsufficientCreditError",
    "PermissionDeniedError",
    "ProtocolError",
    "RateLimitError",
    "RequestRejectedError",
    "RetryPolicy",
    "RunflowError",
    "ServerError",
    "StaleIntentWarning",
    "SubmissionError",
    "__version__",
    "arun_batches",
    "read_checkpoint",
    "run_batches",
]
