"""The emulator's Idempotency-Key middleware: the first answer per (API key, Idempotency-Key),
replayed to the same body and refused (409 ``CONFLICT``) to another; and, when a create is
processed at the end of its service time (``Faults.in_flight``), what a same-key request meets
while the first is still being processed. Called with the emulator's lock held."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

from ._accounting import Ledger
from ._records import Answer, error_answer

Create = Callable[[str, str, bytes], Answer]  # (API key, model path, body) -> its answer


def _fingerprint(model_path: str, body: bytes) -> bytes:
    return hashlib.sha256(model_path.encode() + b"\0" + body).digest()


class IdempotencyKeys:
    """First answers and creates in flight, per (API key, Idempotency-Key)."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._answers: dict[tuple[str, str], tuple[bytes, Answer]] = {}
        self._in_flight: dict[tuple[str, str], int] = {}

    def create(
        self,
        token: str,
        key: str,
        model_path: str,
        body: bytes,
        create: Create,
        *,
        counted: bool = False,
    ) -> Answer:
        """The first answer's replay (409 for another body), else ``create`` now, remembered
        when it is a 201. ``counted``: this request was counted on arrival already."""
        if not counted:
            self._ledger.requests_by_key[key] += 1
        fingerprint = _fingerprint(model_path, body)
        seen = self._answers.get((token, key))
        if seen is not None:
            return self._replay(seen, fingerprint)
        answer = create(token, model_path, body)
        if answer.status == 201:
            self._answers[(token, key)] = (fingerprint, answer)
        return answer

    def arrive(
        self, token: str, key: str, model_path: str, body: bytes, mode: str, left: float
    ) -> Answer | str:
        """A create arriving at a server that processes it at the end of its service time
        (``left`` seconds from now): the answer it gets now (a replay, a 409), or ``"wait"``
        (for the same key's request in progress) or ``"process"`` (then :meth:`finish`)."""
        self._ledger.requests_by_key[key] += 1
        seen = self._answers.get((token, key))
        if seen is not None:
            return self._replay(seen, _fingerprint(model_path, body))
        if self._in_flight.get((token, key)) and mode == "wait":
            return "wait"
        if self._in_flight.get((token, key)) and mode == "conflict":
            answer = error_answer(
                409,
                "IDEMPOTENCY_KEY_IN_USE",
                "a request with this Idempotency-Key is still being processed; retry later",
            )
            answer.headers["Retry-After"] = str(max(1, math.ceil(left)))
            return answer
        self._in_flight[(token, key)] = self._in_flight.get((token, key), 0) + 1
        return "process"

    def finish(self, token: str, key: str, model_path: str, body: bytes, create: Create) -> Answer:
        """The end of an ``arrive`` that said ``"process"``: the create, done now (a second
        one for the same key too, on a server that processes same-key requests again)."""
        left = self._in_flight.pop((token, key), 1) - 1
        if left:
            self._in_flight[(token, key)] = left
        answer = create(token, model_path, body)
        if answer.status == 201:
            self._answers.setdefault((token, key), (_fingerprint(model_path, body), answer))
        return answer

    def busy(self, token: str, key: str) -> bool:
        return bool(self._in_flight.get((token, key)))

    def _replay(self, seen: tuple[bytes, Answer], fingerprint: bytes) -> Answer:
        """The first answer again, or 409 for a different body."""
        if seen[0] != fingerprint:
            return error_answer(
                409, "CONFLICT", "Idempotency-Key was already used with a different request body"
            )
        self._ledger.replays += 1
        return seen[1]
