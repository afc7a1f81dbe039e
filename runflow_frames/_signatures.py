"""Verifying Runflow's callback signatures.

Runflow signs each callback with ``Runflow-Signature: <hex>``, the HMAC-SHA256 of the raw request
body under your signing secret (64 lowercase hex characters). During a secret rotation two
secrets are valid at once, so this accepts several.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from typing import Final

from ._errors import InputError

_HEX64: Final = re.compile(r"[0-9a-f]{64}")


def sign(body: bytes, secret: str) -> str:
    """The ``Runflow-Signature`` of ``body`` under ``secret``."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, signature: str | None, secrets: str | Sequence[str]) -> bool:
    """Whether ``signature`` (the ``Runflow-Signature`` header) signs the raw ``body`` under one
    of ``secrets``.

    Verify the bytes as received, before any JSON parsing. Every secret is compared in constant
    time, whichever matches. An empty secret, or none, raises InputError: it would make
    verification pass for anyone.

    Examples
    --------
    >>> from runflow_frames import verify_signature
    >>> body = b'{"event":"batch.succeeded"}'
    >>> verify_signature(body, request_headers["Runflow-Signature"], ["whsec_new", "whsec_old"])  # doctest: +SKIP
    True
    """
    candidates = [secrets] if isinstance(secrets, str) else list(secrets)
    if not candidates or not all(isinstance(s, str) and s for s in candidates):
        # An unset secret (an empty environment variable) would make a signature anyone can
        # compute pass: verification silently off. Refuse it instead.
        raise InputError("verify_signature needs a non-empty signing secret (or several)")
    if signature is None or not _HEX64.fullmatch(signature):
        return False
    matched = False
    for secret in candidates:
        # No early exit: the time taken does not tell which secret (if any) matched.
        matched |= hmac.compare_digest(sign(body, secret), signature)
    return matched
