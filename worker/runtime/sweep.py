"""The periodic sweep: re-arm watches and deliveries whose message is overdue.

Run by beat every ``SWEEP_INTERVAL_S``. A watch's next poll or an event's next
attempt that should have run more than ``REARM_GRACE_S`` ago lost its message
(a failed publish, a worker killed with a countdown in memory); a delivery
waiting out a delay too long for a countdown has no message at all. Either way
the item gets a fresh token and a new message, which makes any late original
stale.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from worker.runtime.context import Context
from worker.state.store import text
from worker.state.watches import Watch

log = structlog.get_logger("check365.sweep")

BATCH = 500


@dataclass(frozen=True)
class RearmedWatch:
    watch: Watch
    token: str


@dataclass(frozen=True)
class RearmedEvent:
    webhook_id: str
    token: str
    queue: str


def sweep(ctx: Context, *, batch: int = BATCH) -> tuple[list[RearmedWatch], list[RearmedEvent]]:
    now = ctx.clock()
    grace = ctx.settings.rearm_grace_s
    watches: list[RearmedWatch] = []
    for watch_id in ctx.watches.items.overdue(now, batch):
        token = ctx.watches.items.rearm(watch_id, now, grace)
        watch = ctx.watches.get(watch_id) if token else None
        if token and watch:
            watches.append(RearmedWatch(watch, token))
    events: list[RearmedEvent] = []
    for webhook_id in ctx.outbox.items.overdue(now, batch):
        token = ctx.outbox.items.rearm(webhook_id, now, grace)
        if token:
            queue = text(ctx.redis.hget(ctx.outbox.items.key(webhook_id), "queue"))
            events.append(RearmedEvent(webhook_id, token, queue or ctx.settings.queue))
    if watches or events:
        log.info("sweep_rearmed", watches=len(watches), events=len(events))
    return watches, events
