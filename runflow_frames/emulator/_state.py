"""The emulator's state and the API operations on it, free of HTTP.

Every operation takes already-parsed request parts and returns an ``Answer`` (status, JSON body,
headers); ``_app.py`` only translates HTTP to these calls. Run lifecycles are derived from the
clock, not driven by background tasks: a run created at ``t`` is ``queued`` until
``t + queued``, ``dispatching`` until ``t + queued + dispatching``, ``running`` until it ends
``running`` seconds later (an item that fails its model's inputs fails when dispatching ends).
So state is deterministic for a given clock, and a test can pass a fake clock.

Choices where the contract is silent (Part B of the contract), made once here:

- ``sequence_index`` starts at 0; items are listed in ``sequence_index`` order.
- ``client_ref`` values need not be unique within a batch and are not trimmed.
- Idempotency: scoped per API key; the body must match byte for byte (a strict server: a
  client that passes here passes a lenient one); only 201s are remembered, for ever.
- Batches and runs belong to the API key that created them (another key gets 404).
- The list-items cursor is opaque; responses carry it as both ``next`` and ``next_pq``
  (and ``previous``/``prev_pq``), as the docs disagree on the name.
- Batch status: ``queued`` until an item leaves the queue, ``running`` until every item ends,
  then ``succeeded``, ``failed`` or ``partial_succeeded``.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import orjson

from ._accounting import Accounting, Ledger
from ._deliveries import Deliveries, Due
from ._faults import Faults
from ._idempotency import IdempotencyKeys
from ._models import ModelSpec, builtin_models
from ._records import Answer, Batch, Run, Timing, error_answer
from ._requests import MAX_PAGE, page_body, read_page, validate_create
from ._views import Snapshot

__all__ = ["CREATE_ROUTE", "Accounting", "Emulator", "Timing"]

CREATE_ROUTE: Final = "POST /v1/models/{model}/batches"


class Emulator:
    """A faithful in-memory Runflow batch API.

    Parameters
    ----------
    models : iterable of ModelSpec, optional
        Replaces the built-in models (``acme/echo``, ``acme/uppercase``, ``acme/image/edit``,
        ``acme/solo``); add more later with :meth:`register`.
    timing : Timing
        Run lifecycle durations and create latency.
    api_keys : set of str, optional
        Accepted bearer tokens; by default any non-empty token is accepted.
    clock : callable
        Returns the current time in seconds since the epoch; inject a fake one in tests.
    seed : int, optional
        Seeds the id generator, for reproducible ids.
    faults : Faults, optional
        Faults to inject into API requests. An attribute: set it to change faults live, or to
        ``None`` to heal the server.
    credit : int, optional
        Runs the organization can still pay for; a batch that needs more is refused with
        402 ``INSUFFICIENT_CREDIT``. Unlimited by default.
    page_cap : int, default 500
        Most items a list page holds, whatever ``limit`` asks (servers cap pages).
    signing_secrets : list of str
        Callback signing secrets; the newest (last) signs ``Runflow-Signature``. None: unsigned.
    callback_attempts : int, default 5
        Tries per callback delivery (non-2xx, timeouts and connection errors are retried, with
        exponential backoff from 0.1 s).
    """

    def __init__(
        self,
        *,
        models: Iterable[ModelSpec] | None = None,
        timing: Timing | None = None,
        api_keys: Iterable[str] | None = None,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
        faults: Faults | None = None,
        credit: int | None = None,
        page_cap: int = MAX_PAGE,
        signing_secrets: Iterable[str] = (),
        callback_attempts: int = 5,
    ) -> None:
        self.page_cap = page_cap
        self.signing_secrets = list(signing_secrets)
        self.callback_attempts = callback_attempts
        self.timing = timing or Timing()
        self.faults = faults
        self.credit = credit
        self.api_keys = None if api_keys is None else frozenset(api_keys)
        self.clock = clock
        self._seed = seed
        self._rng = random.Random(seed if seed is not None else os.urandom(16))  # noqa: S311 - ids, not secrets
        self._lock = threading.Lock()
        self._models: dict[str, ModelSpec] = {}
        for spec in builtin_models() if models is None else models:
            self.register(spec)
        self._batches: dict[str, Batch] = {}
        self._runs: dict[str, Run] = {}
        self._ledger = Ledger()
        self._keys = IdempotencyKeys(self._ledger)
        self._deliveries = Deliveries()

    def __repr__(self) -> str:
        return f"Emulator(models={sorted(self._models)}, batches={len(self._batches)})"

    # -- configuration ---------------------------------------------------------------------

    def as_worker(self, number: int) -> None:
        """Draw ids from a stream of this worker's own (``run_forever`` with workers): forked
        copies of one random state would give two batches made in the same millisecond the
        same ids."""
        seed = os.urandom(16) if self._seed is None else f"{self._seed}/{number}"
        self._rng = random.Random(seed)  # noqa: S311 - ids, not secrets

    def register(self, spec: ModelSpec) -> None:
        """Serve ``spec`` (replacing a model of the same path)."""
        with self._lock:
            self._models[spec.path] = spec

    @property
    def models(self) -> list[str]:
        return sorted(self._models)

    # -- accounting ------------------------------------------------------------------------

    def accounting(self) -> Accounting:
        """A snapshot of what the emulator has seen."""
        with self._lock:
            return self._ledger.snapshot()

    def received(self) -> list[dict[str, Any]]:
        """Every run created, in creation order: what the models received."""
        with self._lock:
            return [_received(r) for r in self._runs.values()]

    def count(self, route: str, status: int) -> None:
        """Record a request to ``route`` (a template such as ``GET /v1/batches/{id}``)."""
        with self._lock:
            self._ledger.requests_by_route[route] += 1
            self._ledger.responses_by_status[status] += 1

    def record_fault(self, name: str) -> None:
        """A fault struck (``limited`` for a server-side limit)."""
        with self._lock:
            self._ledger.faults_struck[name] += 1
            if name == "limited":
                self._ledger.timeline.append((time.monotonic(), False))

    def create_started(self) -> None:
        """A create request arrived (its body may still be on its way)."""
        with self._lock:
            self._ledger.create_started()

    def create_finished(self) -> None:
        with self._lock:
            self._ledger.creates_in_flight -= 1

    # -- operations ------------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> str | Answer:
        """The caller's token, or a 401 answer."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return error_answer(401, "UNAUTHORIZED", "missing bearer token")
        if self.api_keys is not None and token not in self.api_keys:
            return error_answer(401, "UNAUTHORIZED", "invalid API key")
        return token

    def create_batch(
        self, token: str, model_path: str, body: bytes, idempotency_key: str | None
    ) -> Answer:
        """``POST /v1/models/{model_path}/batches``, processed now."""
        with self._lock:
            if idempotency_key is None:
                return self._create(token, model_path, body)
            return self._keys.create(token, idempotency_key, model_path, body, self._create)

    def arrive(
        self, token: str, model_path: str, body: bytes, key: str, mode: str, left: float
    ) -> Answer | str:
        """See :meth:`IdempotencyKeys.arrive` (a create processed when its service ends)."""
        with self._lock:
            return self._keys.arrive(token, key, model_path, body, mode, left)

    def finish(self, token: str, model_path: str, body: bytes, key: str) -> Answer:
        with self._lock:
            return self._keys.finish(token, key, model_path, body, self._create)

    def in_flight(self, token: str, key: str) -> bool:
        with self._lock:
            return self._keys.busy(token, key)

    def after_wait(self, token: str, model_path: str, body: bytes, key: str) -> Answer:
        with self._lock:
            return self._keys.create(token, key, model_path, body, self._create, counted=True)

    def _create(self, token: str, model_path: str, body: bytes) -> Answer:
        request = _create_request(self._models.get(model_path), model_path, body)
        if isinstance(request, Answer):
            return request
        model, data = request
        if self.credit is not None:
            if self.credit < len(data["input"]):
                return error_answer(402, "INSUFFICIENT_CREDIT", "not enough credit for this batch")
            self.credit -= len(data["input"])
        batch = _new_batch(self._rng, token, model, data, self.clock())
        self._store(batch)
        body_out = Snapshot(self.timing, batch.created).batch(batch, detail=False)
        # Frozen bytes: an idempotent replay answers exactly what the first request got.
        return Answer(201, raw=orjson.dumps(body_out))

    def _store(self, batch: Batch) -> None:
        self._batches[batch.id] = batch
        for run in batch.runs:
            self._runs[run.id] = run
            if run.client_ref is not None:
                self._ledger.runs_by_ref[run.client_ref] += 1
            if run.failure is None:
                self._ledger.billed += run.model.cost(run.input)
        self._ledger.batches_created += 1
        self._ledger.timeline.append((time.monotonic(), True))

    def get_batch(self, token: str, batch_id: str) -> Answer:
        with self._lock:
            batch = self._batch(token, batch_id)
            if batch is None:
                return error_answer(404, "BATCH_NOT_FOUND", f"batch {batch_id!r} not found")
            return Answer(200, self._snapshot().batch(batch, detail=True))

    def list_items(
        self, token: str, batch_id: str, limit: str | None, cursor: str | None
    ) -> Answer:
        with self._lock:
            batch = self._batch(token, batch_id)
            if batch is None:
                return error_answer(404, "BATCH_NOT_FOUND", f"batch {batch_id!r} not found")
            total = len(batch.runs)
            page = read_page(limit, cursor, total)
            if isinstance(page, Answer):
                return page
            start, size = page
            snapshot = self._snapshot()
            size = min(size, self.page_cap)
            items = [snapshot.item(r) for r in batch.runs[start : start + size]]
            return Answer(200, page_body(items, start, size, total))

    def get_item(self, token: str, batch_id: str, item_id: str) -> Answer:
        with self._lock:
            batch = self._batch(token, batch_id)
            run = (
                None
                if batch is None
                else next((r for r in batch.runs if r.item_id == item_id), None)
            )
            if run is None:
                return error_answer(404, "BATCH_ITEM_NOT_FOUND", f"item {item_id!r} not found")
            return Answer(200, self._snapshot().item(run))

    def due_callbacks(self) -> list[Due]:
        """Callbacks to (re)deliver now: (delivery id, url, body, headers). The body is frozen
        at the first attempt, as Runflow's ``payload_bytes`` are."""
        now = self.clock()
        with self._lock:
            return self._deliveries.due(
                self._batches.values(),
                Snapshot(self.timing, now),
                self.clock,
                self.signing_secrets,
                self.callback_attempts,
            )

    def delivered(self, batch_id: str, status: int | None, error: str | None = None) -> None:
        """How a delivery attempt went (HTTP status, or None and an error)."""
        with self._lock:
            self._deliveries.record(batch_id, status, error, self.clock)

    def callback_history(self, token: str, batch_id: str) -> Answer:
        """``GET /v1/batches/{id}/callback``: the batch's deliveries."""
        with self._lock:
            if self._batch(token, batch_id) is None:
                return error_answer(404, "BATCH_NOT_FOUND", f"batch {batch_id!r} not found")
            return Answer(200, self._deliveries.history(batch_id))

    def get_run(self, token: str, run_id: str) -> Answer:
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or self._batches[run.batch_id].owner != token:
                return error_answer(404, "RUN_NOT_FOUND", f"run {run_id!r} not found")
            return Answer(200, self._snapshot().run(run))

    # -- helpers ---------------------------------------------------------------------------

    def _batch(self, token: str, batch_id: str) -> Batch | None:
        batch = self._batches.get(batch_id)
        return batch if batch is not None and batch.owner == token else None

    def _snapshot(self) -> Snapshot:
        """Views as of the clock's now."""
        return Snapshot(self.timing, self.clock())


def _create_request(
    model: ModelSpec | None, model_path: str, body: bytes
) -> tuple[ModelSpec, dict[str, Any]] | Answer:
    """The model and the parsed, validated body of a create request, or why it is refused."""
    if model is None:
        return error_answer(404, "MODEL_NOT_FOUND", f"model {model_path!r} not found")
    if not model.batch_capable:
        return error_answer(
            422, "MODEL_NOT_BATCH_CAPABLE", f"model {model_path!r} does not support batches"
        )
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return error_answer(400, "BAD_REQUEST", "request body is not valid JSON")
    errors = validate_create(data)
    if errors:
        return error_answer(422, "VALIDATION_ERROR", "request validation failed", errors)
    return model, data


def _new_batch(
    rng: random.Random, token: str, model: ModelSpec, data: dict[str, Any], now: float
) -> Batch:
    """A batch of validated ``data`` and its runs, created at ``now`` with ids from ``rng``."""
    batch_id, *ids = _uuid7s(rng, now, 1 + 2 * len(data["input"]))
    metadata = data.get("metadata")
    callback_url = data.get("callback_url")
    runs: list[Run] = []
    for index, raw in enumerate(data["input"]):
        item = dict(raw)
        ref = item.pop("client_ref", None)
        failure, code = model.validate(item), "INPUT_VALIDATION_FAILED"
        if failure is None:
            failure, code = model.preprocess_failure(item), "PREPROCESSING_FAILED"
        run = Run(
            id=ids[2 * index],
            batch_id=batch_id,
            item_id=ids[2 * index + 1],
            sequence_index=index,
            client_ref=ref,
            input=item,
            model=model,
            created=now,
            failure=failure,
            metadata=metadata,
            callback_url=callback_url,
            failure_code=code,
        )
        runs.append(run)
    return Batch(batch_id, token, model, now, runs, data["input"], metadata, callback_url)


def _received(run: Run) -> dict[str, Any]:
    """What ``received()`` shows of a run: what its model was sent."""
    return {
        "run_id": run.id,
        "batch_id": run.batch_id,
        "item_id": run.item_id,
        "sequence_index": run.sequence_index,
        "client_ref": run.client_ref,
        "input": run.input,
    }


def _uuid7s(rng: random.Random, now: float, n: int) -> list[str]:
    """``n`` UUIDv7s (RFC 9562): 48 bits of Unix milliseconds, version 7, 12 random bits, the
    variant, 62 random bits. Formatted by hand from one draw of random bits for all of them:
    uuid.UUID cost half of a create, one draw per id a quarter."""
    ms = f"{int(now * 1000) & ((1 << 48) - 1):012x}"
    head = f"{ms[:8]}-{ms[8:]}-7"
    bits = f"{rng.getrandbits(76 * n):0{19 * n}x}"
    out = []
    for at in range(0, 19 * n, 19):
        r = bits[at : at + 19]
        out.append(f"{head}{r[:3]}-{_VARIANT[r[3]]}{r[4:7]}-{r[7:]}")
    return out


# The variant's two bits (10) over the top two of a random nibble.
_VARIANT: Final = {f"{v:x}": "89ab"[v & 3] for v in range(16)}
