"""The contract's rules for a watch's kwargs: the one implementation, shared with the worker.

The producer's client checks them before anything is sent; the worker checks every
message again (a foreign producer may send anything) and rejects what breaks them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from check365_client.endpoints import Endpoints, callback_rules
from check365_client.errors import InvalidWatchRequest
from check365_client.urls import validate_callback_url

JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_METADATA_BYTES = 4096
# Metadata travels nested in the message, which the worker refuses past 64 levels in
# all (worker.intake.boundary): refused here, at the producer, with its own reason.
MAX_METADATA_NESTING = 32
# Events are serialised with orjson, whose integers are 64-bit: what could not be echoed
# later is refused now.
_INT64 = range(-(2**63), 2**64)
PUBLIC_FIELDS = frozenset({"job_id", "callback_url", "metadata"})
# The worker's own re-schedules carry these besides the public fields.
INTERNAL_FIELDS = frozenset({"watch_id", "token"})


@dataclass(frozen=True)
class WatchRequest:
    job_id: str
    callback_url: str
    metadata: dict[str, Any] | None = None

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"job_id": self.job_id, "callback_url": self.callback_url}
        if self.metadata is not None:
            out["metadata"] = self.metadata
        return out


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_job_id(job_id: object) -> str:
    if not isinstance(job_id, str):
        raise InvalidWatchRequest("job_id", f"must be a string, got {type(job_id).__name__}")
    if not JOB_ID_PATTERN.fullmatch(job_id):
        raise InvalidWatchRequest("job_id", f"must be 1-128 chars of A-Za-z0-9._:- , got {_short(job_id)}")
    return job_id


def nested_deeper_than(value: object, limit: int) -> bool:
    """Whether objects and arrays in ``value`` nest more than ``limit`` levels (without recursing)."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list | tuple):
            stack.extend((v, depth + 1) for v in item)
    return False


def _check_numbers(value: object) -> None:
    """Refuse numbers that the events could not carry, each with its own reason."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, int) and item not in _INT64:
            raise InvalidWatchRequest("metadata", "integers must fit in 64 bits")
        if isinstance(item, float) and not math.isfinite(item):
            raise InvalidWatchRequest("metadata", f"must not contain NaN or Infinity (JSON has no such number: {item})")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def validate_metadata(metadata: object) -> dict[str, Any] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidWatchRequest("metadata", f"must be a JSON object, got {type(metadata).__name__}")
    if nested_deeper_than(metadata, MAX_METADATA_NESTING):
        raise InvalidWatchRequest("metadata", f"must be nested at most {MAX_METADATA_NESTING} levels deep")
    # Before serializing: json.dumps would refuse NaN with a ValueError that names nothing.
    _check_numbers(metadata)
    try:
        encoded = json.dumps(metadata, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidWatchRequest("metadata", f"must be JSON-serializable ({type(exc).__name__})") from None
    size = len(encoded.encode("utf-8", "surrogatepass"))
    if size > MAX_METADATA_BYTES:
        raise InvalidWatchRequest(
            "metadata", f"must serialize to at most {MAX_METADATA_BYTES:,} bytes; this one is {size:,} bytes"
        )
    try:
        encoded.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidWatchRequest("metadata", "must be valid unicode (lone surrogates found)") from None
    if any(not isinstance(k, str) for k in metadata):
        raise InvalidWatchRequest("metadata", "keys must be strings")
    parsed: dict[str, Any] = json.loads(encoded)
    return parsed


def validate_watch_request(
    kwargs: object,
    *,
    allow_http: bool,
    allow_private: bool,
    allow_internal: bool = False,
    endpoints: Endpoints | None = None,
    endpoints_only: bool = False,
) -> WatchRequest:
    """Check a watch's kwargs against the contract; raise InvalidWatchRequest naming the rule.

    With ``endpoints``, a callback URL of an endpoint gets that endpoint's flags; with
    ``endpoints_only`` too, a URL matching none raises UnregisteredEndpoint.
    """
    if not isinstance(kwargs, Mapping):
        raise InvalidWatchRequest("kwargs", f"must be an object, got {type(kwargs).__name__}")
    allowed = PUBLIC_FIELDS | INTERNAL_FIELDS if allow_internal else PUBLIC_FIELDS
    unknown = sorted(str(k)[:40] for k in kwargs if k not in allowed)
    if unknown:
        raise InvalidWatchRequest("kwargs", f"unknown fields: {', '.join(unknown)[:200]}")
    for required in ("job_id", "callback_url"):
        if required not in kwargs:
            raise InvalidWatchRequest(required, "is required")
    job_id = validate_job_id(kwargs["job_id"])
    rules = callback_rules(
        kwargs["callback_url"],
        endpoints,
        allow_http=allow_http,
        allow_private=allow_private,
        endpoints_only=endpoints_only,
    )
    callback_url = validate_callback_url(
        kwargs["callback_url"], allow_http=rules.allow_http, allow_private=rules.allow_private
    )
    metadata = validate_metadata(kwargs.get("metadata"))
    return WatchRequest(job_id=job_id, callback_url=callback_url, metadata=metadata)
