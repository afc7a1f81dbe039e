"""What clients send, checked: create bodies, page sizes and list cursors."""

from __future__ import annotations

import base64
from typing import Any, Final

from ._records import Answer, error_answer

MAX_ITEMS: Final = 100
MAX_CLIENT_REF: Final = 255
MAX_CALLBACK_URL: Final = 2048
MAX_PAGE: Final = 500
DEFAULT_PAGE: Final = 100


def _problem(loc: list[Any], msg: str, kind: str) -> dict[str, Any]:
    return {"loc": loc, "msg": msg, "type": kind}


def validate_create(data: Any) -> list[dict[str, Any]]:
    """The 422 ``errors[]`` of a create body (FastAPI style ``{loc, msg, type}``), or []."""
    if not isinstance(data, dict):
        return [_problem(["body"], "body must be a JSON object", "type_error")]
    errors = _input_errors(data.get("input"))
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        errors.append(_problem(["body", "metadata"], "metadata must be an object", "type_error"))
    errors.extend(_callback_url_errors(data.get("callback_url")))
    return errors


def _input_errors(items: Any) -> list[dict[str, Any]]:
    loc: list[Any] = ["body", "input"]
    if not isinstance(items, list):
        kind = "missing" if items is None else "type_error"
        return [_problem(loc, "input must be an array", kind)]
    if not 1 <= len(items) <= MAX_ITEMS:
        return [_problem(loc, f"input must hold 1 to {MAX_ITEMS} items", "value_error")]
    errors: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            errors.append(_problem([*loc, i], "item must be an object", "type_error"))
        elif "client_ref" in item:
            errors.extend(_client_ref_errors([*loc, i, "client_ref"], item["client_ref"]))
    return errors


def _client_ref_errors(loc: list[Any], ref: Any) -> list[dict[str, Any]]:
    if not isinstance(ref, str):
        return [_problem(loc, "client_ref must be a string", "type_error")]
    if len(ref) > MAX_CLIENT_REF:
        message = f"client_ref must be at most {MAX_CLIENT_REF} characters"
        return [_problem(loc, message, "value_error")]
    return []


def _callback_url_errors(url: Any) -> list[dict[str, Any]]:
    loc = ["body", "callback_url"]
    if url is not None and not isinstance(url, str):
        return [_problem(loc, "callback_url must be a string", "type_error")]
    if isinstance(url, str) and len(url) > MAX_CALLBACK_URL:
        message = f"callback_url must be at most {MAX_CALLBACK_URL} characters"
        return [_problem(loc, message, "value_error")]
    return []


def read_page(limit: str | None, cursor: str | None, total: int) -> tuple[int, int] | Answer:
    """(start, size) of the page a list request asks for, or its 422 answer."""
    size = DEFAULT_PAGE if limit is None else _ascii_number(limit)
    if size is None or not 1 <= size <= MAX_PAGE:
        return error_answer(
            422,
            "VALIDATION_ERROR",
            f"limit must be an integer from 1 to {MAX_PAGE}",
            [_problem(["query", "limit"], "out of range", "value_error")],
        )
    start = 0 if cursor is None else _decode_cursor(cursor)
    if start is None or start > total:
        return error_answer(
            422,
            "VALIDATION_ERROR",
            "invalid pagination cursor",
            [_problem(["query", "pq"], "invalid cursor", "value_error")],
        )
    return start, size


def _ascii_number(text: str) -> int | None:
    """``text`` as a non-negative integer when it is ASCII digits only, else None.

    ``int()`` alone takes more: other scripts' digits, signs, spaces and underscores; and
    ``str.isdigit()`` takes superscripts that ``int()`` refuses. Twenty digits are plenty for
    any page or offset and keep ``int()`` clear of its digit limit."""
    if not (0 < len(text) <= 20 and text.isascii() and text.isdigit()):
        return None
    return int(text)


def page_body(items: list[dict[str, Any]], start: int, size: int, total: int) -> dict[str, Any]:
    """A list page: its items and the cursors around it (under both names the docs use)."""
    nxt = _encode_cursor(start + size) if start + size < total else None
    prev = _encode_cursor(max(0, start - size)) if start > 0 else None
    return {
        "items": items,
        "first": _encode_cursor(0),
        "next": nxt,
        "previous": prev,
        "next_pq": nxt,
        "prev_pq": prev,
    }


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int | None:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    prefix, _, number = text.partition(":")
    return _ascii_number(number) if prefix == "o" else None
