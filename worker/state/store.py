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

The protocol's fields (``state``, ``token``, ``due``, ``armed``, ``lease_until``) are
written by this module alone: in Lua by ``lua/lib/protocol.lua``, this module's Lua half,
whose functions every script that moves an item calls (its own scripts, and the endpoint
gate's, which park a held event and release it from its endpoint's line in the script
that decides it); in Python as the maps ``opening`` and ``closing`` build for the scripts
that create or end items together with others (``WatchStore.create`` and
``WatchStore.finish``). The other fields of a hash belong to the module of its kind of
item (``worker.state.watches``, ``worker.state.outbox``, ``worker.state.endpoints``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import redis

from check365_client.names import PREFIX
from worker.state import scripts

if TYPE_CHECKING:
    from worker.state.endpoints import Released

ACTIVE = "active"


@dataclass(frozen=True)
class Dropped:
    """A step's message with nothing left to do: a duplicate enqueue, a stale token, a lost claim.

    ``item_id`` is the watch's or the event's id. ``wake`` holds the events a delivery step
    let out of their endpoint's waiting line before it lost its claim: the task still sends them.
    """

    reason: str
    item_id: str | None = None
    wake: tuple[Released, ...] = ()


Clock = Callable[[], float]

# A step's first and last Redis calls are one script each (worker/state/lua): the
# claim returns what the step needs to read, and the settling call (schedule or close)
# also appends to the item's log. Round trips, not Redis's work, are what a small job costs.


class _Entropy(threading.local):
    """A thread's reserve of the system's random bytes, drawn a page at a time.

    Every ``os.urandom`` is a system call, and in a process of many threads each one
    gives up the interpreter lock and waits to take it back; a step makes several tokens.
    """

    pid = -1
    reserve = b""
    used = 0


_entropy = _Entropy()
_ENTROPY_PAGE = 4096


def random_bytes(n: int) -> bytes:
    """``n`` bytes from ``os.urandom``, never handed out twice (a forked child draws its own)."""
    if _entropy.pid != os.getpid() or _entropy.used + n > len(_entropy.reserve):
        _entropy.pid, _entropy.reserve, _entropy.used = os.getpid(), os.urandom(max(_ENTROPY_PAGE, n)), 0
    start = _entropy.used
    _entropy.used += n
    return _entropy.reserve[start : start + n]


def new_token() -> str:
    return random_bytes(8).hex()


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


def opening(token: str, due: float, *, armed: bool) -> dict[str, str]:
    """The protocol's fields of a new item, waiting for the message carrying ``token``
    (``armed``) or held by the step whose holder token it is until ``due``."""
    return {"state": ACTIVE, "token": token, "due": fmt(due), "armed": "1" if armed else "0"}


def closing(state: str) -> dict[str, str]:
    """The protocol's fields of an item that ended as ``state``: no token opens it again."""
    return {"state": state, "token": ""}


class Lease(NamedTuple):
    """How long a step holds an item: until ``until`` on the step's clock (the item's due
    time) and ``seconds`` from now on Redis's clock (what the sweep compares)."""

    until: float
    seconds: float

    @classmethod
    def starting(cls, now: float, seconds: float) -> Lease:
        return cls(now + seconds, seconds)


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


@dataclass(frozen=True)
class Booking:
    """A step's settling call (``schedule`` or ``close``), built but not yet run: run it with
    ``DurableSet.run``, or inside another module's script that includes lib/protocol.lua
    (an attempt's booking with its endpoint's settlement: ``EndpointState.settle``)."""

    op: str  # schedule, close
    keys: list[str]
    args: dict[str, Any]


class DurableSet:
    """The claim/schedule/close/rearm protocol over one kind of item."""

    def __init__(self, client: redis.Redis, kind: str, plural: str) -> None:
        self.redis = client
        self.kind = kind
        self.due_key = f"{PREFIX}due:{plural}"
        self._claim = scripts.load(client, "claim")
        self._schedule = scripts.load(client, "schedule")
        self._close = scripts.load(client, "close")
        self._rearm = scripts.load(client, "rearm")
        self._reopen = scripts.load(client, "reopen")
        self._stop = scripts.load(client, "stop")

    def key(self, item_id: str) -> str:
        return f"{PREFIX}{self.kind}:{item_id}"

    def claim(
        self,
        item_id: str,
        token: str,
        lease: Lease,
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
        raw = self._claim(keys=keys, args=[token, holder, fmt(lease.until), item_id, fmt(lease.seconds)])
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
    ) -> Booking:
        """Record when the item's next step is due (``armed``: its message is on its way)."""
        key = self.key(item_id)
        return Booking(
            "schedule",
            [key, self.due_key, log.key if log else key],
            {
                "holder": holder,
                "member": item_id,
                "due": fmt(due),
                "armed": "1" if armed else "0",
                "log": log.entry if log else "",
                "fields": dict(fields or {}),
            },
        )

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
    ) -> Booking:
        """End the item's life as ``state``.

        With ``ttl_s`` the hash, the log list and ``expire_also`` expire together;
        ``into`` moves the member to another sorted set (the dead letters).
        """
        key = self.key(item_id)
        target_key, score = into if into else (self.due_key, None)
        return Booking(
            "close",
            [key, self.due_key, target_key, log.key if log else key, *expire_also],
            {
                "holder": holder,
                "member": item_id,
                "state": state,
                "ttl": fmt(ttl_s),
                "score": "" if score is None else fmt(score),
                "log": log.entry if log else "",
                "fields": dict(fields or {}),
            },
        )

    def run(self, booking: Booking) -> bool:
        """Run a settling call on its own: False when the caller no longer held the item."""
        script = self._schedule if booking.op == "schedule" else self._close
        return bool(script(keys=booking.keys, args=[scripts.spec(**booking.args)]))

    def overdue(self, now: float, limit: int) -> list[str]:
        """Members due by now (the rearm script applies the grace of armed ones)."""
        return members(self.redis.zrangebyscore(self.due_key, "-inf", fmt(now), start=0, num=limit))

    def rearm(self, item_id: str, now: float, grace_s: float) -> str | None:
        """Give an item whose message is overdue a fresh token; the caller sends it."""
        token = new_token()
        ok = self._rearm(keys=[self.key(item_id), self.due_key], args=[fmt(now), fmt(grace_s), token, item_id])
        return token if ok else None

    def reopen(
        self, item_id: str, now: float, *, was: str, leaving: str, count: str, fields: Mapping[str, str]
    ) -> str | None:
        """Bring an item that ended as ``was`` back to active, due ``now``, out of the
        sorted set ``leaving``, counting it in the field ``count``; return the token its
        message must carry (None: it was not in that state)."""
        token = new_token()
        ok = self._reopen(
            keys=[self.key(item_id), self.due_key, leaving],
            args=[scripts.spec(member=item_id, was=was, token=token, due=fmt(now), count=count, fields=dict(fields))],
        )
        return token if ok else None

    def stop(
        self, item_id: str, state: str, *, ttl_s: float, fields: Mapping[str, str], release: Sequence[str] = ()
    ) -> bool:
        """End an active item as ``state`` whoever holds it; ``release`` are lock keys
        deleted if they still hold its id. False when it was not active."""
        ok = self._stop(
            keys=[self.key(item_id), self.due_key, *release],
            args=[scripts.spec(member=item_id, state=state, ttl=fmt(ttl_s), fields=dict(fields))],
        )
        return bool(ok)

    def load(self, item_id: str) -> dict[str, str] | None:
        raw = self.redis.hgetall(self.key(item_id))
        return decode_hash(raw) if raw else None

    def count_active(self) -> int:
        return int(self.redis.zcard(self.due_key))
