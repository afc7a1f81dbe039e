"""The JSON the API answers for runs, items and batches, as they stand at a given time."""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ._records import Batch, Run, Timing, iso

Phase = tuple[str, float | None, float | None]


@dataclass(frozen=True)
class Snapshot:
    """Views of runs, items and batches at ``now``, their lifecycles derived from ``timing``."""

    timing: Timing
    now: float

    def phase(self, run: Run) -> Phase:
        """(status, started_at, completed_at) of ``run``."""
        t = self.timing
        dispatched = run.created + t.queued
        started = dispatched + t.dispatching
        if self.now < dispatched:
            return "queued", None, None
        if self.now < started:
            return "dispatching", None, None
        if run.failure is not None:
            return "failed", None, started
        ended = started + t.running
        if self.now < ended:
            return "running", started, None
        return "succeeded", started, ended

    def run(self, run: Run) -> dict[str, Any]:
        status, started, completed = self.phase(run)
        failed = status == "failed"
        succeeded = status == "succeeded"
        return {
            "id": run.id,
            "model_id": run.model.path,
            "target_type": "model",
            "status_code": status,
            "source_code": "api",
            "input": run.input,
            "output": run.model.output(run.input) if succeeded else None,
            "duration_ms": None if completed is None else round((completed - run.created) * 1000),
            "cost": str(run.model.cost(run.input)) if succeeded else ("0" if failed else None),
            "batch_id": run.batch_id,
            "client_ref": run.client_ref,
            "created_at": iso(run.created),
            "started_at": iso(started),
            "completed_at": iso(completed),
            "callback_url": run.callback_url,
            "metadata": run.metadata,
            "failure_code": run.failure_code if failed else None,
            "failure_message": run.failure if failed else None,
            "failure_stage_code": "preprocess" if failed else None,
            "links": {"self": f"/v1/runs/{run.id}"},
        }

    def handle(self, run: Run) -> dict[str, Any]:
        return {
            "id": run.item_id,
            "sequence_index": run.sequence_index,
            "run_id": run.id,
            "status_code": self.phase(run)[0],
            "client_ref": run.client_ref,
        }

    def item(self, run: Run) -> dict[str, Any]:
        view = self.run(run)
        failed = view["status_code"] == "failed"
        return {
            "id": run.item_id,
            "batch_id": run.batch_id,
            "run_id": run.id,
            "sequence_index": run.sequence_index,
            "created_at": view["created_at"],
            "started_at": view["started_at"],
            "completed_at": view["completed_at"],
            "client_ref": run.client_ref,
            "status_code": view["status_code"],
            "input": run.input,
            "cost": view["cost"],
            "output": view["output"],
            "error": (
                {"code": view["failure_code"], "message": view["failure_message"]}
                if failed
                else None
            ),
            "run": view,
        }

    def batch(self, batch: Batch, *, detail: bool) -> dict[str, Any]:
        phases = [self.phase(r) for r in batch.runs]
        statuses = Counter(p[0] for p in phases)
        total = len(batch.runs)
        finished = statuses["succeeded"] + statuses["failed"] == total
        started = [p[1] for p in phases if p[1] is not None]
        completed_at = max(p[2] for p in phases if p[2] is not None) if finished else None
        cost = sum(
            (
                r.model.cost(r.input)
                for r, p in zip(batch.runs, phases, strict=True)
                if p[0] == "succeeded"
            ),
            Decimal(0),
        )
        view: dict[str, Any] = {
            "id": batch.id,
            "target_type": "model",
            "target_id": str(uuid.uuid5(uuid.NAMESPACE_URL, batch.model.path)),
            "status_code": _batch_status(statuses, total),
            "items_total": total,
            "items_succeeded": statuses["succeeded"],
            "items_failed": statuses["failed"],
            "items_cancelled": 0,
            "items": [self.handle(r) for r in batch.runs],
            "created_at": iso(batch.created),
            "started_at": iso(min(started)) if started else None,
            "completed_at": iso(completed_at),
            "output": {
                "succeeded": statuses["succeeded"],
                "failed": statuses["failed"],
                "cancelled": 0,
                "total": total,
            },
            "cost": str(cost),
            "metadata": batch.metadata,
            "callback_url": batch.callback_url,
        }
        if detail:
            view.update(_batch_detail(batch, completed_at))
        return view


def _batch_status(statuses: Counter[str], total: int) -> str:
    """``queued`` until an item leaves the queue, ``running`` until every item ends, then
    ``succeeded``, ``failed`` or ``partial_succeeded``."""
    done = statuses["succeeded"] + statuses["failed"]
    if done == total:
        if statuses["succeeded"] == total:
            return "succeeded"
        return "failed" if statuses["failed"] == total else "partial_succeeded"
    if statuses["running"] or done:
        return "running"  # from the moment its first item starts running
    return "queued"


def _batch_detail(batch: Batch, completed_at: float | None) -> dict[str, Any]:
    """What ``GET /v1/batches/{id}`` adds to the batch a create answers."""
    return {
        "target_type_code": "model",
        "source_code": "api",
        "input": batch.input,
        "duration_ms": (
            None if completed_at is None else round((completed_at - batch.created) * 1000)
        ),
        "failure_code": None,
        "failure_message": None,
        "failure_stage_code": None,
        "links": {"self": f"/v1/batches/{batch.id}", "items": f"/v1/batches/{batch.id}/items"},
    }
