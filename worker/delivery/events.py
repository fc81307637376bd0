"""Building webhook events from a watch's outcome.

The body bytes built here are stored as they are and signed and sent unchanged on
every attempt, so a receiver always verifies exactly what was signed.

A completed job is split into parts built one at a time (``iter_completed_events``):
a caller that stores each part before asking for the next holds one part's results
and body, however big the job.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

import orjson

from worker.delivery.signing import new_webhook_id

# The fields of Check365's data object that every part carries. Any other field it
# sends goes into part 1 only: copied into every part, a large one would be sent
# part-count times over.
PART_FIELDS = frozenset({"jobId", "status", "creditsUsed", "progress", "total"})

COMPLETED = "bulk_validation.completed"
FAILED = "bulk_validation.failed"
TIMED_OUT = "bulk_validation.timed_out"


@dataclass(frozen=True)
class EventHead:
    """An event without its body: what the outbox records next to the stored body."""

    webhook_id: str
    type: str
    part_index: int = 1
    part_count: int = 1


@dataclass(frozen=True)
class Event:
    webhook_id: str
    type: str
    body: bytes
    part_index: int = 1
    part_count: int = 1

    @property
    def head(self) -> EventHead:
        return EventHead(self.webhook_id, self.type, self.part_index, self.part_count)


def iso_timestamp(now: float, *, milliseconds: bool = False) -> str:
    """``now`` (unix seconds) in ISO 8601 UTC ending in ``Z``: the one form of every time we write.

    Whole seconds in event bodies (the contract's form); milliseconds where attempts a
    fraction of a second apart must stay distinct (attempt records, the CLI). The same
    text as ``datetime.isoformat``, with each second formatted once: a job writes four.
    """
    if now < 0:
        stamp = datetime.fromtimestamp(now, tz=UTC).isoformat(timespec="milliseconds" if milliseconds else "seconds")
        return stamp.replace("+00:00", "Z")
    # As datetime.fromtimestamp does: the fraction rounded to microseconds, then truncated.
    fraction, whole = math.modf(now)
    micros = round(fraction * 1_000_000)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    seconds = iso_second(int(whole))
    return f"{seconds}.{micros // 1000:03d}Z" if milliseconds else f"{seconds}Z"


@lru_cache(maxsize=8)
def iso_second(whole: int) -> str:
    """A whole second (unix, not negative) as ISO 8601 UTC, without the zone: formatted once per second."""
    return datetime.fromtimestamp(whole, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


@runtime_checkable
class JsonSlices(Protocol):
    """Results kept as JSON text (a big answer's): counted, and read back in slices."""

    def __len__(self) -> int: ...

    def json_slices(self, size: int) -> Iterator[bytes]:
        """JSON arrays of ``size`` results each, in order (the last may be shorter)."""
        ...


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
    """One event per slice of ``results``; the other fields of ``data`` are kept unchanged
    (those beyond ``PART_FIELDS`` in part 1 only)."""
    return list(iter_completed_events(watch_id, job_id, data, metadata, per_part=per_part, now=now))


def iter_completed_events(
    watch_id: str,
    job_id: str,
    data: dict[str, Any],
    metadata: dict[str, Any] | None,
    *,
    per_part: int,
    now: float,
) -> Iterator[Event]:
    """The events of ``completed_events``, each built only when asked for.

    ``data["results"]`` is a list, or the ``JsonSlices`` of a big answer, whose
    results go into the bodies as the JSON text Check365 sent. Fields of ``data``
    beyond ``PART_FIELDS`` are in part 1 only.
    """
    results: Sequence[Any] | JsonSlices = data.get("results") or []
    count = max(1, -(-len(results) // per_part))
    slices: Iterator[Any]
    # The list first: a check against a runtime Protocol costs tens of microseconds.
    if not isinstance(results, list) and isinstance(results, JsonSlices):
        # JSON text checked when the answer was read: written into the bodies as it is.
        slices = (orjson.Fragment(raw) for raw in results.json_slices(per_part))
    else:
        slices = (results[start : start + per_part] for start in range(0, count * per_part, per_part))
    others = {k: v for k, v in data.items() if k in PART_FIELDS}
    for index, results_slice in enumerate(slices, start=1):
        part_data = dict(data) if index == 1 else dict(others)
        # Receivers key on jobId: supply it should Check365 ever leave it out.
        part_data.setdefault("jobId", job_id)
        part_data["results"] = results_slice
        part_data["part"] = {"index": index, "count": count}
        part_data["metadata"] = metadata
        yield Event(
            webhook_id=new_webhook_id(watch_id, COMPLETED, str(index)),
            type=COMPLETED,
            body=_body(COMPLETED, now, part_data),
            part_index=index,
            part_count=count,
        )


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


# The contract's example result: what a sample event carries.
SAMPLE_RESULT = {
    "email": "name@company.com",
    "emailProvider": "unknown",
    "emailType": "unknown",
    "status": "unvalidated",
    "safeToSend": False,
    "risk": "high",
    "isRole": False,
    "statusReason": "invalid_domain",
}
SAMPLE_MESSAGE = "a test event from check365-worker send-test: no job was watched"


def sample_event(event_type: str, *, now: float, nonce: str) -> Event:
    """An event of ``event_type`` for no job, marked ``"test": true`` in its data, valid against its schema.

    ``nonce`` makes its job id and webhook-id unique: a receiver must not drop it as a duplicate.
    """
    watch_id, job_id = f"test_{nonce}", f"test-{nonce}"
    if event_type == COMPLETED:
        data = {"jobId": job_id, "status": "completed", "creditsUsed": 1, "progress": 100, "total": 1}
        event = next(
            iter_completed_events(watch_id, job_id, {**data, "results": [SAMPLE_RESULT]}, None, per_part=1, now=now)
        )
    elif event_type == FAILED:
        event = failed_event(watch_id, job_id, "job_failed", SAMPLE_MESSAGE, None, now=now)
    elif event_type == TIMED_OUT:
        event = timed_out_event(watch_id, job_id, "processing", 42.0, None, now=now)
    else:
        raise ValueError(f"no event type {event_type!r}")
    body = orjson.loads(event.body)
    body["data"]["test"] = True
    return Event(event.webhook_id, event.type, orjson.dumps(body), event.part_index, event.part_count)
