"""Watch state in Redis: create and deduplicate, claim, advance, finish, re-arm.

A watch lives as the hash ``check365:watch:{watch_id}``; ``check365:active:{digest}``
maps the (job_id, callback_url) pair to its active watch, so enqueueing the same pair
again while it is active starts nothing new.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis

from check365_client.names import active_key, job_index_key
from worker.delivery.events import Event, EventHead
from worker.polling.schedule import Observation, observations_from_json, observations_to_json
from worker.state import scripts
from worker.state.endpoints import Admission, Gate, admission
from worker.state.outbox import ClaimedEvent, Outbox, StoredEvent
from worker.state.store import ACTIVE, DurableSet, Lease, closing, fmt, members, new_token, opening, text

KIND = "watch"
FINISHED = "finished"
CANCELLED = "cancelled"

# Bodies up to this size (in all) ride in the finish script's arguments instead of
# being staged first: one round trip instead of two, for every small job.
INLINE_BODIES_BYTES = 256 * 1024


def _float(value: str | None, default: float = 0.0) -> float:
    try:
        out = float(value) if value else default
    except ValueError:
        return default
    return out if math.isfinite(out) else default


@dataclass(frozen=True)
class Watch:
    watch_id: str
    job_id: str
    callback_url: str
    metadata: dict[str, Any] | None
    started_at: float
    deadline: float
    state: str
    polls: int = 0
    failures: int = 0
    last_status: str | None = None
    last_progress: float | None = None
    due: float = 0.0
    outcome: str | None = None
    finished_at: float | None = None
    short_since: float | None = None
    history: list[Observation] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    queue: str = ""
    # The W3C traceparent that this watch's poll and delivery spans continue ('' for none).
    trace: str = ""

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Watch:
        metadata = json.loads(h["metadata"]) if h.get("metadata") else None
        progress = h.get("last_progress")
        return cls(
            watch_id=h["watch_id"],
            job_id=h["job_id"],
            callback_url=h["callback_url"],
            metadata=metadata if isinstance(metadata, dict) else None,
            started_at=_float(h.get("started_at")),
            deadline=_float(h.get("deadline")),
            state=h.get("state", ""),
            polls=int(_float(h.get("polls"))),
            failures=int(_float(h.get("failures"))),
            last_status=h.get("last_status") or None,
            last_progress=_float(progress) if progress else None,
            due=_float(h.get("due")),
            outcome=h.get("outcome") or None,
            finished_at=_float(h.get("finished_at")) if h.get("finished_at") else None,
            short_since=_float(h.get("short_since")) if h.get("short_since") else None,
            history=observations_from_json(h.get("history") or "[]"),
            events=list(json.loads(h.get("events") or "[]")),
            queue=h.get("queue", ""),
            trace=h.get("trace", ""),
        )


@dataclass(frozen=True)
class Seen:
    """What a poll that got an answer from a job not yet done learnt."""

    status: str
    progress: float | None
    history: Sequence[Observation]
    at: float
    # When the job was first seen completed with results missing (None while it runs).
    short_since: float | None = None


class Created(NamedTuple):
    watch_id: str
    token: str | None  # None: a watch for the pair was already active (watch_id is that one)
    watch: Watch | None  # the new watch as written
    also: tuple[Any, ...] = ()  # the answers of the calls run with it (``create(also=...)``)


class Finishing(NamedTuple):
    tokens: list[tuple[str, str]]  # (webhook_id, token) of every event, for its message
    leased: ClaimedEvent | None  # the single event created claimed by the caller, if asked
    admission: Admission | None = None  # its gate's answer, when ``finish(gate=...)`` asked for it


class WatchStore:
    def __init__(self, client: redis.Redis, *, state_ttl_s: float) -> None:
        self.redis = client
        self.items = DurableSet(client, KIND, "watches")
        self.state_ttl_s = state_ttl_s
        self._create = scripts.load(client, "create_watch")
        self._finish = scripts.load(client, "finish_watch")

    def create(
        self,
        *,
        watch_id: str,
        job_id: str,
        callback_url: str,
        metadata: dict[str, Any] | None,
        now: float,
        first_poll_at: float,
        deadline: float,
        queue: str = "",
        lease: Lease | None = None,
        trace: str = "",
        also: Sequence[scripts.Call] = (),
    ) -> Created:
        """Create a watch unless one is active for the pair, or ``watch_id`` exists already.

        The new watch waits for its first poll's message, which must carry the
        returned token. With a ``lease`` it is created already claimed by the
        caller, who polls it at once: the token is then the holder's. The calls
        ``also`` run after it in the same round trip, whatever it found.
        """
        token = new_token()
        due = first_poll_at if lease is None else lease.until
        fields = {
            "watch_id": watch_id,
            "job_id": job_id,
            "callback_url": callback_url,
            "metadata": json.dumps(metadata, separators=(",", ":")) if metadata is not None else "",
            "started_at": fmt(now),
            "deadline": fmt(deadline),
            **opening(token, due, armed=lease is None),
            "polls": "0",
            "failures": "0",
            # The queue its messages travel on, so that the sweep re-arms it there.
            "queue": queue,
            "trace": trace,
        }
        create = scripts.Call(
            self._create,
            [active_key(job_id, callback_url), self.items.key(watch_id), self.items.due_key, job_index_key(job_id)],
            [
                scripts.spec(
                    watch_id=watch_id,
                    due=fmt(due),
                    ttl=str(int(self.state_ttl_s + (deadline - now))),
                    watch_prefix=self.items.key(""),
                    fields=fields,
                    lease_s="" if lease is None else fmt(lease.seconds),
                )
            ],
        )
        existing, *answers = scripts.run_together(self.redis, [create, *also]) if also else [create.run()]
        existing_id = text(existing)
        if existing_id:
            return Created(existing_id, None, None, tuple(answers))
        return Created(watch_id, token, Watch.from_hash(fields), tuple(answers))

    def get(self, watch_id: str) -> Watch | None:
        h = self.items.load(watch_id)
        return Watch.from_hash(h) if h and "watch_id" in h else None

    def claim(self, watch_id: str, token: str, lease: Lease) -> tuple[Watch, str] | None:
        claim = self.items.claim(watch_id, token, lease)
        if claim is None or "watch_id" not in claim.fields:
            return None
        return Watch.from_hash(claim.fields), claim.holder

    def advance(
        self,
        watch_id: str,
        holder: str,
        due: float,
        *,
        polls: int | None = None,
        failures: int | None = None,
        seen: Seen | None = None,
    ) -> bool:
        """Schedule the next poll at ``due``, recording the counts and what this poll saw."""
        fields: dict[str, str] = {}
        if polls is not None:
            fields["polls"] = str(polls)
        if failures is not None:
            fields["failures"] = str(failures)
        if seen is not None:
            fields |= {
                "last_status": seen.status,
                "last_progress": "" if seen.progress is None else repr(float(seen.progress)),
                "history": scripts.compact(observations_to_json(seen.history)),
                "last_poll_at": fmt(seen.at),
                "short_since": "" if seen.short_since is None else fmt(seen.short_since),
            }
        return self.items.run(self.items.schedule(watch_id, holder, due, armed=True, fields=fields))

    def finish(
        self,
        watch: Watch,
        holder: str,
        outcome: str,
        events: Sequence[Event | EventHead],
        *,
        outbox: Outbox,
        now: float,
        lease: Lease | None = None,
        gate: Callable[[ClaimedEvent], Gate] | None = None,
    ) -> Finishing | None:
        """Record the outcome and create its events, returning what to dispatch.

        ``Event`` bodies go with the script when they are small in all, else they are
        staged here; an ``EventHead``'s body must have been staged by the caller with
        ``outbox.stage_bodies(holder, ...)``. With a ``lease`` the events are
        created claimed by the caller, who delivers them; a single one's first attempt
        then passes its endpoint's ``gate`` (the call for the event as created) in the
        same script, when the caller gives one. Returns None, and discards the staged
        bodies, when the claim was lost or a staged body is gone.
        """
        full = [e for e in events if isinstance(e, Event)]
        inline = sum(len(e.body) for e in full) <= INLINE_BODIES_BYTES
        if not inline:
            outbox.stage_bodies(holder, ((e.webhook_id, e.body) for e in full))
        due = now if lease is None else lease.until
        tokens: list[tuple[str, str]] = []
        heads: list[dict[str, str]] = []
        bodies: list[bytes] = []
        for event in events:
            head = event.head if isinstance(event, Event) else event
            token = new_token()
            tokens.append((head.webhook_id, token))
            fields = outbox.fields_for(
                head,
                watch_id=watch.watch_id,
                job_id=watch.job_id,
                callback_url=watch.callback_url,
                now=now,
                queue=watch.queue,
                trace=watch.trace,
            )
            heads.append({**fields, **opening(token, due, armed=lease is None)})
            bodies.append(event.body if inline and isinstance(event, Event) else b"")
        ids = [h["webhook_id"] for h in heads]
        claimed = None
        if lease is not None and len(events) == 1 and isinstance(events[0], Event):
            # The event's holder token is its new token: the caller delivers it as that holder.
            claimed = ClaimedEvent(StoredEvent.from_hash(heads[0], []), events[0].body, heads[0]["token"])
        gated = None if gate is None or claimed is None else gate(claimed)
        raw = self._finish(
            keys=[
                self.items.key(watch.watch_id),
                self.items.due_key,
                active_key(watch.job_id, watch.callback_url),
                outbox.items.due_key,
                *(gated.keys if gated is not None else ()),
            ],
            args=[
                scripts.spec(
                    holder=holder,
                    watch_id=watch.watch_id,
                    ttl=fmt(self.state_ttl_s),
                    watch={
                        **closing(FINISHED),
                        "outcome": outcome,
                        "finished_at": fmt(now),
                        "events": scripts.compact(ids),
                        "polls": str(watch.polls),
                        # What the last poll saw, which `status` shows: the finishing poll's
                        # answer when it had one.
                        "last_status": watch.last_status or "",
                        "last_progress": "" if watch.last_progress is None else repr(float(watch.last_progress)),
                    },
                    event_prefix=outbox.items.key(""),
                    body_prefix=outbox.body_key(""),
                    staged_prefix=outbox.staged_body_key(holder, ""),
                    due=fmt(due),
                    leased=lease is not None,
                    lease_s="" if lease is None else fmt(lease.seconds),
                    events=[{"id": h["webhook_id"], "fields": h} for h in heads],
                    # Absent rather than null: cjson's null is true in Lua.
                    **({"gate": gated.arg} if gated is not None else {}),
                ),
                *bodies,
            ],
        )
        # With a gate the script answers {done, the gate's answer (when it ran)}; without, done alone.
        done, *gate_answer = raw if gated is not None else [raw]
        if done not in (1, 2):
            staged = [e.webhook_id for e in events if not (inline and isinstance(e, Event))]
            if staged:
                outbox.discard_staged(holder, staged)
            return None
        if done == 2 and claimed is not None:
            return Finishing(tokens, claimed, admission(gate_answer[0]) if gate_answer else None)
        return Finishing(tokens, None)

    def cancel(self, watch_id: str) -> bool:
        """Stop a watch without an event: an operator's decision, not an outcome of the job."""
        watch = self.get(watch_id)
        if watch is None or watch.state != ACTIVE:
            return False
        return self.items.stop(
            watch_id,
            CANCELLED,
            ttl_s=self.state_ttl_s,
            fields={"outcome": CANCELLED},
            release=[active_key(watch.job_id, watch.callback_url)],
        )

    def for_job(self, job_id: str) -> list[Watch]:
        ids = sorted(members(self.redis.smembers(job_index_key(job_id))))
        watches = [w for w in (self.get(i) for i in ids) if w is not None]
        return sorted(watches, key=lambda w: w.started_at)

    def active_ids(self, limit: int = 1000) -> list[str]:
        return members(self.redis.zrange(self.items.due_key, 0, limit - 1))
