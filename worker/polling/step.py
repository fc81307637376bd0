"""Watching a job: one poll at a time, as a plain function of a context.

``start_watch`` and ``poll_once`` return what should happen next; the task module
turns that into a countdown or into delivery messages. Nothing here knows Celery.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import structlog

from check365_client import tracing
from check365_client.names import watch_id_for
from check365_client.rules import WatchRequest
from worker.delivery.events import Event, EventHead, failed_event, iter_completed_events, timed_out_event
from worker.delivery.policy import policy_for
from worker.delivery.step import gate_for
from worker.delivery.urls import validate_callback_url
from worker.errors import (
    Check365Misconfigured,
    Check365Rejected,
    Check365Throttled,
    RetryableError,
    UnsafeCallbackURL,
)
from worker.ops import metrics
from worker.polling import check365
from worker.polling.schedule import (
    SHORT_RESULTS_WAIT_S,
    Observation,
    incomplete_results_delay,
    key_refused_pause,
    next_poll_delay,
    remember,
    transient_delay,
)
from worker.runtime import logs
from worker.runtime.context import Context
from worker.runtime.leases import watch_lease_s
from worker.state.endpoints import Admission
from worker.state.outbox import ClaimedEvent
from worker.state.store import Dropped, Lease
from worker.state.watches import Seen, Watch

log = logs.get_logger("check365.polling")

# The outcome of a watch whose callback URL the settings in force no longer allow.
CALLBACK_REFUSED = "callback_refused"


@dataclass(frozen=True)
class Reschedule:
    """Send the next poll message with ``token`` after ``delay`` seconds."""

    watch_id: str
    token: str
    delay: float


@dataclass(frozen=True)
class Finished:
    """The watch has its outcome; deliver these (webhook_id, token) pairs.

    ``leased`` is a single event created claimed by this step, for it to deliver
    itself (``deliveries`` then holds its id and the holder token); ``admission``, its
    endpoint's gate for that attempt, passed in the same round trip as the finish.
    """

    outcome: str
    deliveries: list[tuple[str, str]]
    leased: ClaimedEvent | None = None
    admission: Admission | None = None


StepResult = Reschedule | Finished | Dropped


def new_watch_id(message_id: str | None = None) -> str:
    """The id of the watch a start message creates: the same for every delivery of that message."""
    if message_id:
        return watch_id_for(message_id)
    return "w_" + secrets.token_hex(10)


def start_watch(
    ctx: Context, request: WatchRequest, queue: str = "", message_id: str | None = None, trace: str = ""
) -> StepResult:
    """Create the watch; with no initial delay, also make its first poll.

    ``message_id`` (the start message's task id) makes a redelivered start message a
    duplicate even after its watch has ended: a worker that died after finishing the
    watch, but before acknowledging the message, must not have it start a second one.
    ``trace`` is the producer's traceparent, if it sent one: the watch's trace continues it.
    """
    with tracing.span("check365.watch", parent=trace, attributes={"check365.job_id": request.job_id}) as started:
        return _start(ctx, request, queue, message_id, started.traceparent)


def _start(ctx: Context, request: WatchRequest, queue: str, message_id: str | None, trace: str) -> StepResult:
    now = ctx.clock()
    delay = ctx.settings.poll_initial_delay_s
    # POLL_INITIAL_DELAY_S=0: the watch is created claimed by this step, which polls it
    # at once. A message with no countdown would only come straight back from the
    # broker, at the cost of a publish, a reservation, an ack and a claim.
    poll_now = delay <= 0
    created = ctx.watches.create(
        watch_id=new_watch_id(message_id),
        job_id=request.job_id,
        callback_url=request.callback_url,
        metadata=request.metadata,
        now=now,
        first_poll_at=now + delay,
        deadline=now + ctx.settings.watch_timeout_s,
        queue=queue or ctx.settings.queue,
        lease=Lease.starting(now, watch_lease_s(ctx.settings)) if poll_now else None,
        trace=trace,
        # Its first poll's turn under the rate limit, in the same round trip.
        also=[ctx.limiter.acquire_call()] if poll_now else (),
    )
    if created.token is None or created.watch is None:
        log.info("watch_duplicate", watch_id=created.watch_id)
        return Dropped("duplicate", created.watch_id)
    log.info("watch_enqueued", watch_id=created.watch_id, first_poll_in_s=round(delay, 3))
    metrics.watch_started()
    if poll_now:
        return _poll_claimed(ctx, created.watch, created.token, ctx.limiter.wait_of(created.also[0]))
    return Reschedule(created.watch_id, created.token, delay)


def _finish(
    ctx: Context,
    watch: Watch,
    holder: str,
    outcome: str,
    events: Sequence[Event | EventHead],
    *,
    deliver_here: bool = True,
    **logged: object,
) -> StepResult:
    now = ctx.clock()
    # A single event (every outcome but a completed job of several parts) is created
    # claimed by this step, which delivers it: its first attempt would otherwise cost a
    # message, a task run and a claim. Several parts go out as messages instead, so
    # that free slots on any worker send them in parallel.
    single = events[0] if deliver_here and len(events) == 1 and isinstance(events[0], Event) else None
    finishing = ctx.watches.finish(
        watch,
        holder,
        outcome,
        events,
        outbox=ctx.outbox,
        now=now,
        # The rest of this task may still deliver it: hold it as long as the task may run.
        lease=Lease.starting(now, watch_lease_s(ctx.settings)) if single is not None else None,
        gate=(lambda claimed: gate_for(ctx, claimed.event, claimed.holder, now)) if ctx.gate_on_finish else None,
    )
    if finishing is None:
        return Dropped("lost_claim", watch.watch_id)
    metrics.watch_finished(outcome)
    # An outcome that no receiver hears of is a warning.
    (log.info if events else log.warning)(
        f"watch_{outcome}",
        watch_id=watch.watch_id,
        polls=watch.polls,
        events=len(events),
        duration_s=round(now - watch.started_at, 3),
        **logged,
    )
    if single is not None and finishing.leased is not None:
        return Finished(outcome, finishing.tokens, finishing.leased, finishing.admission)
    return Finished(outcome, finishing.tokens)


def _progress_out(progress: float | None) -> float | int | None:
    if progress is not None and progress == int(progress):
        return int(progress)
    return progress


def poll_once(ctx: Context, watch_id: str, token: str) -> StepResult:
    """Run the poll the message carrying ``token`` asks for, if that message still holds the watch."""
    claimed = ctx.watches.claim(watch_id, token, Lease.starting(ctx.clock(), watch_lease_s(ctx.settings)))
    if claimed is None:
        return Dropped("stale_token", watch_id)
    watch, holder = claimed
    return _poll_claimed(ctx, watch, holder)


def expire_stranded(ctx: Context, watch_id: str, token: str) -> StepResult:
    """End a watch past its deadline whose re-armed messages still do not run it (the sweep's backstop).

    Its events are left to messages: the sweep, not a poll step, sends them.
    """
    claimed = ctx.watches.claim(watch_id, token, Lease.starting(ctx.clock(), watch_lease_s(ctx.settings)))
    if claimed is None:
        return Dropped("stale_token", watch_id)
    watch, holder = claimed
    return _time_out(ctx, watch, holder, deliver_here=False, by="sweep")


def callback_refusal(ctx: Context, callback_url: str) -> str | None:
    """Why the settings in force refuse ``callback_url`` (the rules a start message meets), or None."""
    try:
        policy = policy_for(ctx.settings, callback_url)
        validate_callback_url(callback_url, allow_http=policy.allow_http, allow_private=policy.allow_private)
    except UnsafeCallbackURL as exc:
        return str(exc)
    return None


def _poll_claimed(ctx: Context, watch: Watch, holder: str, wait: float | None = None) -> StepResult:
    attributes: dict[str, tracing.Attribute] = {
        "check365.job_id": watch.job_id,
        "check365.watch_id": watch.watch_id,
        "check365.poll": watch.polls + 1,
    }
    with tracing.span("check365.poll", parent=watch.trace, kind="client", attributes=attributes) as traced:
        result = _poll(ctx, watch, holder, wait)
        traced.set("check365.step", result.outcome if isinstance(result, Finished) else type(result).__name__.lower())
        return result


def _poll(ctx: Context, watch: Watch, holder: str, wait: float | None = None) -> StepResult:
    """The poll of a watch this step holds; ``wait``: the rate limit's answer, when the step already asked."""
    settings = ctx.settings
    now = ctx.clock()
    watch_id = watch.watch_id
    # Every line of this step names the job and which poll it is.
    structlog.contextvars.bind_contextvars(job_id=watch.job_id, watch_id=watch_id, attempt=watch.polls + 1)

    refused = callback_refusal(ctx, watch.callback_url)
    if refused is not None:
        # Accepted when the watch started, refused by the settings in force now
        # (WEBHOOK_ALLOW_HTTP switched off...): no event could reach it, so the watch ends
        # here, and its pair may be enqueued again.
        return _finish(ctx, watch, holder, CALLBACK_REFUSED, [], reason=refused)

    # Past its deadline a watch still gets one poll: its turns may have been pushed there by
    # the rate limit, and a job that completed meanwhile is reported completed, not timed out.
    final = now >= watch.deadline
    if wait is None:
        wait = ctx.limiter.acquire()
    if wait > 0:
        # Before the deadline, back at the deadline at the latest (for its final poll); after
        # it, at the turn the limiter gives, which comes however many watches wait.
        delay = min(wait, settings.poll_max_delay_s)
        if not final:
            delay = min(delay, max(watch.deadline - now, 0.001))
        log.debug("poll_throttled", watch_id=watch_id, wait_s=round(wait, 3), past_deadline=final)
        metrics.poll("throttled")
        return _reschedule(ctx, watch, holder, delay)

    try:
        with metrics.check365_request():
            outcome = check365.fetch_status(ctx.check365, settings, watch.job_id)
    except Check365Rejected as exc:
        if exc.reason == "unauthorized" and (held := _hold_for_key(ctx, watch, holder, exc, final)) is not None:
            return held
        metrics.poll("rejected", exc)
        log.warning("poll_rejected", watch_id=watch_id, reason=exc.reason, error=str(exc))
        event = failed_event(watch_id, watch.job_id, exc.reason, str(exc), watch.metadata, now=ctx.clock())
        # Refused, but polled all the same: the count says so.
        return _finish(ctx, _with_polls(watch, watch.polls + 1), holder, "failed", [event])
    except RetryableError as exc:
        if final:
            return _time_out(ctx, _with_polls(watch, watch.polls + 1), holder)
        return _retry_later(ctx, watch, holder, exc)

    ctx.limiter.key_accepted()
    now = ctx.clock()
    polls = watch.polls + 1
    short_since = watch.short_since if watch.short_since is not None else now
    # At the deadline, a completed job short of results is delivered as it is.
    outcome = _short_answer_accepted(watch, outcome, SHORT_RESULTS_WAIT_S if final else now - short_since)
    if isinstance(outcome, check365.Completed | check365.Failed):
        return _job_done(ctx, replace(watch, polls=polls), holder, outcome, now)

    metrics.poll("incomplete" if isinstance(outcome, check365.Incomplete) else "running")
    if final:
        return _time_out(
            ctx, replace(watch, polls=polls, last_status=outcome.status, last_progress=outcome.progress), holder
        )
    history = remember(watch.history, Observation(at=now, progress=outcome.progress))
    if isinstance(outcome, check365.Incomplete):
        delay = incomplete_results_delay(settings.poll_initial_delay_s, now - short_since, settings.poll_patience)
    else:
        delay = next_poll_delay(
            history,
            now=now,
            started_at=watch.started_at,
            deadline=watch.deadline,
            initial_delay=settings.poll_initial_delay_s,
            max_delay=settings.poll_max_delay_s,
            patience=settings.poll_patience,
        )
    delay = min(delay, settings.poll_max_delay_s, max(watch.deadline - now, 0.001))
    log.info(
        "poll_done",
        watch_id=watch_id,
        status=outcome.status,
        progress=outcome.progress,
        polls=polls,
        incomplete_results=isinstance(outcome, check365.Incomplete),
        next_poll_in_s=round(delay, 3),
    )
    seen = Seen(
        status=outcome.status,  # cut to MAX_STATUS_CHARS by check365
        progress=outcome.progress,
        history=history,
        at=now,
        short_since=short_since if isinstance(outcome, check365.Incomplete) else None,
    )
    return _reschedule(ctx, watch, holder, delay, polls=polls, failures=0, seen=seen)


def _job_done(
    ctx: Context, watch: Watch, holder: str, outcome: check365.Completed | check365.Failed, now: float
) -> StepResult:
    """Check365 says the job is over: completed (its parts) or failed (one event)."""
    if isinstance(outcome, check365.Completed):
        # The watch_completed line that follows says the same at INFO.
        log.debug("poll_done", watch_id=watch.watch_id, status="completed", progress=100, polls=watch.polls)
        metrics.poll("completed")
        metrics.detection_lag(now - (watch.history[-1].at if watch.history else watch.started_at))
        seen = replace(watch, last_status=str(outcome.data.get("status")), last_progress=100.0)
        heads = _stage_completed(ctx, watch, holder, outcome, now)
        return _finish(ctx, seen, holder, "completed", heads)
    log.debug("poll_done", watch_id=watch.watch_id, status=outcome.status, polls=watch.polls)
    metrics.poll("failed")
    message = outcome.message or f"Check365 reports the job as {outcome.status}"
    event = failed_event(watch.watch_id, watch.job_id, "job_failed", message, watch.metadata, now=now)
    return _finish(ctx, replace(watch, last_status=outcome.status), holder, "failed", [event])


def _time_out(ctx: Context, watch: Watch, holder: str, *, deliver_here: bool = True, **logged: object) -> StepResult:
    """The watch's final poll, at or after its deadline, did not find the job finished."""
    event = timed_out_event(
        watch.watch_id,
        watch.job_id,
        watch.last_status,
        _progress_out(watch.last_progress),
        watch.metadata,
        now=ctx.clock(),
    )
    return _finish(ctx, watch, holder, "timed_out", [event], deliver_here=deliver_here, **logged)


def _hold_for_key(ctx: Context, watch: Watch, holder: str, exc: Check365Rejected, final: bool) -> StepResult | None:
    """A refused API key is the operator's to fix, not the job's: the pool waits for it.

    None once the key has been refused for ``CHECK365_AUTH_GRACE_S``: the watch fails.
    """
    grace = ctx.settings.auth_grace_s
    pause = key_refused_pause(grace)
    refused_for = ctx.limiter.key_refused(grace, pause)
    if refused_for >= grace:
        return None
    metrics.poll("unauthorized", exc)
    log.error(
        "poll_key_refused",
        watch_id=watch.watch_id,
        error=str(exc),
        refused_for_s=round(refused_for, 3),
        watches_fail_in_s=round(grace - refused_for, 3),
        pool_paused_s=round(pause, 3),
    )
    polled = _with_polls(watch, watch.polls + 1)
    if final:
        return _time_out(ctx, polled, holder)
    delay = min(max(pause, 0.001), ctx.settings.poll_max_delay_s, max(watch.deadline - ctx.clock(), 0.001))
    return _reschedule(ctx, watch, holder, delay, polls=polled.polls)


def _retry_later(ctx: Context, watch: Watch, holder: str, exc: RetryableError) -> StepResult:
    """A poll that got no usable answer: try again after a growing, jittered delay."""
    settings = ctx.settings
    misconfigured = isinstance(exc, Check365Misconfigured)
    metrics.poll("misconfigured" if misconfigured else "transient", exc)
    if exc.retry_after:
        ctx.limiter.block(exc.retry_after)
    failures = watch.failures + 1
    delay = transient_delay(
        failures,
        initial_delay=settings.poll_initial_delay_s,
        max_delay=settings.poll_max_delay_s,
        retry_after=exc.retry_after,
        rng=ctx.rng,
    )
    delay = min(delay, settings.poll_max_delay_s, max(watch.deadline - ctx.clock(), 0.001))
    # Not the job's fault nor Check365's: an operator must fix the deployment, and the
    # watch waits for that rather than failing a job that may be fine.
    (log.error if misconfigured else log.warning)(
        "poll_misconfigured" if misconfigured else "poll_failed",
        watch_id=watch.watch_id,
        error=str(exc),
        retry_after_s=exc.retry_after,
        throttled=isinstance(exc, Check365Throttled),
        failures=failures,
        next_poll_in_s=round(delay, 3),
    )
    return _reschedule(ctx, watch, holder, delay, polls=watch.polls + 1, failures=failures)


def _short_answer_accepted(watch: Watch, outcome: check365.PollOutcome, waited_s: float) -> check365.PollOutcome:
    """A job still short of results once ``SHORT_RESULTS_WAIT_S`` is over is delivered as it is."""
    if not isinstance(outcome, check365.Incomplete) or outcome.answer is None:
        return outcome
    if waited_s < SHORT_RESULTS_WAIT_S:
        outcome.close()  # only its counts are used: the job is polled again
        return outcome
    # What Check365 has now is what it will send.
    log.warning(
        "poll_results_short",
        watch_id=watch.watch_id,
        total=outcome.total,
        received=outcome.received,
        waited_s=round(waited_s, 3),
    )
    return outcome.answer


def _stage_completed(
    ctx: Context, watch: Watch, holder: str, outcome: check365.Completed, now: float
) -> list[Event | EventHead]:
    """Build the parts one at a time and stage each body as soon as it is built.

    Only one part's results and body are held at once, whatever the job's size. A
    job of one part is handed back whole instead: the finish call can carry it.
    Should this fail half-way, the bodies staged so far expire on their own.
    """
    heads: list[Event | EventHead] = []
    try:
        parts = iter_completed_events(
            watch.watch_id,
            watch.job_id,
            outcome.data,
            watch.metadata,
            per_part=ctx.settings.webhook_max_results_per_part,
            now=now,
        )
        first = next(parts)
        second = next(parts, None)
        if second is None:
            return [first]

        def bodies() -> Iterator[tuple[str, bytes]]:
            for event in itertools.chain((first, second), parts):
                heads.append(event.head)
                yield event.webhook_id, event.body

        ctx.outbox.stage_bodies(holder, bodies())
    finally:
        # A big answer's temporary file is not needed once its parts are stored.
        outcome.close()
    return heads


def _with_polls(watch: Watch, polls: int) -> Watch:
    return replace(watch, polls=polls)


def _reschedule(
    ctx: Context,
    watch: Watch,
    holder: str,
    delay: float,
    *,
    polls: int | None = None,
    failures: int | None = None,
    seen: Seen | None = None,
) -> StepResult:
    due = ctx.clock() + delay
    if not ctx.watches.advance(watch.watch_id, holder, due, polls=polls, failures=failures, seen=seen):
        return Dropped("lost_claim", watch.watch_id)
    return Reschedule(watch.watch_id, holder, delay)
