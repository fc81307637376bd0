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
from collections.abc import Callable, Mapping
from typing import Any

import redis

PREFIX = "check365:"
ACTIVE = "active"

Clock = Callable[[], float]

_CLAIM = """
if redis.call('HGET', KEYS[1], 'state') ~= 'active' then return 0 end
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'token', ARGV[2], 'due', ARGV[3], 'armed', '0')
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
return 1
"""

_SCHEDULE = """
if redis.call('HGET', KEYS[1], 'state') ~= 'active' then return 0 end
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'due', ARGV[2], 'armed', ARGV[3])
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
return 1
"""

# KEYS: hash, due zset, target zset (may be a placeholder)
# ARGV: holder token, new state, member, ttl seconds (0 = keep), target score ('' = none), k, v...
_CLOSE = """
if redis.call('HGET', KEYS[1], 'state') ~= 'active' then return 0 end
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'token', '')
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZREM', KEYS[2], ARGV[3])
if ARGV[5] ~= '' then redis.call('ZADD', KEYS[3], ARGV[5], ARGV[3]) end
if tonumber(ARGV[4]) > 0 then redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[4]))) end
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

    def claim(self, item_id: str, token: str, lease_until: float) -> str | None:
        """Take the step for the message carrying ``token``; return the holder token."""
        holder = new_token()
        ok = self._claim(keys=[self.key(item_id), self.due_key], args=[token, holder, fmt(lease_until), item_id])
        return holder if ok else None

    def schedule(
        self, item_id: str, holder: str, due: float, *, armed: bool, fields: Mapping[str, str] | None = None
    ) -> bool:
        flat: list[str] = []
        for k, v in (fields or {}).items():
            flat += [k, v]
        ok = self._schedule(
            keys=[self.key(item_id), self.due_key],
            args=[holder, fmt(due), "1" if armed else "0", item_id, *flat],
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
    ) -> bool:
        flat: list[str] = []
        for k, v in (fields or {}).items():
            flat += [k, v]
        target_key, score = into if into else (self.due_key, None)
        ok = self._close(
            keys=[self.key(item_id), self.due_key, target_key],
            args=[holder, state, item_id, fmt(ttl_s), "" if score is None else fmt(score), *flat],
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
