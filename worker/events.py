"""Building webhook events from a watch's outcome.

The body bytes built here are stored as they are and signed and sent unchanged on
every attempt, so a receiver always verifies exactly what was signed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from worker.signing import new_webhook_id

COMPLETED = "bulk_validation.completed"
FAILED = "bulk_validation.failed"
TIMED_OUT = "bulk_validation.timed_out"


@dataclass(frozen=True)
class Event:
    webhook_id: str
    type: str
    body: bytes
    part_index: int = 1
    part_count: int = 1


def iso_timestamp(now: float) -> str:
    return datetime.fromtimestamp(now, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _body(event_type: str, now: float, data: dict[str, Any]) -> bytes:
    return orjson.dumps({"type": event_type, "timestamp": iso_timestamp(now), "data": data})


def completed_events(
    watch_id: str,
    job_id: str,
    data: dict[str, Any],
    metadata: dict[str, Any] | None,
    *,
    per_part: int,
    now: float,
) -> list[Event]:
    """One event per slice of ``results``; every other field of ``data`` is kept unchanged."""
    results: Sequence[Any] = data.get("results") or []
    count = max(1, -(-len(results) // per_part))
    events = []
    for index in range(1, count + 1):
        part_data = dict(data)
        # Receivers key on jobId: supply it should Check365 ever leave it out.
        part_data.setdefault("jobId", job_id)
        part_data["results"] = results[(index - 1) * per_part : index * per_part]
        part_data["part"] = {"index": index, "count": count}
        part_data["metadata"] = metadata
        events.append(
            Event(
                webhook_id=new_webhook_id(watch_id, COMPLETED, str(index)),
                type=COMPLETED,
                body=_body(COMPLETED, now, part_data),
                part_index=index,
                part_count=count,
            )
        )
    return events


def failed_event(
    watch_id: str, job_id: str, reason: str, message: str, metadata: dict[str, Any] | None, *, now: float
) -> Event:
    data = {"jobId": job_id, "reason": reason, "message": message, "metadata": metadata}
    return Event(webhook_id=new_webhook_id(watch_id, FAILED), type=FAILED, body=_body(FAILED, now, data))


def timed_out_event(
    watch_id: str,
    job_id: str,
    status: str | None,
    progress: float | None,
    metadata: dict[str, Any] | None,
    *,
    now: float,
) -> Event:
    data = {
        "jobId": job_id,
        "reason": "timed_out",
        "status": status,
        "progress": progress,
        "metadata": metadata,
    }
    return Event(webhook_id=new_webhook_id(watch_id, TIMED_OUT), type=TIMED_OUT, body=_body(TIMED_OUT, now, data))
