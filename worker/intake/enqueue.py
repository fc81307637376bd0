"""The watch request rules of the contract, and the Python helper that enqueues a watch.

Importing this module builds no Celery app and starts nothing: services that only
enqueue can use it cheaply.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from worker.delivery.urls import validate_callback_url
from worker.errors import InvalidWatchRequest
from worker.runtime.celeryconfig import WATCH_TASK
from worker.settings import Settings, load_settings

JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_METADATA_BYTES = 4096
# Metadata travels nested in the message, which the worker refuses past 64 levels in
# all (worker.intake.boundary): refused here, at the producer, with its own reason.
MAX_METADATA_NESTING = 32
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


def _reject_non_finite(value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidWatchRequest("metadata", "must not contain NaN or Infinity (not JSON)")
    if isinstance(value, dict):
        for v in value.values():
            _reject_non_finite(v)
    elif isinstance(value, list):
        for v in value:
            _reject_non_finite(v)


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


def validate_metadata(metadata: object) -> dict[str, Any] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise InvalidWatchRequest("metadata", f"must be a JSON object, got {type(metadata).__name__}")
    if nested_deeper_than(metadata, MAX_METADATA_NESTING):
        raise InvalidWatchRequest("metadata", f"must be nested at most {MAX_METADATA_NESTING} levels deep")
    try:
        encoded = json.dumps(metadata, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidWatchRequest("metadata", f"must be JSON-serializable ({type(exc).__name__})") from None
    if len(encoded.encode("utf-8", "surrogatepass")) > MAX_METADATA_BYTES:
        raise InvalidWatchRequest("metadata", f"must serialize to at most {MAX_METADATA_BYTES} bytes")
    try:
        encoded.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidWatchRequest("metadata", "must be valid unicode (lone surrogates found)") from None
    if any(not isinstance(k, str) for k in metadata):
        raise InvalidWatchRequest("metadata", "keys must be strings")
    _reject_non_finite(metadata)
    parsed: dict[str, Any] = json.loads(encoded)
    try:
        # Events are serialised with orjson, whose integers are 64-bit: refuse here
        # what could not be echoed later.
        orjson.dumps(parsed)
    except TypeError:
        raise InvalidWatchRequest("metadata", "integers must fit in 64 bits") from None
    return parsed


def validate_watch_request(
    kwargs: object, *, allow_http: bool, allow_private: bool, allow_internal: bool = False
) -> WatchRequest:
    """Check a watch's kwargs against the contract; raise InvalidWatchRequest naming the rule."""
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
    callback_url = validate_callback_url(kwargs["callback_url"], allow_http=allow_http, allow_private=allow_private)
    metadata = validate_metadata(kwargs.get("metadata"))
    return WatchRequest(job_id=job_id, callback_url=callback_url, metadata=metadata)


_client_apps: dict[str, Any] = {}


def client_app(settings: Settings) -> Any:
    """A minimal Celery app that can only send: no tasks, no worker settings."""
    app = _client_apps.get(settings.redis_url)
    if app is None:
        from celery import Celery

        app = Celery("check365-client", broker=settings.redis_url, set_as_current=False)
        app.conf.broker_transport_options = {"visibility_timeout": settings.broker_visibility_timeout_s}
        app.conf.broker_connection_retry_on_startup = True
        _client_apps[settings.redis_url] = app
    return app


def enqueue_watch(
    job_id: str,
    callback_url: str,
    metadata: dict[str, Any] | None = None,
    *,
    settings: Settings | None = None,
    app: Any = None,
) -> str:
    """Validate a watch request and enqueue it; return the Celery task id.

    Raises InvalidWatchRequest before anything is sent when a rule is broken.
    """
    settings = settings or load_settings(process="cli")
    request = validate_watch_request(
        {"job_id": job_id, "callback_url": callback_url, "metadata": metadata},
        allow_http=settings.webhook_allow_http,
        allow_private=settings.webhook_allow_private_networks,
    )
    sender = app if app is not None else client_app(settings)
    result = sender.send_task(WATCH_TASK, kwargs=request.kwargs(), queue=settings.queue)
    return str(result.id)
