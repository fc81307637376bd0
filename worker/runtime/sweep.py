"""The periodic sweep: re-arm watches and deliveries whose message is overdue.

Run by beat every ``SWEEP_INTERVAL_S``. A watch's next poll or an event's next
attempt that should have run more than ``REARM_GRACE_S`` ago lost its message
(a failed publish, a worker killed with a countdown in memory); a delivery
waiting out a delay too long for a countdown has no message at all. Either way
the item gets a fresh token and a new message, which makes any late original
stale.

Each sweep also records which beat sent it (the ``origin`` of its message) and
when, so that the metrics and ``doctor`` can tell a dead beat, and a second one,
from a healthy deployment.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.polling.step import Finished, expire_stranded
from worker.runtime import logs
from worker.runtime.context import Context
from worker.runtime.leases import watch_lease_s
from worker.state.beats import record_sweep
from worker.state.store import text
from worker.state.watches import Watch

log = logs.get_logger("check365.sweep")

BATCH = 500


def stranded_after_s(ctx: Context) -> float:
    """How long past its deadline an overdue watch is given before the sweep times it out.

    A watch waiting for its turn is never overdue; one that is has lost its message, and
    the message the sweep sends it gets a grace and a step's lease to run its final poll.
    """
    return ctx.settings.rearm_grace_s + watch_lease_s(ctx.settings)


@dataclass(frozen=True)
class RearmedWatch:
    watch: Watch
    token: str


@dataclass(frozen=True)
class RearmedEvent:
    webhook_id: str
    token: str
    queue: str


def sweep(
    ctx: Context, *, batch: int = BATCH, origin: str | None = None
) -> tuple[list[RearmedWatch], list[RearmedEvent]]:
    """The watches and events to send a message for, each with its fresh token.

    A watch still overdue once ``stranded_after_s`` past its deadline (a re-armed message
    had its chance and it did not run) is timed out here instead: its event is among the
    events returned. ``origin`` names the beat that sent this sweep (see worker.state.beats).
    """
    now = ctx.clock()
    record_sweep(ctx.redis, origin, now)
    grace = ctx.settings.rearm_grace_s
    watches: list[RearmedWatch] = []
    events: list[RearmedEvent] = []
    for watch_id in ctx.watches.items.overdue(now, batch):
        token = ctx.watches.items.rearm(watch_id, now, grace)
        watch = ctx.watches.get(watch_id) if token else None
        if not (token and watch):
            continue
        if now < watch.deadline + stranded_after_s(ctx):
            watches.append(RearmedWatch(watch, token))
            continue
        ended = expire_stranded(ctx, watch_id, token)
        if isinstance(ended, Finished):
            home = watch.queue or ctx.settings.queue
            events += [RearmedEvent(webhook_id, event_token, home) for webhook_id, event_token in ended.deliveries]
    for webhook_id in ctx.outbox.items.overdue(now, batch):
        event_token = ctx.outbox.items.rearm(webhook_id, now, grace)
        if event_token:
            queue = text(ctx.redis.hget(ctx.outbox.items.key(webhook_id), "queue"))
            events.append(RearmedEvent(webhook_id, event_token, queue or ctx.settings.queue))
    events += _release_waiting(ctx, now)
    if watches or events:
        log.info("sweep_rearmed", watches=len(watches), events=len(events))
    return watches, events


def _release_waiting(ctx: Context, now: float) -> list[RearmedEvent]:
    """Let waiting events through where a slot is free or a probe is due.

    A finished attempt hands its slot on at once; this catches what no attempt hands on:
    slots of steps that died (freed when their lease ends) and an open breaker's probe.
    """
    released: list[RearmedEvent] = []
    for endpoint in ctx.endpoints.waiting_endpoints():
        settlement = ctx.endpoints.settle(
            endpoint, holder="", outcome="none", limits=ctx.endpoint_limits(endpoint), now=now
        )
        released += [RearmedEvent(r.webhook_id, r.token, r.queue or ctx.settings.queue) for r in settlement.released]
    ctx.endpoints.forget_idle(now)
    return released
