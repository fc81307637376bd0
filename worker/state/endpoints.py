"""Per-endpoint state in Redis: the breaker, the attempts in flight, the waiting line.

Keys (prefix ``check365:``), per endpoint key ``E`` (``https://host[:port]``):

- ``endpoint:E`` (hash): the breaker (``state`` closed, open or half_open, consecutive
  ``failures``, ``opens`` in a row, ``opened_at``, ``probe_at``, ``cooldown``, ``probe``,
  ``last_error``);
- ``endpoint_inflight:E`` (sorted set): the holders of attempts in flight, scored by the
  end of their lease on Redis's clock, so that the slot of a killed step frees itself when
  its lease ends;
  ``r:{webhook_id}`` members are slots reserved for events released from the line;
- ``endpoint_waiting:E`` (sorted set): events parked by the gate, oldest first;
- ``endpoint_backlog:E`` (sorted set): the endpoint's pending events by creation time
  (every event that has reached the gate and is neither delivered nor dead-lettered);

and ``endpoints`` (sorted set of keys by last activity) and ``endpoints_waiting`` (the keys
with a waiting line, which the sweep visits).

The gate (``admit``) and the settlement (``settle``) are one script each; see
``worker/state/lua/endpoint_*.lua`` and ``lua/lib/endpoint.lua``. The gate of an event's
first attempt by the step that creates it runs in the same script as the finish that
creates it (``WatchStore.finish``); after an attempt, the settlement runs in the same
script as the attempt's booking on its event.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis

from check365_client.names import PREFIX
from worker.delivery.limits import EndpointLimits
from worker.state import scripts
from worker.state.store import Booking, fmt, members, new_token, text

INDEX_KEY = f"{PREFIX}endpoints"
WAITING_KEY = f"{PREFIX}endpoints_waiting"
EVENT_PREFIX = f"{PREFIX}event:"
# An endpoint with nothing pending, nothing in flight and a closed breaker is forgotten
# after this long without activity, so that the index does not grow with every host ever called.
IDLE_FORGET_S = 86400.0
# Endpoint keys the sweep visits per run.
SWEEP_BATCH = 500

BREAKER_STATES = ("closed", "half_open", "open")


@dataclass(frozen=True)
class Breaker:
    """What the gate saw of an endpoint's breaker."""

    state: str
    failures: int
    opened_at: float | None
    probe_at: float | None
    last_error: str

    def describe(self) -> str:
        if self.state == "closed":
            return "breaker closed"
        return f"breaker {self.state} after {self.failures} consecutive failures (last: {self.last_error or '?'})"


@dataclass(frozen=True)
class Admission:
    verdict: str  # go, probe, held_open, held_cap, expired, lost
    breaker: Breaker
    in_flight: int = 0

    @property
    def admitted(self) -> bool:
        return self.verdict in ("go", "probe")


class Gate(NamedTuple):
    """The gate's keys and argument for one attempt (see ``endpoint.admit`` in ``lua/lib/endpoint.lua``)."""

    keys: list[str]
    arg: dict[str, str]


@dataclass(frozen=True)
class Released:
    """An event let out of the waiting line: its message must be sent with ``token``."""

    webhook_id: str
    token: str
    queue: str


@dataclass(frozen=True)
class Settlement:
    transition: str  # '', opened, reopened, closed
    state: str
    failures: int
    cooldown_s: float
    opened_at: float | None
    released: tuple[Released, ...]
    # The attempt's booking run in the same call (see ``settle``): False when the step had
    # lost its claim; True when there was none.
    booked: bool = True


@dataclass(frozen=True)
class EndpointView:
    """One endpoint as the CLI and the metrics show it (no secrets: a key holds no path)."""

    endpoint: str
    state: str
    failures: int
    in_flight: int
    waiting: int
    backlog: int
    oldest_pending_at: float | None
    opened_at: float | None
    probe_at: float | None
    last_error: str
    last_active_at: float | None


def _float(value: Any) -> float | None:
    try:
        number = float(text(value) or "")
    except ValueError:
        return None
    return number or None


def admission(raw: Any) -> Admission:
    """The gate's answer, read."""
    verdict = str(text(raw[0]))
    if verdict == "lost":
        return Admission("lost", Breaker("closed", 0, None, None, ""))
    breaker = Breaker(
        state=str(text(raw[1])),
        failures=int(text(raw[2]) or 0),
        opened_at=_float(raw[3]),
        probe_at=_float(raw[4]),
        last_error=str(text(raw[5]) or ""),
    )
    return Admission(verdict, breaker, int(raw[6]))


def _keys(endpoint: str) -> tuple[str, str, str, str]:
    return (
        f"{PREFIX}endpoint:{endpoint}",
        f"{PREFIX}endpoint_inflight:{endpoint}",
        f"{PREFIX}endpoint_waiting:{endpoint}",
        f"{PREFIX}endpoint_backlog:{endpoint}",
    )


class EndpointState:
    def __init__(self, client: redis.Redis, *, due_key: str, rearm_grace_s: float) -> None:
        self.redis = client
        self.due_key = due_key
        self.grace_s = rearm_grace_s
        self._admit = scripts.load(client, "endpoint_admit")
        self._settle = scripts.load(client, "endpoint_settle")
        self._book = scripts.load(client, "endpoint_book")

    def gate(
        self,
        *,
        webhook_id: str,
        endpoint: str,
        holder: str,
        limits: EndpointLimits,
        now: float,
        lease_s: float,
        deadline: float,
        created_at: float,
        started: dict[str, Any],
        now_iso: str,
        attempts_key: str,
    ) -> Gate:
        """The gate's call for one attempt: run alone by ``admit``, or by the finish that creates the event."""
        ep, inflight, waiting, backlog = _keys(endpoint)
        return Gate(
            keys=[
                EVENT_PREFIX + webhook_id,
                self.due_key,
                ep,
                inflight,
                waiting,
                backlog,
                INDEX_KEY,
                WAITING_KEY,
                attempts_key,
            ],
            arg={
                "holder": holder,
                "now": fmt(now),
                "lease_s": fmt(lease_s),
                "cap": str(limits.max_in_flight),
                "deadline": fmt(deadline),
                "id": webhook_id,
                "endpoint": endpoint,
                "record": scripts.compact(started),
                "now_iso": now_iso,
                "created_at": fmt(created_at),
            },
        )

    def admit(self, gate: Gate) -> Admission:
        """Pass the gate (the attempt is recorded as ``started``), or park the event in line."""
        return admission(self._admit(keys=gate.keys, args=[scripts.spec(**gate.arg)]))

    def settle(
        self,
        endpoint: str,
        *,
        holder: str,
        outcome: str,
        limits: EndpointLimits,
        now: float,
        webhook_id: str = "",
        closed: bool = False,
        error: str = "",
        booking: Booking | None = None,
    ) -> Settlement:
        """Free ``holder``'s slot, feed the breaker (``ok``, ``fail`` or ``none``), release waiting events.

        ``booking``, the attempt's settling call on its event (``Outbox.retry_later``,
        ``mark_delivered``, ``dead_letter``), runs first in the same script: one round trip.
        """
        ep, inflight, waiting, backlog = _keys(endpoint)
        keys = [ep, inflight, waiting, backlog, WAITING_KEY, self.due_key]
        args = {
            "holder": holder,
            "now": fmt(now),
            "outcome": outcome,
            "threshold": str(limits.breaker_threshold),
            "cooldown": fmt(limits.cooldown_s),
            "cooldown_max": fmt(limits.cooldown_max_s),
            "cap": str(limits.max_in_flight),
            "id": webhook_id,
            "closed": "1" if closed else "0",
            "event_prefix": EVENT_PREFIX,
            "reserve_s": fmt(self.grace_s),
            "token_prefix": new_token() + "r",
            "endpoint": endpoint,
            "error": error[:200],
        }
        booked = True
        if booking is None:
            raw = self._settle(keys=keys, args=[scripts.spec(**args)])
        else:
            spec = scripts.spec(op=booking.op, item_keys=str(len(booking.keys)), item=booking.args, settle=args)
            ok, raw = self._book(keys=[*booking.keys, *keys], args=[spec])
            booked = bool(ok)
        flat = [str(text(v)) for v in raw[5]]
        released = tuple(Released(*flat[i : i + 3]) for i in range(0, len(flat), 3))
        return Settlement(
            transition=str(text(raw[0]) or ""),
            state=str(text(raw[1])),
            failures=int(text(raw[2]) or 0),
            cooldown_s=float(text(raw[3]) or 0),
            opened_at=_float(raw[4]),
            released=released,
            booked=booked,
        )

    def waiting_endpoints(self, limit: int = SWEEP_BATCH) -> list[str]:
        return members(self.redis.srandmember(WAITING_KEY, limit) or [])

    def forget_idle(self, now: float) -> int:
        """Drop endpoints idle for ``IDLE_FORGET_S`` with nothing pending, in flight or open."""
        forgotten = 0
        seconds, micros = self.redis.time()
        clock = seconds + micros / 1e6  # slots end on Redis's clock
        for endpoint in members(self.redis.zrangebyscore(INDEX_KEY, "-inf", fmt(now - IDLE_FORGET_S), 0, 100)):
            ep, inflight, waiting, backlog = _keys(endpoint)
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.hget(ep, "state")
                pipe.zcount(inflight, fmt(clock), "+inf")
                pipe.zcard(waiting)
                pipe.zcard(backlog)
                state, busy, waits, pending = pipe.execute()
            if (text(state) or "closed") == "closed" and not (busy or waits or pending):
                self.redis.delete(ep, inflight)
                self.redis.zrem(INDEX_KEY, endpoint)
                forgotten += 1
        return forgotten

    def endpoints(self, limit: int = 1000) -> list[str]:
        return members(self.redis.zrevrange(INDEX_KEY, 0, limit - 1))

    def views(self, now: float | None = None, limit: int = 1000) -> list[EndpointView]:
        """Every known endpoint's state, most recently active first; two round trips in all."""
        now = time.time() if now is None else now
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrevrange(INDEX_KEY, 0, limit - 1, withscores=True)
            pipe.time()
            indexed, (seconds, micros) = pipe.execute()
        # Slots end on Redis's clock (see endpoint_admit.lua).
        clock = seconds + micros / 1e6
        found = [(str(text(k)), float(score)) for k, score in indexed]
        with self.redis.pipeline(transaction=False) as pipe:
            for endpoint, _ in found:
                ep, inflight, waiting, backlog = _keys(endpoint)
                pipe.hmget(ep, "state", "failures", "opened_at", "probe_at", "last_error")
                pipe.zcount(inflight, fmt(clock), "+inf")
                pipe.zcard(waiting)
                pipe.zcard(backlog)
                pipe.zrange(backlog, 0, 0, withscores=True)
            replies = pipe.execute()
        views = []
        for n, (endpoint, active) in enumerate(found):
            (state, failures, opened_at, probe_at, last_error), busy, waits, pending, oldest = replies[
                n * 5 : n * 5 + 5
            ]
            views.append(
                EndpointView(
                    endpoint=endpoint,
                    state=str(text(state) or "closed"),
                    failures=int(text(failures) or 0),
                    in_flight=int(busy),
                    waiting=int(waits),
                    backlog=int(pending),
                    oldest_pending_at=float(oldest[0][1]) if oldest else None,
                    opened_at=_float(opened_at),
                    probe_at=_float(probe_at),
                    last_error=str(text(last_error) or ""),
                    last_active_at=active,
                )
            )
        return views
