"""Durable-item mechanics shared by watches and webhook events.

A durable item is a Redis hash (``state``, ``token``, ``due``, ``armed`` and its own
fields) plus a member of a "due" sorted set scored by when its next step is due.
A Celery message only wakes a step; the atomic claim below decides whether it
runs (see docs/design.md, "Durable state and tokens"):

- ``claim`` succeeds only for the message carrying the current token, and swaps
  in a fresh one, so a duplicate message finds a stale token and is dropped;
- while a step runs, the item is "leased": ``due`` is the lease's end and
  ``armed`` is 0, so the sweep re-dispatches it as soon as a crashed step's
  lease runs out;
- ``schedule`` records the next due time; ``armed=1`` means a countdown message
  is on its way, so the sweep waits ``grace`` seconds past ``due`` for it
  before assuming it was lost; ``armed=0`` means no message exists (delays too
  long for a countdown) and the sweep dispatches it when due.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from check365_client.names import PREFIX

ACTIVE = "active"

Clock = Callable[[], float]

# A step's first and last Redis calls are one script each: the claim returns what
# the step needs to read, and the settling call (schedule or close) also appends to
# the item's log. Round trips, not Redis's work, are what a small job costs.

# KEYS: hash, due zset, then optionally a string key and a list key to read
# ARGV: token, holder, lease end, member
# Returns nil when the claim fails, else {hash fields, string value, list items}.
_CLAIM = """
if redis.call('HGET', KEYS[1], 'state') ~= 'active' then return false end
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return false end
redis.call('HSET', KEYS[1], 'token', ARGV[2], 'due', ARGV[3], 'armed', '0')
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
local out = {redis.call('HGETALL', KEYS[1]), false, {}}
if #KEYS >= 3 then out[2] = redis.call('GET', KEYS[3]) end
if #KEYS >= 4 then out[3] = redis.call('LRANGE', KEYS[4], 0, -1) end
return out
"""

# The log entry is appended whether or not the claim still holds: it records
# something that already happened (an attempt was sent), whoever holds the item now.
# KEYS: hash, due zset, log list (may be a placeholder)
# ARGV: holder token, due, armed, member, log entry ('' = none), k, v...
_SCHEDULE = """
if ARGV[5] ~= '' then redis.call('RPUSH', KEYS[3], ARGV[5]) end
if redis.call('HGET', KEYS[1], 'state') ~= 'active' then return 0 end
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'due', ARGV[2], 'armed', ARGV[3])
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
return 1
"""

# KEYS: hash, due zset, target zset (may be a placeholder), log list (may be a
#       placeholder), then keys that share the item's ttl
# ARGV: holder token, new state, member, ttl seconds (0 = keep), target score ('' = none),
#       log entry ('' = none), k, v...
_CLOSE = """
if ARGV[6] ~= '' then redis.call('RPUSH', KEYS[4], ARGV[6]) end
if redis.call('HGET', KEYS[1], 'state') ~= 'active' then return 0 end
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'token', '')
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZREM', KEYS[2], ARGV[3])
if ARGV[5] ~= '' then redis.call('ZADD', KEYS[3], ARGV[5], ARGV[3]) end
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  for i = 1, #KEYS do
    if i == 1 or i >= 4 then redis.call('EXPIRE', KEYS[i], math.ceil(ttl)) end
  end
end
return 1
"""

_REARM = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'active' then redis.call('ZREM', KEYS[2], ARGV[4]); return 0 end
local due = tonumber(redis.call('HGET', KEYS[1], 'due'))
local wait = 0
if redis.call('HGET', KEYS[1], 'armed') == '1' then wait = tonumber(ARGV[2]) end
if due ~= nil and due + wait > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'token', ARGV[3], 'due', ARGV[1], 'armed', '1')
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[4])
return 1
"""


def new_token() -> str:
    return secrets.token_hex(8)


def fmt(value: float) -> str:
    """Times as text with millisecond precision: compact and exact enough in Lua."""
    return f"{value:.3f}"


def text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def members(raw: Any) -> list[str]:
    """Decode a list reply of member names."""
    return [str(text(m)) for m in raw]


def decode_hash(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {str(text(k)): str(text(v)) for k, v in raw.items()}


def flatten(fields: Mapping[str, str] | None) -> list[str]:
    """``[k1, v1, k2, v2, ...]``: hash fields as script arguments."""
    out: list[str] = []
    for k, v in (fields or {}).items():
        out += [k, v]
    return out


@dataclass(frozen=True)
class Claim:
    """A step's hold on an item, and what it read in the same round trip."""

    holder: str
    fields: dict[str, str]
    blob: bytes | None = None
    entries: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class LogEntry:
    """A line appended to the item's list by the call that settles the step."""

    key: str
    entry: str


class DurableSet:
    """The claim/schedule/close/rearm protocol over one kind of item."""

    def __init__(self, client: redis.Redis, kind: str, plural: str) -> None:
        self.redis = client
        self.kind = kind
        self.due_key = f"{PREFIX}due:{plural}"
        self._claim = client.register_script(_CLAIM)
        self._schedule = client.register_script(_SCHEDULE)
        self._close = client.register_script(_CLOSE)
        self._rearm = client.register_script(_REARM)

    def key(self, item_id: str) -> str:
        return f"{PREFIX}{self.kind}:{item_id}"

    def claim(
        self,
        item_id: str,
        token: str,
        lease_until: float,
        *,
        blob_key: str | None = None,
        list_key: str | None = None,
    ) -> Claim | None:
        """Take the step for the message carrying ``token``, reading the item as it is taken.

        ``blob_key`` (a string) and ``list_key`` (a list) are read in the same call; a
        ``list_key`` needs a ``blob_key``.
        """
        if list_key is not None and blob_key is None:
            raise ValueError("a list_key is read only together with a blob_key")
        holder = new_token()
        keys = [self.key(item_id), self.due_key, *(k for k in (blob_key, list_key) if k is not None)]
        raw = self._claim(keys=keys, args=[token, holder, fmt(lease_until), item_id])
        if not raw:
            return None
        pairs, blob, entries = raw
        fields = decode_hash(dict(zip(pairs[::2], pairs[1::2], strict=True)))
        return Claim(holder, fields, blob if isinstance(blob, bytes) else None, list(entries or []))

    def schedule(
        self,
        item_id: str,
        holder: str,
        due: float,
        *,
        armed: bool,
        fields: Mapping[str, str] | None = None,
        log: LogEntry | None = None,
    ) -> bool:
        key = self.key(item_id)
        ok = self._schedule(
            keys=[key, self.due_key, log.key if log else key],
            args=[holder, fmt(due), "1" if armed else "0", item_id, log.entry if log else "", *flatten(fields)],
        )
        return bool(ok)

    def close(
        self,
        item_id: str,
        holder: str,
        state: str,
        *,
        ttl_s: float = 0,
        into: tuple[str, float] | None = None,
        fields: Mapping[str, str] | None = None,
        log: LogEntry | None = None,
        expire_also: Sequence[str] = (),
    ) -> bool:
        """End the item's life as ``state``.

        With ``ttl_s`` the hash, the log list and ``expire_also`` expire together;
        ``into`` moves the member to another sorted set (the dead letters).
        """
        key = self.key(item_id)
        target_key, score = into if into else (self.due_key, None)
        ok = self._close(
            keys=[key, self.due_key, target_key, log.key if log else key, *expire_also],
            args=[
                holder,
                state,
                item_id,
                fmt(ttl_s),
                "" if score is None else fmt(score),
                log.entry if log else "",
                *flatten(fields),
            ],
        )
        return bool(ok)

    def overdue(self, now: float, limit: int) -> list[str]:
        """Members due by now (the rearm script applies the grace of armed ones)."""
        return members(self.redis.zrangebyscore(self.due_key, "-inf", fmt(now), start=0, num=limit))

    def rearm(self, item_id: str, now: float, grace_s: float) -> str | None:
        """Give an item whose message is overdue a fresh token; the caller sends it."""
        token = new_token()
        ok = self._rearm(keys=[self.key(item_id), self.due_key], args=[fmt(now), fmt(grace_s), token, item_id])
        return token if ok else None

    def load(self, item_id: str) -> dict[str, str] | None:
        raw = self.redis.hgetall(self.key(item_id))
        return decode_hash(raw) if raw else None

    def count_active(self) -> int:
        return int(self.redis.zcard(self.due_key))
