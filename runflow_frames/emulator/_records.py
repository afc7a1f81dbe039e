"""The emulator's plain data: run timing, answers, and the batches and runs it holds."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from ._models import ModelSpec


@dataclass(frozen=True)
class Timing:
    """Seconds a run spends in each state, and the service latency of a create request:
    ``create_latency`` times a lognormal factor of shape ``latency_sigma`` (0: fixed)."""

    queued: float = 0.05
    dispatching: float = 0.05
    running: float = 0.2
    create_latency: float = 0.0
    latency_sigma: float = 0.0

    def service_time(self, rng: random.Random) -> float:
        """One create request's service time (median ``create_latency``)."""
        if self.latency_sigma <= 0:
            return self.create_latency
        return self.create_latency * rng.lognormvariate(0.0, self.latency_sigma)


@dataclass
class Answer:
    """What an operation answers: status, JSON body (or exact bytes to replay), headers."""

    status: int
    body: Any = None
    raw: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def content(self) -> bytes:
        return self.raw if self.raw is not None else orjson.dumps(self.body)


@dataclass
class Run:
    id: str
    batch_id: str
    item_id: str
    sequence_index: int
    client_ref: str | None
    input: dict[str, Any]
    model: ModelSpec
    created: float
    failure: str | None  # why the input fails the model's declarations, or its preprocessing
    metadata: dict[str, Any] | None
    callback_url: str | None
    failure_code: str = "INPUT_VALIDATION_FAILED"


@dataclass
class Batch:
    id: str
    owner: str
    model: ModelSpec
    created: float
    runs: list[Run]
    input: list[dict[str, Any]]
    metadata: dict[str, Any] | None
    callback_url: str | None


def error_answer(status: int, code: str, message: str, errors: list[Any] | None = None) -> Answer:
    return Answer(status, {"code": code, "message": message, "errors": errors})


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
