"""What the whole deployment is doing, read from Redis: liveness, backlogs, pauses.

The metrics endpoint, ``/readyz`` and ``doctor`` all read the pool through
``read_pool_state``, so that they agree. Everything here is one pipeline and one
bounded script, cheap enough for every scrape of every worker.

"Overdue" is work whose due time has passed and that no step holds: a poll or a
delivery attempt waiting in a queue, or one whose message was lost and that the
sweep has yet to re-arm. A running step holds its item until its lease ends, so it
is not overdue. A healthy pool keeps the oldest overdue age near zero; it grows
when the workers cannot keep up, when none runs, or when beat is down and lost
messages are not re-armed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis

from check365_client.names import PREFIX
from worker.polling.ratelimit import BLOCKED_KEY, KEY_REFUSED_KEY, TURNS_KEY
from worker.state import scripts
from worker.state.beats import BEAT_LAST_KEY
from worker.state.outbox import DEAD_KEY, Outbox
from worker.state.store import text
from worker.state.watches import WatchStore

# Pending events whose creation time is read at each look, oldest due first. Past
# this many, the oldest pending age is that of the ones read (a lower bound).
PENDING_AGE_SCAN = 10_000
PAUSE_CAUSES = ("rate_limit", "retry_after", "key_refused")


@dataclass(frozen=True)
class Backlog:
    count: int
    oldest_age_s: float  # 0 when empty


@dataclass(frozen=True)
class PoolState:
    now: float  # Redis's clock
    watches_active: int
    watches_overdue: Backlog
    events_pending: Backlog  # age since the event was created
    events_overdue: Backlog
    dead_letters: int
    last_sweep: float | None  # when the latest sweep ran, if ever
    # Seconds left of each pause in force (key_refused: seconds since the key was refused).
    pauses: dict[str, float] = field(default_factory=dict)


class PoolReader:
    """Reads ``PoolState`` over one Redis connection; build it once and call it per look."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        # The stores name their own keys; asking them keeps the reads on the right ones.
        self._watches_due = WatchStore(client, state_ttl_s=1).items.due_key
        self._events_due = Outbox(client, state_ttl_s=1).items.due_key
        self._oldest_created = scripts.load(client, "oldest_created")

    def read(self) -> PoolState:
        seconds, micros = self.redis.time()
        now = seconds + micros / 1e6
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self._watches_due)
            pipe.zcount(self._watches_due, "-inf", repr(now))
            pipe.zrange(self._watches_due, 0, 0, withscores=True)
            pipe.zcard(self._events_due)
            pipe.zcount(self._events_due, "-inf", repr(now))
            pipe.zrange(self._events_due, 0, 0, withscores=True)
            pipe.zcard(DEAD_KEY)
            pipe.hvals(BEAT_LAST_KEY)
            pipe.mget(TURNS_KEY, BLOCKED_KEY, KEY_REFUSED_KEY)
            (
                watches,
                watches_late,
                watches_first,
                events,
                events_late,
                events_first,
                dead,
                sweeps,
                (turns, blocked, refused),
            ) = pipe.execute()
        created = self._oldest_created(keys=[self._events_due], args=[f"{PREFIX}event:", PENDING_AGE_SCAN])
        pauses: dict[str, float] = {}
        for cause, until in (("rate_limit", turns), ("retry_after", blocked)):
            left = _float(until) - now
            if left > 0:
                pauses[cause] = left
        if refused is not None:
            pauses["key_refused"] = max(0.0, now - _float(refused))
        return PoolState(
            now=now,
            watches_active=int(watches),
            watches_overdue=Backlog(int(watches_late), _late(watches_first, now) if watches_late else 0.0),
            events_pending=Backlog(int(events), max(0.0, now - _float(created)) if created else 0.0),
            events_overdue=Backlog(int(events_late), _late(events_first, now) if events_late else 0.0),
            dead_letters=int(dead),
            last_sweep=max((float(v) for v in sweeps), default=None),
            pauses=pauses,
        )


def _float(raw: bytes | str | None) -> float:
    try:
        return float(text(raw) or 0)
    except ValueError:
        return 0.0


def _late(first: list[tuple[bytes, float]], now: float) -> float:
    return max(0.0, now - first[0][1]) if first else 0.0
