"""Which beat sends the sweeps, and when they last ran: beat's liveness, read from Redis.

Every sweep records the origin of its message (Celery's ``gen<pid>@<host>`` of the
beat that sent it) with the first and the last time a sweep it sent ran. The
metrics (last-sweep timestamp), ``doctor`` (exactly one beat) and the beat
container's healthcheck read them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import redis

from check365_client.names import PREFIX
from worker.state.store import fmt, text

# Per beat (the origin of its sweep messages, "gen<pid>@<host>"): the first and the
# last time a sweep it sent ran.
BEAT_FIRST_KEY = f"{PREFIX}beat:first"
BEAT_LAST_KEY = f"{PREFIX}beat:last"
# A beat not heard of for this long is forgotten (restarts leave one entry each).
BEAT_FORGET_S = 86400.0
_ORIGIN = re.compile(r"[^A-Za-z0-9@._:-]")


@dataclass(frozen=True)
class Beat:
    origin: str
    first: float
    last: float


def record_sweep(client: redis.Redis, origin: str | None, now: float) -> None:
    """Note that a sweep sent by ``origin`` runs now."""
    name = _ORIGIN.sub("_", origin or "unknown")[:120] or "unknown"
    with client.pipeline(transaction=False) as pipe:
        pipe.hsetnx(BEAT_FIRST_KEY, name, fmt(now))
        pipe.hset(BEAT_LAST_KEY, name, fmt(now))
        pipe.hgetall(BEAT_LAST_KEY)
        *_, last = pipe.execute()
    stale = [k for k, v in last.items() if now - float(v) > BEAT_FORGET_S]
    if stale:
        client.hdel(BEAT_FIRST_KEY, *stale)
        client.hdel(BEAT_LAST_KEY, *stale)


def recent_beats(client: redis.Redis, now: float, within_s: float) -> list[Beat]:
    """The beats whose sweeps ran in the last ``within_s`` seconds, latest first."""
    with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(BEAT_FIRST_KEY)
        pipe.hgetall(BEAT_LAST_KEY)
        first, last = pipe.execute()
    beats = [
        Beat(str(text(k)), float(first.get(k, v)), float(v)) for k, v in last.items() if now - float(v) <= within_s
    ]
    return sorted(beats, key=lambda b: b.last, reverse=True)


def overlapping(beats: list[Beat], interval_s: float) -> list[Beat]:
    """The beats that sent sweeps over the same stretch of time: more than one is a fault.

    A restarted beat has a new origin; the old one's sweeps stopped before the new
    one's began, so the two do not overlap and are not counted twice.
    """
    if len(beats) < 2:
        return beats
    latest_start = max(b.first for b in beats)
    # Both sweeping for over an interval since the later one started.
    return [b for b in beats if b.last - latest_start > interval_s]


def last_sweep(client: redis.Redis) -> float | None:
    values = [float(v) for v in client.hvals(BEAT_LAST_KEY)]
    return max(values) if values else None
