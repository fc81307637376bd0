"""Watch state in Redis: create and deduplicate, claim, advance, finish, re-arm.

A watch lives as the hash ``check365:watch:{watch_id}``; ``check365:active:{digest}``
maps the (job_id, callback_url) pair to its active watch, so enqueueing the same pair
again while it is active starts nothing new.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis

from check365_client.names import PREFIX, active_key, job_index_key
from worker.delivery.events import Event, EventHead
from worker.polling.schedule import Observation, observations_from_json
from worker.state.outbox import Outbox, StoredEvent
from worker.state.store import ACTIVE, DurableSet, flatten, fmt, members, new_token, text

KIND = "watch"

# A watch id is derived from the start message's id: a message the broker delivers
# again (its worker died before acknowledging it) finds its watch, even a finished one.
# KEYS: active key, watch hash, due zset, job index
# ARGV: watch_id, due, ttl, then field/value pairs
_CREATE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return ARGV[1] end
local existing = redis.call('GET', KEYS[1])
if existing then
  if redis.call('HGET', ARGV[4] .. existing, 'state') == 'active' then return existing end
end
redis.call('SET', KEYS[1], ARGV[1])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('EXPIRE', KEYS[4], ARGV[3])
return ''
"""

# Finishing a watch and creating its events is one atomic step, so an outcome can
# never exist without the events that announce it. A small body travels in the
# script's arguments; bigger ones were staged by the step (see worker.state.outbox) and are
# renamed into place here, so that a big job's bodies never pass through one call.
# Every staged body is checked before anything is written, since a script that
# stopped half-way would keep its writes.
# With a lease end, the events are created claimed by the caller until then (their
# token is the caller's holder), so that the step can deliver a single event itself.
# KEYS: watch hash, due:watches, active key, due:events
# ARGV: holder, now, outcome, ttl, prefix, watch_id, n, polls, staged-body key prefix,
#       body key prefix, event lease end ('' = none), then per event: id, token,
#       fields-json, body ('' = staged)
# Returns 2 when finished with every event leased to the caller, 1 when finished,
# 0 when the claim was lost, -1 when a staged body is missing.
_FINISH = """
if redis.call('HGET', KEYS[1], 'state') ~= 'active' then return 0 end
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
local prefix = ARGV[5]
local n = tonumber(ARGV[7])
local due, armed, result = ARGV[2], '1', 1
if ARGV[11] ~= '' then due, armed, result = ARGV[11], '0', 2 end
for i = 0, n - 1 do
  local id = ARGV[12 + i * 4]
  if ARGV[15 + i * 4] == '' and redis.call('EXISTS', prefix .. 'event:' .. id) == 0
     and redis.call('EXISTS', ARGV[9] .. id) == 0 then
    return -1
  end
end
local ids = {}
for i = 0, n - 1 do
  local base = 12 + i * 4
  local id = ARGV[base]
  local ekey = prefix .. 'event:' .. id
  local staged = ARGV[9] .. id
  local inline = ARGV[base + 3]
  if redis.call('EXISTS', ekey) == 0 then
    local f = cjson.decode(ARGV[base + 2])
    for k, v in pairs(f) do redis.call('HSET', ekey, k, v) end
    redis.call('HSET', ekey, 'token', ARGV[base + 1], 'state', 'active', 'due', due, 'armed', armed)
    local body = ARGV[10] .. id
    if inline == '' then
      redis.call('RENAME', staged, body)
      redis.call('PERSIST', body)
    else
      redis.call('SET', body, inline)
    end
    redis.call('ZADD', KEYS[4], due, id)
  else
    -- Not this step's to claim: it already exists, waiting for its own message.
    result = 1
    if inline == '' then redis.call('DEL', staged) end
  end
  table.insert(ids, id)
end
redis.call('HSET', KEYS[1], 'state', 'finished', 'token', '', 'outcome', ARGV[3],
           'finished_at', ARGV[2], 'events', cjson.encode(ids), 'polls', ARGV[8])
redis.call('ZREM', KEYS[2], ARGV[6])
if redis.call('GET', KEYS[3]) == ARGV[6] then redis.call('DEL', KEYS[3]) end
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[4])))
return result
"""

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
        )


class Created(NamedTuple):
    watch_id: str
    token: str | None  # None: a watch for the pair was already active (watch_id is that one)
    watch: Watch | None  # the new watch as written


class Finishing(NamedTuple):
    tokens: list[tuple[str, str]]  # (webhook_id, token) of every event, for its message
    leased: list[StoredEvent]  # the events as created claimed by the caller, or none


class WatchStore:
    def __init__(self, client: redis.Redis, *, state_ttl_s: float) -> None:
        self.redis = client
        self.items = DurableSet(client, KIND, "watches")
        self.state_ttl_s = state_ttl_s
        self._create = client.register_script(_CREATE)
        self._finish = client.register_script(_FINISH)

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
        lease_until: float | None = None,
    ) -> Created:
        """Create a watch unless one is active for the pair, or ``watch_id`` exists already.

        The new watch waits for its first poll's message, which must carry the
        returned token. With ``lease_until`` it is created already claimed by the
        caller, who polls it at once: the token is then the holder's.
        """
        token = new_token()
        due = first_poll_at if lease_until is None else lease_until
        fields = {
            "watch_id": watch_id,
            "job_id": job_id,
            "callback_url": callback_url,
            "metadata": json.dumps(metadata, separators=(",", ":")) if metadata is not None else "",
            "started_at": fmt(now),
            "deadline": fmt(deadline),
            "state": ACTIVE,
            "token": token,
            "due": fmt(due),
            "armed": "1" if lease_until is None else "0",
            "polls": "0",
            "failures": "0",
            # The queue its messages travel on, so that the sweep re-arms it there.
            "queue": queue,
        }
        existing = self._create(
            keys=[
                active_key(job_id, callback_url),
                self.items.key(watch_id),
                self.items.due_key,
                job_index_key(job_id),
            ],
            args=[
                watch_id,
                fmt(due),
                str(int(self.state_ttl_s + (deadline - now))),
                f"{PREFIX}watch:",
                *flatten(fields),
            ],
        )
        existing_id = text(existing)
        if existing_id:
            return Created(existing_id, None, None)
        return Created(watch_id, token, Watch.from_hash(fields))

    def get(self, watch_id: str) -> Watch | None:
        h = self.items.load(watch_id)
        return Watch.from_hash(h) if h and "watch_id" in h else None

    def claim(self, watch_id: str, token: str, lease_until: float) -> tuple[Watch, str] | None:
        claim = self.items.claim(watch_id, token, lease_until)
        if claim is None or "watch_id" not in claim.fields:
            return None
        return Watch.from_hash(claim.fields), claim.holder

    def advance(self, watch_id: str, holder: str, due: float, fields: dict[str, str]) -> bool:
        return self.items.schedule(watch_id, holder, due, armed=True, fields=fields)

    def finish(
        self,
        watch: Watch,
        holder: str,
        outcome: str,
        events: Sequence[Event | EventHead],
        *,
        outbox: Outbox,
        now: float,
        lease_until: float | None = None,
    ) -> Finishing | None:
        """Record the outcome and create its events, returning what to dispatch.

        ``Event`` bodies go with the script when they are small in all, else they are
        staged here; an ``EventHead``'s body must have been staged by the caller with
        ``outbox.stage_bodies(holder, ...)``. With ``lease_until`` the events are
        created claimed by the caller, who delivers them. Returns None, and discards
        the staged bodies, when the claim was lost or a staged body is gone.
        """
        full = [e for e in events if isinstance(e, Event)]
        inline = sum(len(e.body) for e in full) <= INLINE_BODIES_BYTES
        if not inline:
            outbox.stage_bodies(holder, ((e.webhook_id, e.body) for e in full))
        args: list[str | bytes] = [
            holder,
            fmt(now),
            outcome,
            fmt(self.state_ttl_s),
            PREFIX,
            watch.watch_id,
            str(len(events)),
            str(watch.polls),
            outbox.staged_body_key(holder, ""),
            outbox.body_key(""),
            "" if lease_until is None else fmt(lease_until),
        ]
        tokens: list[tuple[str, str]] = []
        heads: list[dict[str, str]] = []
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
            )
            heads.append(fields)
            body = event.body if inline and isinstance(event, Event) else b""
            args += [head.webhook_id, token, json.dumps(fields), body]
        done = self._finish(
            keys=[
                self.items.key(watch.watch_id),
                self.items.due_key,
                active_key(watch.job_id, watch.callback_url),
                outbox.items.due_key,
            ],
            args=args,
        )
        if done not in (1, 2):
            staged = [e.webhook_id for e in events if not (inline and isinstance(e, Event))]
            if staged:
                outbox.discard_staged(holder, staged)
            return None
        if done == 2 and lease_until is not None:
            leased = [StoredEvent.from_hash({**f, "state": ACTIVE, "due": fmt(lease_until)}, []) for f in heads]
            return Finishing(tokens, leased)
        return Finishing(tokens, [])

    def cancel(self, watch_id: str) -> bool:
        """Stop a watch without an event: an operator's decision, not an outcome of the job."""
        watch = self.get(watch_id)
        if watch is None or watch.state != ACTIVE:
            return False
        with self.redis.pipeline() as pipe:
            pipe.hset(self.items.key(watch_id), mapping={"state": "cancelled", "token": "", "outcome": "cancelled"})
            pipe.zrem(self.items.due_key, watch_id)
            pipe.expire(self.items.key(watch_id), int(self.state_ttl_s))
            pipe.execute()
        if text(self.redis.get(active_key(watch.job_id, watch.callback_url))) == watch_id:
            self.redis.delete(active_key(watch.job_id, watch.callback_url))
        return True

    def for_job(self, job_id: str) -> list[Watch]:
        ids = sorted(members(self.redis.smembers(job_index_key(job_id))))
        watches = [w for w in (self.get(i) for i in ids) if w is not None]
        return sorted(watches, key=lambda w: w.started_at)

    def active_ids(self, limit: int = 1000) -> list[str]:
        return members(self.redis.zrange(self.items.due_key, 0, limit - 1))
