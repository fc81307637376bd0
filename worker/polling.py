"""Watching a job: one poll at a time, as a plain function of a context.

``start_watch`` and ``poll_once`` return what should happen next; the task module
turns that into a countdown or into delivery messages. Nothing here knows Celery.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import structlog

from worker import check365, metrics
from worker.context import Context
from worker.enqueue import WatchRequest
from worker.errors import Check365Rejected, Check365Throttled, RetryableError
from worker.events import Event, EventHead, failed_event, iter_completed_events, timed_out_event
from worker.schedule import (
    HISTORY_LIMIT,
    Observation,
    incomplete_results_delay,
    next_poll_delay,
    observations_to_json,
    transient_delay,
)
from worker.store import fmt
from worker.watches import Watch

log = structlog.get_logger("check365.polling")


@dataclass(frozen=True)
class Reschedule:
    """Send the next poll message with ``token`` after ``delay`` seconds."""

    watch_id: str
    token: str
    delay: float


@dataclass(frozen=True)
class Finished:
    """The watch has its outcome; deliver these (webhook_id, token) pairs."""

    outcome: str
    deliveries: list[tuple[str, str]]


@dataclass(frozen=True)
class Dropped:
    """Nothing to do: a duplicate enqueue, or a message that lost its claim."""

    reason: str
    watch_id: str | None = None


StepResult = Reschedule | Finished | Dropped


def new_watch_id() -> str:
    return "w_" + secrets.token_hex(10)


def start_watch(ctx: Context, request: WatchRequest, queue: str = "") -> Reschedule | Dropped:
    now = ctx.clock()
    delay = ctx.settings.poll_initial_delay_s
    watch_id, token = ctx.watches.create(
        watch_id=new_watch_id(),
        job_id=request.job_id,
        callback_url=request.callback_url,
        metadata=request.metadata,
        now=now,
        first_poll_at=now + delay,
        deadline=now + ctx.settings.watch_timeout_s,
        queue=queue or ctx.settings.queue,
    )
    if token is None:
        log.info("watch_duplicate", watch_id=watch_id)
        return Dropped("duplicate", watch_id)
    log.info("watch_enqueued", watch_id=watch_id, first_poll_in_s=round(delay, 3))
    metrics.watch_started()
    return Reschedule(watch_id, token, delay)


def _lease_s(ctx: Context) -> float:
    # Long enough for one poll at its worst (connect, then read) to finish.
    return 2 * ctx.settings.check365_timeout_s + 10


def _finish(
    ctx: Context, watch: Watch, holder: str, outcome: str, events: Sequence[Event | EventHead]
) -> StepResult:
    now = ctx.clock()
    deliveries = ctx.watches.finish(watch, holder, outcome, events, outbox=ctx.outbox, now=now)
    if deliveries is None:
        return Dropped("lost_claim", watch.watch_id)
    metrics.watch_finished(outcome)
    log.info(
        f"watch_{outcome}", watch_id=watch.watch_id, polls=watch.polls, events=len(events),
        duration_s=round(now - watch.started_at, 3),
    )
    return Finished(outcome, deliveries)


def _progress_out(progress: float | None) -> float | int | None:
    if progress is not None and progress == int(progress):
        return int(progress)
    return progress


def poll_once(ctx: Context, watch_id: str, token: str) -> StepResult:
    settings = ctx.settings
    now = ctx.clock()
    claimed = ctx.watches.claim(watch_id, token, now + _lease_s(ctx))
    if claimed is None:
        return Dropped("stale_token", watch_id)
    watch, holder = claimed
    # Every line of this step names the job and which poll it is.
    structlog.contextvars.bind_contextvars(job_id=watch.job_id, watch_id=watch_id, attempt=watch.polls + 1)

    if now >= watch.deadline:
        event = timed_out_event(
            watch_id, watch.job_id, watch.last_status, _progress_out(watch.last_progress), watch.metadata,
            now=now,
        )
        return _finish(ctx, watch, holder, "timed_out", [event])

    wait = ctx.limiter.acquire()
    if wait > 0:
        delay = min(wait, settings.poll_max_delay_s, max(watch.deadline - now, 0.001))
        log.debug("poll_throttled", watch_id=watch_id, wait_s=round(wait, 3))
        metrics.poll("throttled")
        return _reschedule(ctx, watch, holder, delay, {})

    try:
        with metrics.check365_request():
            outcome = check365.fetch_status(ctx.check365, settings, watch.job_id)
    except Check365Rejected as exc:
        metrics.poll("rejected")
        log.warning("poll_rejected", watch_id=watch_id, reason=exc.reason, error=str(exc))
        event = failed_event(watch_id, watch.job_id, exc.reason, str(exc), watch.metadata, now=ctx.clock())
        return _finish(ctx, watch, holder, "failed", [event])
    except RetryableError as exc:
        metrics.poll("transient")
        if exc.retry_after:
            ctx.limiter.block(exc.retry_after)
        failures = watch.failures + 1
        delay = transient_delay(
            failures, initial_delay=settings.poll_initial_delay_s, max_delay=settings.poll_max_delay_s,
            retry_after=exc.retry_after, rng=ctx.rng,
        )
        delay = min(delay, settings.poll_max_delay_s, max(watch.deadline - ctx.clock(), 0.001))
        log.warning(
            "poll_failed", watch_id=watch_id, error=str(exc), retry_after_s=exc.retry_after,
            throttled=isinstance(exc, Check365Throttled), failures=failures, next_poll_in_s=round(delay, 3),
        )
        return _reschedule(ctx, watch, holder, delay, {"failures": str(failures), "polls": str(watch.polls + 1)})

    now = ctx.clock()
    polls = watch.polls + 1
    if isinstance(outcome, check365.Completed):
        log.info("poll_done", watch_id=watch_id, status="completed", progress=100, polls=polls)
        metrics.poll("completed")
        metrics.detection_lag(now - (watch.history[-1].at if watch.history else watch.started_at))
        heads = _stage_completed(ctx, watch, holder, outcome, now)
        return _finish(ctx, _with_polls(watch, polls), holder, "completed", heads)
    if isinstance(outcome, check365.Failed):
        log.info("poll_done", watch_id=watch_id, status=outcome.status, polls=polls)
        metrics.poll("failed")
        message = outcome.message or f"Check365 reports the job as {outcome.status}"
        event = failed_event(watch_id, watch.job_id, "job_failed", message, watch.metadata, now=now)
        return _finish(ctx, _with_polls(watch, polls), holder, "failed", [event])

    metrics.poll("incomplete" if isinstance(outcome, check365.Incomplete) else "running")
    history = [*watch.history, Observation(at=now, progress=outcome.progress)][-HISTORY_LIMIT:]
    if isinstance(outcome, check365.Incomplete):
        delay = incomplete_results_delay(settings.poll_initial_delay_s)
    else:
        delay = next_poll_delay(
            history, now=now, started_at=watch.started_at, deadline=watch.deadline,
            initial_delay=settings.poll_initial_delay_s, max_delay=settings.poll_max_delay_s,
        )
    delay = min(delay, settings.poll_max_delay_s, max(watch.deadline - now, 0.001))
    log.info(
        "poll_done", watch_id=watch_id, status=outcome.status, progress=outcome.progress, polls=polls,
        incomplete_results=isinstance(outcome, check365.Incomplete), next_poll_in_s=round(delay, 3),
    )
    fields = {
        "polls": str(polls),
        "failures": "0",
        "last_status": outcome.status[:100],
        "last_progress": "" if outcome.progress is None else repr(float(outcome.progress)),
        "history": _json(observations_to_json(history)),
        "last_poll_at": fmt(now),
    }
    return _reschedule(ctx, watch, holder, delay, fields)


def _stage_completed(
    ctx: Context, watch: Watch, holder: str, outcome: check365.Completed, now: float
) -> list[EventHead]:
    """Build the parts one at a time and stage each body as soon as it is built.

    Only one part's results and body are held at once, whatever the job's size.
    Should this fail half-way, the bodies staged so far expire on their own.
    """
    heads: list[EventHead] = []

    def bodies() -> Iterator[tuple[str, bytes]]:
        for event in iter_completed_events(
            watch.watch_id, watch.job_id, outcome.data, watch.metadata,
            per_part=ctx.settings.webhook_max_results_per_part, now=now,
        ):
            heads.append(event.head)
            yield event.webhook_id, event.body

    try:
        ctx.outbox.stage_bodies(holder, bodies())
    finally:
        # A big answer's temporary file is not needed once its parts are stored.
        outcome.close()
    return heads


def _with_polls(watch: Watch, polls: int) -> Watch:
    return replace(watch, polls=polls)


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def _reschedule(ctx: Context, watch: Watch, holder: str, delay: float, fields: dict[str, str]) -> StepResult:
    due = ctx.clock() + delay
    if not ctx.watches.advance(watch.watch_id, holder, due, fields):
        return Dropped("lost_claim", watch.watch_id)
    return Reschedule(watch.watch_id, holder, delay)
