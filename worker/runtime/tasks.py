"""Thin Celery tasks: validate the message, call a plain function, translate its result.

Every message is validated here, at the boundary: a message that breaks the contract
(from a foreign producer) is logged with its reason and dropped, never retried and
never allowed to crash the worker.

Two layers do that: ``worker.intake.boundary`` checks what Celery takes apart before any task
code runs, then the tasks check their kwargs. Either way the rejection is logged as
``watch_rejected`` or ``delivery_rejected``.
"""

from __future__ import annotations

import re
from typing import Any

import structlog

from check365_client.errors import UnregisteredEndpoint
from check365_client.rules import validate_watch_request
from check365_client.tracing import TRACEPARENT, valid_traceparent
from worker.app import app, settings
from worker.delivery.step import (
    DeadLettered,
    Delivered,
    DeliveryResult,
    Held,
    RetryLater,
    deliver_claimed,
    deliver_once,
)
from worker.errors import InvalidWatchRequest
from worker.intake.boundary import CheckedTask, reject
from worker.polling.step import Finished, Reschedule, StepResult, poll_once, start_watch
from worker.runtime import logs
from worker.runtime.celeryconfig import DELIVER_TASK, SWEEP_TASK, WATCH_TASK, deliver_kwargs, delivery_queue
from worker.runtime.context import Context, process_context
from worker.runtime.deadlines import step_deadline
from worker.runtime.leases import delivery_time_limit_s, watch_time_limit_s
from worker.runtime.sweep import sweep
from worker.state.store import Dropped

log = logs.get_logger("check365.tasks")

_ID = re.compile(r"[A-Za-z0-9_]{1,64}")


def _time_limit(task: Any, own: float) -> float:
    """The step's time: its task's limit, or a lower one its message asked for (soft or hard).

    The pool's threads enforce no time limit: the step's deadline does (worker/runtime/deadlines.py).
    The boundary refused any message asking for more (worker/intake/boundary.py).
    """
    limits = getattr(task.request, "timelimit", None)
    asked = [v for v in limits or () if isinstance(v, int | float) and not isinstance(v, bool) and v > 0]
    return min([own, *asked])


# Follow-ups go to the queues of this worker's configuration, never to the routing key a
# message came with: a producer chooses that one (another service's queue, say).
def _send_poll(watch_id: str, token: str, delay: float, queue: str) -> None:
    # The watch is in Redis: its next poll needs only which watch, and which message.
    watch_bulk_job.apply_async(kwargs={"watch_id": watch_id, "token": token}, countdown=delay, queue=queue)


def send_delivery(webhook_id: str, token: str, queue: str, delay: float = 0.0) -> None:
    """Send a delivery step to the deliveries' queue of the polls' ``queue``."""
    deliver_webhook.apply_async(
        kwargs=deliver_kwargs(webhook_id, token), countdown=delay or None, queue=delivery_queue(queue)
    )


# The hard time limits keep every step inside the lease it holds (see worker/runtime/leases.py).
@app.task(
    name=WATCH_TASK,
    base=CheckedTask,
    bind=True,
    max_retries=None,
    ignore_result=True,
    time_limit=watch_time_limit_s(settings),
)
def watch_bulk_job(self: Any, *args: Any, **kwargs: Any) -> str:
    """Start a watch, or run its next poll. Returns a short word for tests and Flower."""
    with step_deadline(_time_limit(self, watch_time_limit_s(settings))):
        return _watch(self, args, kwargs)


def _watch(self: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    if args:
        reject("watch_rejected", "positional arguments are not accepted; send kwargs")
        return "rejected"
    watch_id, token = kwargs.get("watch_id"), kwargs.get("token")
    ctx = process_context(settings)
    result: StepResult
    if watch_id is None and token is None:
        # A start: the request is checked against the rules in force now, once. Its
        # follow-ups read the watch from Redis, so that a later change of settings
        # cannot strand a watch already accepted (see poll_once for one that may no
        # longer be delivered).
        try:
            request = validate_watch_request(
                kwargs,
                allow_http=settings.webhook_allow_http,
                allow_private=settings.webhook_allow_private_networks,
                allow_internal=True,
                endpoints=settings.endpoints.file,
                endpoints_only=settings.webhook_endpoints_only,
            )
        except UnregisteredEndpoint:
            # Before any request to Check365 or to the URL; the URL is not logged (it may carry a token).
            reject("watch_rejected", UnregisteredEndpoint.reason)
            return "rejected"
        except InvalidWatchRequest as exc:
            reject("watch_rejected", str(exc))
            return "rejected"
        message_id = self.request.id if isinstance(self.request.id, str) else None
        trace = valid_traceparent(self.request.get(TRACEPARENT))
        result = start_watch(ctx, request, settings.queue, message_id, trace)
    elif isinstance(watch_id, str) and isinstance(token, str) and _ID.fullmatch(watch_id) and _ID.fullmatch(token):
        # Any other kwargs (job_id and the rest, which follow-ups carried before) are ignored.
        structlog.contextvars.bind_contextvars(watch_id=watch_id)
        result = poll_once(ctx, watch_id, token)
    else:
        reject("watch_rejected", "watch_id and token must both be short identifiers")
        return "rejected"

    if isinstance(result, Reschedule):
        _send_poll(result.watch_id, result.token, result.delay, settings.queue)
        return "scheduled"
    if isinstance(result, Finished):
        if result.leased is not None:
            # Created claimed by this step: delivered here. The event is already durable,
            # so a crash now is recovered like any delivery step's, once its lease ends.
            event, body, holder = result.leased
            _settle(deliver_claimed(ctx, event, body, holder, result.admission), settings.queue)
        else:
            for webhook_id, event_token in result.deliveries:
                send_delivery(webhook_id, event_token, settings.queue)
        return result.outcome
    assert isinstance(result, Dropped)  # noqa: S101 - exhaustive over StepResult
    if result.reason != "duplicate":  # a duplicate enqueue has its own watch_duplicate line
        # A redelivered or superseded message: rare, and the only trace its run leaves.
        log.info("watch_message_dropped", reason=result.reason, watch_id=result.item_id)
    return result.reason


@app.task(
    name=DELIVER_TASK,
    base=CheckedTask,
    bind=True,
    max_retries=None,
    ignore_result=True,
    time_limit=delivery_time_limit_s(settings),
)
def deliver_webhook(self: Any, *args: Any, **kwargs: Any) -> str:
    webhook_id, token = kwargs.get("webhook_id"), kwargs.get("token")
    if (
        args
        or set(kwargs) != {"webhook_id", "token"}
        or not all(isinstance(v, str) and _ID.fullmatch(v) for v in (webhook_id, token))
    ):
        reject("delivery_rejected", "expects exactly the kwargs webhook_id and token, as short identifiers")
        return "rejected"
    assert isinstance(webhook_id, str) and isinstance(token, str)  # noqa: S101 - checked just above
    with step_deadline(_time_limit(self, delivery_time_limit_s(settings))):
        return _deliver(process_context(settings), webhook_id, token, settings.queue)


def _deliver(ctx: Context, webhook_id: str, token: str, queue: str) -> str:
    structlog.contextvars.bind_contextvars(webhook_id=webhook_id)
    return _settle(deliver_once(ctx, webhook_id, token), queue)


def _settle(result: DeliveryResult, queue: str) -> str:
    """Send the retry of a delivery attempt as a countdown when it is short enough, and wake the
    events the step let out of their endpoint's waiting line."""
    for released in result.wake:
        send_delivery(released.webhook_id, released.token, released.queue or queue)
    if isinstance(result, Held):
        return "held"
    if isinstance(result, RetryLater):
        if result.countdown:
            send_delivery(result.webhook_id, result.token, queue, result.delay)
        return "retry"
    if isinstance(result, Delivered):
        return "delivered"
    if isinstance(result, DeadLettered):
        return "dead"
    log.info("delivery_message_dropped", reason=result.reason, webhook_id=result.item_id)
    return result.reason


@app.task(name=SWEEP_TASK, base=CheckedTask, bind=True, ignore_result=True)
def sweep_task(self: Any, *args: Any, **kwargs: Any) -> str:
    # Beat sends no arguments; a foreign message with some must not fail in the pool.
    if args or kwargs:
        reject("watch_rejected", "the sweep takes no arguments")
        return "rejected"
    origin = self.request.origin if isinstance(self.request.origin, str) else None
    watches, events = sweep(process_context(settings), origin=origin)
    for item in watches:
        _send_poll(item.watch.watch_id, item.token, 0.0, item.watch.queue or settings.queue)
    for event in events:
        send_delivery(event.webhook_id, event.token, event.queue)
    return f"rearmed {len(watches)} watches, {len(events)} events"
