"""Configuration as values: where and as whom a job talks (``Connection``), and what it sends
(``JobOptions``), each resolved and validated once, in one place.

Public functions keep their keyword arguments; they turn them into these values first, so the
rules (environment variables, defaults, limits, the job's fingerprint) live here only.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import urlsplit

from ._errors import CheckpointError, InputError
from ._retry import RetryPolicy
from ._rows import MAX_CALLBACK_URL_LEN, MAX_CHUNK_SIZE, Missing

if TYPE_CHECKING:
    import httpx

    from ._client import AsyncRunflowClient

DEFAULT_BASE_URL: Final = "https://api.runflow.io"
DEFAULT_TIMEOUT: Final = 60.0
DEFAULT_CHUNK_SIZE: Final = MAX_CHUNK_SIZE
DEFAULT_MAX_CONCURRENCY: Final = 8
# Idempotency-Key retention is undocumented; a day is the common convention (Stripe's, e.g.).
DEFAULT_MAX_INTENT_AGE: Final = 24 * 3600.0
# What Runflow's own JS SDK accepts as a key (rf_live_..., rf_svc_...).
_KEY_CHARS: Final = re.compile(r"[A-Za-z0-9_]+")

Errors = Literal["raise", "keep"]


class _Secret:
    """The API key: shown by no repr, str or format."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'[redacted]'"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(_Secret)


@dataclass(frozen=True, slots=True)
class Connection:
    """Where and as whom requests go: resolved from arguments, then the environment
    (``RUNFLOW_API_KEY``, ``RUNFLOW_BASE_URL``, ``RUNFLOW_ORG_ID``), then defaults."""

    base_url: str
    org_id: str | None
    timeout: float
    retry: RetryPolicy
    api_key: _Secret = field(repr=False)
    transport: httpx.AsyncBaseTransport | None = field(default=None, compare=False)
    # fsspec's options for object storage (checkpoints, inputs, outputs on s3://...): they may
    # hold credentials, so no repr shows them and no checkpoint keeps them.
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def resolve(
        cls,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        org_id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
        retry: RetryPolicy | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> Connection:
        """Raises InputError for a missing or malformed key, a bad URL or timeout."""
        key = api_key if api_key is not None else os.environ.get("RUNFLOW_API_KEY")
        if not key:
            raise InputError("no API key: pass api_key= or set RUNFLOW_API_KEY")
        if not _KEY_CHARS.fullmatch(key):
            # Never echo the key: say what is wrong with it instead.
            raise InputError(
                "the API key has characters Runflow keys do not have (letters, digits and _ "
                "only); look for a stray newline, space or quotes around it"
            )
        if not (isinstance(timeout, int | float) and timeout > 0):
            raise InputError(f"timeout must be positive seconds, got {timeout!r}")
        url = check_base_url(base_url or os.environ.get("RUNFLOW_BASE_URL") or DEFAULT_BASE_URL)
        org = org_id if org_id is not None else os.environ.get("RUNFLOW_ORG_ID") or None
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise InputError(
                f"storage_options must be a dict, got {type(storage_options).__name__}"
            )
        storage = dict(storage_options or {})
        return cls(
            url, org, float(timeout), retry or RetryPolicy(), _Secret(key), transport, storage
        )

    def client(self) -> AsyncRunflowClient:
        """A client for this connection (use it as an async context manager)."""
        from ._client import AsyncRunflowClient

        return AsyncRunflowClient(connection=self)

    def key_fingerprint(self, salt: str) -> str:
        """A salted, truncated HMAC of the API key: tells two keys apart without revealing
        either (what a checkpoint keeps, never the key)."""
        secret = self.api_key.reveal().encode()
        return hmac.new(salt.encode(), secret, hashlib.sha256).hexdigest()[:16]

    def check_server(self, recorded: Mapping[str, Any], where: object) -> None:
        """Refuse to use a checkpoint made against another server or organisation: the API key
        goes only where this call is configured to send it, never where a file says."""
        for name, env in (("base_url", "RUNFLOW_BASE_URL"), ("org_id", "RUNFLOW_ORG_ID")):
            was, now = recorded.get(name), getattr(self, name)
            if was != now:
                raise CheckpointError(
                    f"checkpoint {where} was made with {name} {was!r}, and this call is "
                    f"configured for {now!r}; nothing was sent. To use it, point this call at "
                    f"the same server ({name}= or {env}={was if was is not None else ''})",
                    changes=[f"{name}: {was!r} -> {now!r}"],
                )


def check_base_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url.rstrip("/")
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return url.rstrip("/")
    raise InputError(
        f"base URL {url!r} must be https:// (plain http:// is allowed only for loopback hosts, "
        "such as the local emulator)"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class JobOptions:
    """What a submit job sends and how: validated when made (InputError)."""

    key: Hashable | None = None
    columns: Sequence[Hashable] | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    metadata: dict[str, Any] | None = None
    callback_url: str | None = None
    missing: Missing = "omit"
    errors: Errors = "raise"
    max_intent_age: float = DEFAULT_MAX_INTENT_AGE

    def __post_init__(self) -> None:
        if not (isinstance(self.chunk_size, int) and 1 <= self.chunk_size <= MAX_CHUNK_SIZE):
            raise InputError(
                f"chunk_size must be an integer from 1 to {MAX_CHUNK_SIZE}, got {self.chunk_size!r}"
            )
        if not (isinstance(self.max_concurrency, int) and self.max_concurrency >= 1):
            raise InputError(
                f"max_concurrency must be a positive integer, got {self.max_concurrency!r}"
            )
        if self.missing not in ("omit", "null"):
            raise InputError(f"missing must be 'omit' or 'null', got {self.missing!r}")
        if self.metadata is not None and not isinstance(self.metadata, dict):
            raise InputError(f"metadata must be a dict, got {type(self.metadata).__name__}")
        if self.callback_url is not None and (
            not isinstance(self.callback_url, str) or len(self.callback_url) > MAX_CALLBACK_URL_LEN
        ):
            raise InputError(
                f"callback_url must be a string of at most {MAX_CALLBACK_URL_LEN} characters"
            )
        if self.errors not in ("raise", "keep"):
            raise InputError(f"errors must be 'raise' or 'keep', got {self.errors!r}")
        if not (isinstance(self.max_intent_age, int | float) and self.max_intent_age > 0):
            raise InputError(
                f"max_intent_age must be positive seconds, got {self.max_intent_age!r}"
            )


def fingerprint(
    model: str,
    connection: Connection,
    options: JobOptions,
    fields: list[str] | None,
    suffix: bytes,
) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: what decides the bytes of every item and
    where they go. chunk_size and max_concurrency are not in it: they only shape what is not
    sent yet."""
    return {
        "model": model,
        "base_url": connection.base_url,
        "org_id": connection.org_id,
        "key": None if options.key is None else str(options.key),
        "columns": fields,
        "missing": options.missing,
        # As sent: the same dict with its keys in another order (or 1 for 1.0) would make
        # other bytes, and a re-sent chunk a 409.
        "metadata": None if options.metadata is None else suffix.decode(),
        "callback_url": options.callback_url,
    }
