"""Callback deliveries: one per batch that names a ``callback_url``, as Runflow records them."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from .._signatures import sign
from ._records import Batch
from ._views import Snapshot

Due = tuple[str, str, bytes, dict[str, str]]


class Deliveries:
    """Each batch's delivery record (its frozen payload, attempts and status). Not locked on
    its own: the emulator calls it under its lock."""

    def __init__(self) -> None:
        self._by_batch: dict[str, dict[str, Any]] = {}

    def due(
        self,
        batches: Iterable[Batch],
        snapshot: Snapshot,
        clock: Callable[[], float],
        signing_secrets: list[str],
        attempts: int,
    ) -> list[Due]:
        """Deliveries to attempt at ``snapshot.now``, marked as being delivered; a batch that
        has just completed gets its delivery (and payload) now."""
        due: list[Due] = []
        for batch in batches:
            if not batch.callback_url:
                continue
            delivery = self._by_batch.get(batch.id)
            if delivery is None:
                view = snapshot.batch(batch, detail=False)
                if view["completed_at"] is None:
                    continue
                delivery = self._start(batch, view, clock(), signing_secrets, attempts)
            if delivery["status_code"] == "pending" and delivery["next_attempt_at"] <= snapshot.now:
                delivery["status_code"] = "delivering"
                payload, headers = delivery["payload_bytes"], delivery["headers"]
                due.append((batch.id, batch.callback_url, payload, headers))
        return due

    def _start(
        self,
        batch: Batch,
        view: dict[str, Any],
        now: float,
        signing_secrets: list[str],
        attempts: int,
    ) -> dict[str, Any]:
        body = orjson.dumps(_envelope(batch, view))
        headers = {"Content-Type": "application/json", "Runflow-Request-Id": str(uuid.uuid4())}
        if signing_secrets:
            headers["Runflow-Signature"] = sign(body, signing_secrets[-1])
        delivery: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "batch_id": batch.id,
            "callback_url": batch.callback_url,
            "payload_bytes": body,
            "headers": headers,
            "status_code": "pending",
            "attempt_count": 0,
            "max_attempts": attempts,
            "next_attempt_at": now,
            "attempts": [],
        }
        self._by_batch[batch.id] = delivery
        return delivery

    def record(
        self, batch_id: str, status: int | None, error: str | None, clock: Callable[[], float]
    ) -> None:
        """How an attempt went: 2xx succeeds; anything else retries with backoff, or fails."""
        delivery = self._by_batch[batch_id]
        delivery["attempt_count"] += 1
        delivery["attempts"].append({"status_code": status, "error_message": error})
        if status is not None and 200 <= status < 300:
            delivery["status_code"] = "succeeded"
        elif delivery["attempt_count"] >= delivery["max_attempts"]:
            delivery["status_code"] = "failed"
        else:
            delivery["status_code"] = "pending"
            delivery["next_attempt_at"] = clock() + 0.1 * 2 ** delivery["attempt_count"]

    def history(self, batch_id: str) -> list[dict[str, Any]]:
        """What ``GET /v1/batches/{id}/callback`` shows: the batch's delivery, if any."""
        delivery = self._by_batch.get(batch_id)
        if delivery is None:
            return []
        shown = {k: v for k, v in delivery.items() if k not in ("headers", "next_attempt_at")}
        shown["payload_bytes"] = delivery["payload_bytes"].decode()
        shown["payload"] = orjson.loads(delivery["payload_bytes"])
        return [shown]


def _envelope(batch: Batch, view: dict[str, Any]) -> dict[str, Any]:
    """The callback body for a completed batch, from its create-style ``view``."""
    status = view["status_code"]
    return {
        "event": f"batch.{status}",
        "batch_id": batch.id,
        "status": status,
        "output": {
            "items": view["items"],
            "succeeded": view["items_succeeded"],
            "failed": view["items_failed"],
            "cancelled": view["items_cancelled"],
            "total": view["items_total"],
        },
        "duration_ms": None,
        # Callback bodies use +00:00, not Z (the docs: bytes as Python's isoformat()).
        "created_at": view["created_at"].replace("Z", "+00:00"),
        "completed_at": view["completed_at"].replace("Z", "+00:00"),
        "metadata": batch.metadata,
    }
