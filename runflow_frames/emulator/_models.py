"""Models the emulator serves: declared inputs, price, and a deterministic output function."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final

import orjson

# The most bytes (UTF-8) one item's output may hold. An items page answers each output twice
# (the item's and its run's) for up to 100 items, so 64 KiB keeps a page under ~13 MB; a model
# input that asks for more fails as an input, as the other input errors do.
MAX_OUTPUT_BYTES: Final = 65_536

# The JSON types an input declaration may name, and the Python values that satisfy them.
_CHECKS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def _digest(value: Any) -> str:
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _echo(item: dict[str, Any]) -> dict[str, Any]:
    return {"echo": item}


def _repeat(item: Mapping[str, Any]) -> int:
    # An optional input sent as null is absent (what missing="null" sends): the default, 1.
    repeat = item.get("repeat")
    return 1 if repeat is None else int(repeat)


def _uppercase(item: dict[str, Any]) -> dict[str, Any]:
    return {"text": str(item["text"]).upper() * _repeat(item)}


def _uppercase_limits(item: Mapping[str, Any]) -> str | None:
    """Why ``repeat`` is out of range: negative, or an output past ``MAX_OUTPUT_BYTES``."""
    repeat = _repeat(item)
    if repeat < 0:
        return "input 'repeat' must not be negative"
    size = len(str(item["text"]).upper().encode()) * repeat
    if size > MAX_OUTPUT_BYTES:
        return f"input 'repeat' asks for {size} bytes of output; at most {MAX_OUTPUT_BYTES}"
    return None


def _image(item: dict[str, Any]) -> dict[str, Any]:
    url = f"https://assets.emulator.runflow.invalid/{_digest(item)[:32]}.png"
    return {"outputs": [{"type": "image", "url": url}]}


@dataclass(frozen=True)
class ModelSpec:
    """A model the emulator serves.

    Parameters
    ----------
    path : str
        The model id, two or more ``/``-separated segments, e.g. ``"acme/echo"``.
    required, optional : mapping of field name to JSON type
        Declared inputs (``"string"``, ``"integer"``, ``"number"``, ``"boolean"``, ``"object"``,
        ``"array"``). ``required=None`` accepts any input. Undeclared fields are allowed.
        An item that fails its declarations fails as an item (``INPUT_VALIDATION_FAILED``);
        the batch is still created.
    batch_capable : bool
        ``False`` makes the batch route answer 422, as Runflow does for per-provider models.
    price : Decimal
        Cost of one successful run; failed runs cost ``0``.
    output : callable
        Deterministic function of the (validated) item input to the run's output object.
    check : callable, optional
        Why an item that meets its declarations still fails (a value out of range, an output
        too large), or None; it fails as the declarations do. Runs after them.
    price_per : str, optional
        An input field (a number) the price is multiplied by, e.g. ``"seconds"``: a run's cost
        is ``price * item[price_per]`` (a missing or non-numeric field counts as 1).
    fail_share : float, default 0
        The share of valid runs that fail at preprocessing (``PREPROCESSING_FAILED``), chosen by
        a rule on the input and ``fail_seed``: the same input always fails or always succeeds,
        and about ``fail_share`` of distinct inputs fail.
    """

    path: str
    required: Mapping[str, str] | None = None
    optional: Mapping[str, str] = field(default_factory=dict)
    batch_capable: bool = True
    price: Decimal = Decimal("0.001")
    output: Callable[[dict[str, Any]], dict[str, Any]] = _echo
    check: Callable[[Mapping[str, Any]], str | None] | None = None
    price_per: str | None = None
    fail_share: float = 0.0
    fail_seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fail_share <= 1.0:
            raise ValueError(f"fail_share must be between 0 and 1, got {self.fail_share!r}")
        segments = self.path.split("/")
        if len(segments) < 2 or any(s in ("", ".", "..") for s in segments):
            raise ValueError(f"model path {self.path!r} needs two or more non-empty segments")
        for kind in [*(self.required or {}).values(), *self.optional.values()]:
            if kind not in _CHECKS:
                raise ValueError(f"unknown input type {kind!r}; use one of {sorted(_CHECKS)}")

    def validate(self, item: Mapping[str, Any]) -> str | None:
        """Why ``item`` fails the declared inputs (or ``check``), or None when it passes."""
        failure = self._declarations(item)
        if failure is None and self.check is not None:
            failure = self.check(item)
        return failure

    def preprocess_failure(self, item: Mapping[str, Any]) -> str | None:
        """Why a valid ``item`` fails at preprocessing under ``fail_share``'s rule, or None."""
        if not self.fail_share:
            return None
        draw = hashlib.sha256(f"{self.fail_seed}:{_digest(item)}".encode()).digest()
        if int.from_bytes(draw[:8], "big") / 2**64 >= self.fail_share:
            return None
        return f"the model could not preprocess this input (emulated: {self.fail_share:.0%} fail)"

    def cost(self, item: Mapping[str, Any]) -> Decimal:
        """What a successful run of ``item`` costs."""
        if self.price_per is None:
            return self.price
        units = item.get(self.price_per)
        if isinstance(units, bool) or not isinstance(units, int | float):
            return self.price
        return self.price * Decimal(str(units))

    def _declarations(self, item: Mapping[str, Any]) -> str | None:
        if self.required is None:
            return None
        for name, kind in self.required.items():
            if name not in item:
                return f"missing required input {name!r}"
            if not _CHECKS[kind](item[name]):
                return f"input {name!r} must be of type {kind}"
        for name, kind in self.optional.items():
            if name in item and item[name] is not None and not _CHECKS[kind](item[name]):
                return f"input {name!r} must be of type {kind}"
        return None


def builtin_models() -> list[ModelSpec]:
    """The models every emulator starts with."""
    return [
        # Any input accepted; the output echoes it.
        ModelSpec("acme/echo"),
        # Typed inputs: items without a string "text" fail as items.
        ModelSpec(
            "acme/uppercase",
            required={"text": "string"},
            optional={"repeat": "integer"},
            price=Decimal("0.002"),
            output=_uppercase,
            check=_uppercase_limits,
        ),
        # A three-segment model path, with a media-style output.
        ModelSpec(
            "acme/image/edit",
            required={"prompt": "string"},
            optional={"strength": "number"},
            price=Decimal("0.04"),
            output=_image,
        ),
        # Runs exist for it, batches do not: the batch route answers 422.
        ModelSpec("acme/solo", batch_capable=False),
    ]
