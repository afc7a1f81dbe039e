"""runflow-frames: push a dataframe through Runflow's batch API, exactly once, joined back."""

from ._api import arun_batches, run_batches
from ._client import AsyncRunflowClient
from ._errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    InputError,
    InsufficientCreditError,
    PermissionDeniedError,
    ProtocolError,
    RateLimitError,
    RequestRejectedError,
    RunflowError,
    ServerError,
    SubmissionError,
)
from ._join import HANDLE_COLUMNS
from ._version import __version__

__all__ = [
    "HANDLE_COLUMNS",
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncRunflowClient",
    "AuthenticationError",
    "InputError",
    "InsufficientCreditError",
    "PermissionDeniedError",
    "ProtocolError",
    "RateLimitError",
    "RequestRejectedError",
    "RunflowError",
    "ServerError",
    "SubmissionError",
    "__version__",
    "arun_batches",
    "run_batches",
]
