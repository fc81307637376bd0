"""Checking received webhook bodies against the published JSON Schemas."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jsonschema

from worker.delivery.payloads import validate_event


def _body_and_name(item: Any) -> tuple[bytes, str]:
    """Accept what tests hold: a receiver's ``Received``, raw bytes, or text."""
    if isinstance(item, bytes):
        return item, "body"
    if isinstance(item, str):
        return item.encode(), "body"
    body = getattr(item, "body", None)
    if not isinstance(body, bytes):
        raise TypeError(f"expected a received request, bytes or str, got {type(item).__name__}")
    headers = getattr(item, "headers", None) or {}
    return body, f"webhook-id {headers.get('webhook-id', '?')} on {getattr(item, 'path', '?')}"


def assert_events_valid(received: Iterable[Any]) -> None:
    """Assert that every body is a valid event of its type; name each one that is not.

    Bodies that failed signature verification are checked too: a signed-but-wrong
    body and an unsigned one are both bugs worth seeing.
    """
    problems = []
    count = 0
    for item in received:
        count += 1
        body, name = _body_and_name(item)
        try:
            validate_event(body)
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "(the body)"
            problems.append(f"{name}: at {where}: {exc.message}")
    assert count, "no webhook bodies to check"
    assert not problems, f"{len(problems)} of {count} webhook bodies break their schema:\n" + "\n".join(problems)
