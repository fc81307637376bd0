"""JSON Schemas (draft 2020-12) of the webhook bodies, one per event type.

The schemas ship inside the package (``worker/delivery/schemas/<type>.json``) so that a
receiver can validate against the very version of the worker that sends to it.
Validation needs ``jsonschema``, which is a development dependency only: the
worker itself never validates what it sends at run time (the tests do).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

from worker.delivery.events import COMPLETED, FAILED, TIMED_OUT

EVENT_TYPES = (COMPLETED, FAILED, TIMED_OUT)


@functools.cache
def _schema_text(event_type: str) -> str:
    return resources.files("worker.delivery").joinpath("schemas", f"{event_type}.json").read_text(encoding="utf-8")


def load_schema(event_type: str) -> dict[str, Any]:
    """The schema of ``event_type``, as a fresh dict the caller may change."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}; expected one of {', '.join(EVENT_TYPES)}")
    schema: dict[str, Any] = json.loads(_schema_text(event_type))
    return schema


def validate_event(event: bytes | str | Mapping[str, Any]) -> None:
    """Check one webhook body against the schema of its ``type``.

    ``event`` is the raw body (bytes or text), or the object a Standard Webhooks
    library's ``verify`` returns (its parsed body). Raises ``jsonschema.ValidationError``
    for any violation, including a body that is not JSON or names no known event type.
    """
    import jsonschema  # type: ignore[import-untyped]  # a dev dependency without type information

    parsed: object
    if isinstance(event, Mapping):
        parsed = dict(event)
    elif isinstance(event, bytes | bytearray | str):
        try:
            parsed = json.loads(event)
        except ValueError as exc:
            raise jsonschema.ValidationError(f"the body is not JSON: {exc}") from None
    else:
        raise TypeError(f"validate_event takes the raw body or its parsed object, not {type(event).__name__}")
    event_type = parsed.get("type") if isinstance(parsed, dict) else None
    if event_type not in EVENT_TYPES:
        raise jsonschema.ValidationError(f"'type' must be one of {', '.join(EVENT_TYPES)}, got {event_type!r}")
    validator_class = jsonschema.Draft202012Validator
    validator = validator_class(load_schema(event_type), format_checker=validator_class.FORMAT_CHECKER)
    error = jsonschema.exceptions.best_match(validator.iter_errors(parsed))
    if error is not None:
        raise error
