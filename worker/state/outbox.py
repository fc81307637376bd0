"""Webhook events in Redis: pending deliveries, their attempts, and dead letters.

An event is a durable item (see ``worker.state.store``) whose body is kept in its own
key, as the exact bytes that are signed and sent. Dead letters stay until they
are replayed: nothing is dropped silently.

Bodies are written before their events exist: a step stages each body under a key
of its own claim (``stage_bodies``) as soon as it is built, and the script that
records the watch's outcome moves the staged bodies into place together with the
events (``WatchStore.finish``). A big job's parts thus never pass through one
script call, and bodies staged by a step that lost its claim simply expire.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis

from check365_client.names import PREFIX
from worker.delivery.events import EventHead
from worker.state import scripts
from worker.state.store import Booking, DurableSet, Lease, LogEntry, fmt, members

KIND = "event"
DEAD_KEY = f"{PREFIX}dead"
DELIVERED = "delivered"
DEAD = "dead"
# Staged bodies live this long unless the finish script makes them an event's: far
# longer than any step runs, short enough that a lost step's bodies do not linger.
STAGED_BODY_TTL_S = 3600
# Staged bodies are sent to Redis in batches of about this many bytes: few round
# trips, and never a whole big job's bodies buffered in the client at once.
_STAGE_BATCH_BYTES = 1 << 20


def _attempts(raw: Iterable[Any]) -> list[dict[str, Any]]:
    """Decode the attempt records, skipping any that are not JSON objects."""
    out = []
    for item in raw:
        try:
            value = json.loads(item)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


@dataclass(frozen=True)
class StoredEvent:
    webhook_id: str
    watch_id: str
    job_id: str
    type: str
    callback_url: str
    state: str
    tries: int
    due: float
    part_index: int
    part_count: int
    created_at: float
    replays: int = 0
    last_error: str | None = None
    queue: str = ""
    attempts: list[dict[str, Any]] = field(default_factory=list)
    # The attempt a step began (endpoint_admit.lua) and has not settled: if its holder is
    # not the step reading it, that attempt never returned.
    started: str = ""
    replayed_at: float = 0.0
    trace: str = ""  # the watch's traceparent: each attempt is a span of that trace

    @property
    def since(self) -> float:
        """When the current round of delivery began: creation, or the last replay."""
        return max(self.created_at, self.replayed_at)

    @classmethod
    def from_hash(cls, h: dict[str, str], attempts: list[dict[str, Any]]) -> StoredEvent:
        return cls(
            webhook_id=h["webhook_id"],
            watch_id=h.get("watch_id", ""),
            job_id=h.get("job_id", ""),
            type=h.get("type", ""),
            callback_url=h.get("callback_url", ""),
            state=h.get("state", ""),
            tries=int(h.get("tries") or 0),
            due=float(h.get("due") or 0),
            part_index=int(h.get("part_index") or 1),
            part_count=int(h.get("part_count") or 1),
            created_at=float(h.get("created_at") or 0),
            replays=int(h.get("replays") or 0),
            last_error=h.get("last_error") or None,
            queue=h.get("queue", ""),
            attempts=attempts,
            started=h.get("started", ""),
            replayed_at=float(h.get("replayed_at") or 0),
            trace=h.get("trace", ""),
        )


class ClaimedEvent(NamedTuple):
    """An event a step holds as ``holder``, with the exact bytes to sign and send."""

    event: StoredEvent
    body: bytes
    holder: str


class Outbox:
    def __init__(self, client: redis.Redis, *, state_ttl_s: float) -> None:
        self.redis = client
        self.items = DurableSet(client, KIND, "events")
        self.state_ttl_s = state_ttl_s

    def body_key(self, webhook_id: str) -> str:
        return f"{PREFIX}event_body:{webhook_id}"

    def attempts_key(self, webhook_id: str) -> str:
        return f"{PREFIX}event_attempts:{webhook_id}"

    def staged_body_key(self, holder: str, webhook_id: str) -> str:
        """Where the step holding claim ``holder`` keeps a body until its event exists."""
        return f"{PREFIX}staged_body:{holder}:{webhook_id}"

    def stage_bodies(self, holder: str, bodies: Iterable[tuple[str, bytes]]) -> None:
        """Store (webhook_id, body) pairs for the finish script of the step holding ``holder``."""
        with self.redis.pipeline(transaction=False) as pipe:
            pending = 0
            for webhook_id, body in bodies:
                pipe.set(self.staged_body_key(holder, webhook_id), body, ex=STAGED_BODY_TTL_S)
                pending += len(body)
                if pending >= _STAGE_BATCH_BYTES:
                    pipe.execute()
                    pending = 0
            pipe.execute()

    def discard_staged(self, holder: str, webhook_ids: Iterable[str]) -> None:
        """Free the bodies a step staged for events it did not create (they would expire anyway)."""
        keys = [self.staged_body_key(holder, webhook_id) for webhook_id in webhook_ids]
        for start in range(0, len(keys), 1000):
            self.redis.delete(*keys[start : start + 1000])

    def fields_for(
        self,
        event: EventHead,
        *,
        watch_id: str = "",
        job_id: str = "",
        callback_url: str = "",
        now: float = 0.0,
        queue: str = "",
        trace: str = "",
    ) -> dict[str, str]:
        """The event's own fields of a new event hash (``store.opening`` adds the protocol's)."""
        return {
            "webhook_id": event.webhook_id,
            "type": event.type,
            "part_index": str(event.part_index),
            "part_count": str(event.part_count),
            "tries": "0",
            "watch_id": watch_id,
            "job_id": job_id,
            "callback_url": callback_url,
            "created_at": fmt(now),
            "queue": queue,
            "trace": trace,
        }

    def get(self, webhook_id: str) -> StoredEvent | None:
        h = self.items.load(webhook_id)
        if not h or "webhook_id" not in h:
            return None
        return StoredEvent.from_hash(h, self.attempts(webhook_id))

    def body(self, webhook_id: str) -> bytes | None:
        raw = self.redis.get(self.body_key(webhook_id))
        return raw if isinstance(raw, bytes) else None

    def attempts(self, webhook_id: str) -> list[dict[str, Any]]:
        return _attempts(self.redis.lrange(self.attempts_key(webhook_id), 0, -1))

    def claim(self, webhook_id: str, token: str, lease: Lease) -> ClaimedEvent | None:
        """Take the delivery step and read the event, its body and its attempts in one call."""
        claim = self.items.claim(
            webhook_id, token, lease, blob_key=self.body_key(webhook_id), list_key=self.attempts_key(webhook_id)
        )
        if claim is None or claim.blob is None or "webhook_id" not in claim.fields:
            return None
        return ClaimedEvent(StoredEvent.from_hash(claim.fields, _attempts(claim.entries)), claim.blob, claim.holder)

    def _log(self, webhook_id: str, attempt: dict[str, Any]) -> LogEntry:
        return LogEntry(self.attempts_key(webhook_id), scripts.compact(attempt))

    def retry_later(
        self,
        webhook_id: str,
        holder: str,
        due: float,
        *,
        armed: bool,
        tries: int,
        last_error: str,
        attempt: dict[str, Any],
    ) -> Booking:
        """Schedule the next attempt, recording this one (run with the endpoint's settlement)."""
        return self.items.schedule(
            webhook_id,
            holder,
            due,
            armed=armed,
            fields={"tries": str(tries), "last_error": last_error, "started": ""},
            log=self._log(webhook_id, attempt),
        )

    def mark_delivered(self, webhook_id: str, holder: str, now: float, tries: int, attempt: dict[str, Any]) -> Booking:
        """Close the event as delivered, recording the attempt; its keys then expire together
        (run with the endpoint's settlement)."""
        return self.items.close(
            webhook_id,
            holder,
            DELIVERED,
            ttl_s=self.state_ttl_s,
            fields={"delivered_at": fmt(now), "tries": str(tries), "last_error": "", "started": ""},
            log=self._log(webhook_id, attempt),
            expire_also=[self.body_key(webhook_id)],
        )

    def dead_letter(
        self, webhook_id: str, holder: str, now: float, tries: int, *, reason: str, attempt: dict[str, Any]
    ) -> Booking:
        """Move the event to the dead letters (kept until replayed), recording the attempt
        (run with the endpoint's settlement)."""
        return self.items.close(
            webhook_id,
            holder,
            DEAD,
            into=(DEAD_KEY, now),
            fields={"dead_at": fmt(now), "tries": str(tries), "last_error": reason, "started": ""},
            log=self._log(webhook_id, attempt),
        )

    def dead_letters(self, limit: int = 1000) -> list[str]:
        return members(self.redis.zrange(DEAD_KEY, 0, limit - 1))

    def dead_letters_since(self, since: float) -> list[str]:
        """Every dead letter dead-lettered at or after ``since`` (unix seconds), oldest first."""
        return members(self.redis.zrangebyscore(DEAD_KEY, since, "+inf"))

    def replay(self, webhook_id: str, now: float) -> str | None:
        """Move a dead letter back to delivery; return the token its message must carry."""
        # A replay starts a new round: its retries, and the span it may wait for its endpoint.
        fields = {"tries": "0", "replayed_at": fmt(now), "started": ""}
        return self.items.reopen(webhook_id, now, was=DEAD, leaving=DEAD_KEY, count="replays", fields=fields)
