"""Delivering one webhook event: an attempt, its classification, the retry schedule.

``deliver_once`` is a plain function of a context; the task module turns its result
into a countdown (short delays) or leaves the event to the sweep (delays too long
to wait for inside the broker's visibility timeout).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import structlog

from check365_client import tracing
from worker.delivery.events import iso_timestamp
from worker.delivery.limits import EndpointLimits, retry_span_s
from worker.delivery.policy import policy_for
from worker.delivery.signing import webhook_headers
from worker.delivery.urls import Resolver, endpoint_key, pin_callback
from worker.errors import DeliveryFailed, OutOfTime, UnsafeCallbackURL
from worker.ops import metrics
from worker.polling.check365 import USER_AGENT
from worker.retry_after import capped, parse_retry_after
from worker.runtime import logs
from worker.runtime.context import Context, WebhookClients, webhook_timeout
from worker.runtime.deadlines import exchange_deadline
from worker.runtime.leases import attempt_budget_s, delivery_lease_s, head, within
from worker.runtime.transport import open_response
from worker.settings import Settings
from worker.state.endpoints import Admission, Gate, Released, Settlement
from worker.state.outbox import StoredEvent
from worker.state.store import Booking, Dropped, Lease

log = logs.get_logger("check365.delivery")

# Positive jitter only: a retry never comes before the configured delay.
JITTER = 0.1
# A receiver's answer body is not used; reading a short one keeps the connection reusable.
_ANSWER_BODY_MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class Attempt:
    ok: bool
    status_code: int | None = None
    error: str | None = None
    retry_after: float | None = None
    gone: bool = False
    unsafe: bool = False
    duration_s: float = 0.0

    def describe(self) -> str:
        if self.error:
            return self.error
        return f"HTTP {self.status_code}"


# Every result carries the events its step let out of their endpoint's waiting line
# (``wake``): the task sends their messages.


@dataclass(frozen=True)
class Delivered:
    webhook_id: str
    wake: tuple[Released, ...] = ()


@dataclass(frozen=True)
class RetryLater:
    webhook_id: str
    token: str
    delay: float
    countdown: bool
    wake: tuple[Released, ...] = ()


@dataclass(frozen=True)
class DeadLettered:
    webhook_id: str
    reason: str
    wake: tuple[Released, ...] = ()


@dataclass(frozen=True)
class Held:
    """Not attempted: the endpoint's breaker is open or its cap is reached; the event waits in line."""

    webhook_id: str
    reason: str  # breaker_open, cap
    wake: tuple[Released, ...] = ()


DeliveryResult = Delivered | RetryLater | DeadLettered | Dropped | Held

# What a step that never came back from its attempt is recorded as, by the step after it.
UNFINISHED = "timeout (the attempt never returned)"


def send_attempt(
    clients: WebhookClients,
    settings: Settings,
    *,
    url: str,
    webhook_id: str,
    body: bytes,
    now: float,
    resolver: Resolver,
    extra_headers: Mapping[str, str] | None = None,
) -> Attempt:
    """POST one attempt, signed with the secrets of the URL's endpoint as configured now, to the
    address that was checked, and classify the answer.

    ``extra_headers`` (the trace context) are sent too; they are not signed.
    """
    started = time.monotonic()
    try:
        policy = policy_for(settings, url)
        target = pin_callback(url, allow_http=policy.allow_http, allow_private=policy.allow_private, resolver=resolver)
    except UnsafeCallbackURL as exc:
        return Attempt(ok=False, error=str(exc), unsafe=True)
    except DeliveryFailed as exc:
        return Attempt(ok=False, error=str(exc), duration_s=time.monotonic() - started)

    headers = webhook_headers(policy.secrets, webhook_id, int(now), body, USER_AGENT)
    headers.update(extra_headers or {})
    headers["Host"] = target.host_header
    extensions = {"sni_hostname": target.sni_hostname} if target.sni_hostname else {}
    try:
        client = clients.for_server_name(target.sni_hostname)
        with exchange_deadline(attempt_budget_s(policy) - (time.monotonic() - started)) as deadline:
            response = open_response(
                client,
                "POST",
                target.url,
                content=body,
                headers=headers,
                extensions=extensions,
                timeout=webhook_timeout(policy),
            )
            try:
                # The status and headers are the answer. A short body is read so that the
                # connection can serve the next attempt; a long, slow or broken one is cut
                # off (the connection is then closed, not reused), and the status stands.
                if not response.is_stream_consumed:  # a transport may hand back a body it has read already
                    head(within(response.iter_raw(), deadline), _ANSWER_BODY_MAX_BYTES)
            except (OutOfTime, httpx.HTTPError):
                pass
            finally:
                response.close()
    except httpx.TimeoutException:
        return Attempt(ok=False, error="timeout", duration_s=time.monotonic() - started)
    except httpx.HTTPError as exc:
        return Attempt(
            ok=False, error=f"connection error ({type(exc).__name__})", duration_s=time.monotonic() - started
        )
    elapsed = time.monotonic() - started
    code = response.status_code
    if 200 <= code < 300:
        return Attempt(ok=True, status_code=code, duration_s=elapsed)
    if code == 410:
        return Attempt(ok=False, status_code=code, gone=True, duration_s=elapsed)
    retry_after = parse_retry_after(response.headers.get("retry-after"), time.time())
    error = f"HTTP {code} (redirect not followed)" if 300 <= code < 400 else None
    return Attempt(ok=False, status_code=code, error=error, retry_after=retry_after, duration_s=elapsed)


def _delays_of(settings: Settings, event: StoredEvent) -> tuple[float, ...]:
    try:
        return policy_for(settings, event.callback_url).retry_delays_s
    except UnsafeCallbackURL:
        return settings.webhook_retry_delays_s


def countdown_limit(settings: Settings) -> float:
    """The longest delay that may wait as a countdown message in the broker."""
    return min(settings.poll_max_delay_s, settings.broker_visibility_timeout_s / 2)


def retry_delay(
    tries: int,
    settings: Settings,
    retry_after: float | None,
    jitter: float,
    *,
    delays: tuple[float, ...] | None = None,
) -> float | None:
    """Delay before the next attempt after ``tries`` failed ones, or None when exhausted.

    ``jitter`` is a number in [0, 1) drawn by the caller; ``delays``, an endpoint's own
    schedule (default: ``WEBHOOK_RETRY_DELAYS_S``).
    """
    delays = delays or settings.webhook_retry_delays_s
    if tries > len(delays):
        return None
    delay = delays[tries - 1] * (1 + JITTER * jitter)
    if retry_after is not None:
        delay = max(delay, capped(retry_after))
    return delay


def deliver_once(ctx: Context, webhook_id: str, token: str) -> DeliveryResult:
    """Make the attempt the message carrying ``token`` asks for, if that message still holds the event."""
    claimed = ctx.outbox.claim(webhook_id, token, Lease.starting(ctx.clock(), delivery_lease_s(ctx.settings)))
    if claimed is None:
        return Dropped("stale_token", webhook_id)
    event, body, holder = claimed
    return deliver_claimed(ctx, event, body, holder)


def _attempt_number(event: StoredEvent) -> int:
    # The attempts list also holds the breaker's history (records with "held"), which are not attempts.
    return 1 + sum(1 for a in event.attempts if "held" not in a)


def _log_breaker(endpoint: str, settlement: Settlement, now: float) -> None:
    if settlement.transition in ("opened", "reopened"):
        log.warning(
            "breaker_opened",
            endpoint=endpoint,
            consecutive_failures=settlement.failures,
            cooldown_s=round(settlement.cooldown_s, 3),
            reopened=settlement.transition == "reopened",
        )
    elif settlement.transition == "closed":
        opened = settlement.opened_at
        log.info("breaker_closed", endpoint=endpoint, open_for_s=round(now - opened, 3) if opened else None)


@dataclass(frozen=True)
class _Step:
    """A delivery step's hold on one event, and the endpoint the event goes to."""

    ctx: Context
    event: StoredEvent
    holder: str
    endpoint: str
    limits: EndpointLimits
    log: structlog.typing.FilteringBoundLogger

    def settle(
        self, booking: Booking, *, outcome: str, closed: bool, slot: str | None = None, error: str = ""
    ) -> Settlement:
        """Book the attempt on the event (``booking``) and, in the same call, free its slot
        (``slot``: its holder, when not this step), feed the breaker and wake waiters."""
        now = self.ctx.clock()
        settlement = self.ctx.endpoints.settle(
            self.endpoint,
            holder=self.holder if slot is None else slot,
            outcome=outcome,
            limits=self.limits,
            now=now,
            webhook_id=self.event.webhook_id,
            closed=closed,
            error=error,
            booking=booking,
        )
        _log_breaker(self.endpoint, settlement, now)
        return settlement

    @property
    def delays(self) -> tuple[float, ...]:
        """The retry schedule of the event's endpoint (``WEBHOOK_RETRY_DELAYS_S`` unless it has its own)."""
        return _delays_of(self.ctx.settings, self.event)

    def dead(self, tries: int, reason: str, record: dict[str, object], *, metric: str, **settle: Any) -> DeadLettered:
        webhook_id = self.event.webhook_id
        booking = self.ctx.outbox.dead_letter(
            webhook_id, self.holder, self.ctx.clock(), tries, reason=reason, attempt=record
        )
        wake = self.settle(booking, closed=True, **settle).released
        metrics.dead_lettered(metric)
        self.log.warning("webhook_dead_lettered", reason=reason, attempt=tries)
        return DeadLettered(webhook_id, reason, wake)

    def failed(
        self, tries: int, error: str, retry_after: float | None, record: dict[str, object], *, slot: str | None = None
    ) -> DeliveryResult:
        """Book a failed attempt (``tries`` counts it): the next one is scheduled, or the event is dead."""
        settings = self.ctx.settings
        webhook_id = self.event.webhook_id
        delay = retry_delay(tries, settings, retry_after, self.ctx.rng.random(), delays=self.delays)
        if delay is None:
            return self.dead(
                tries,
                f"retries exhausted: {error}",
                record,
                metric="retries_exhausted",
                outcome="fail",
                slot=slot,
                error=error,
            )
        countdown = delay <= countdown_limit(settings)
        booking = self.ctx.outbox.retry_later(
            webhook_id,
            self.holder,
            self.ctx.clock() + delay,
            armed=countdown,
            tries=tries,
            last_error=error,
            attempt=record,
        )
        settlement = self.settle(booking, outcome="fail", closed=False, slot=slot, error=error)
        wake = settlement.released
        if not settlement.booked:
            return Dropped("lost_claim", webhook_id, wake)
        metrics.delivery("failed")
        self.log.warning(
            "webhook_failed", error=error, attempt=tries, retry_in_s=round(delay, 3), retry_after_s=retry_after
        )
        return RetryLater(webhook_id, self.holder, delay, countdown, wake)

    def unfinished(self) -> DeliveryResult | None:
        """Count an attempt a previous step began and never settled (killed by its time limit, or its
        worker died) as a failed one, a timeout, for the backoff, the breaker and the dead letters alike;
        the next attempt then comes after its delay, as after any failure."""
        started = _started(self.event.started)
        if started is None or started.get("holder") == self.holder:
            return None
        record: dict[str, object] = {
            "attempt": started.get("attempt"),
            "at": started.get("at"),
            "ok": False,
            "status_code": None,
            "error": UNFINISHED,
            "duration_ms": None,
            "replay": self.event.replays,
        }
        # The lost step's slot goes with its failure (its lease has ended anyway).
        return self.failed(self.event.tries + 1, UNFINISHED, None, record, slot=str(started.get("holder") or ""))

    def held(self, admission: Admission) -> DeliveryResult:
        """Not attempted: parked in the endpoint's line, or dead once held past its retry schedule's span."""
        webhook_id = self.event.webhook_id
        if admission.verdict != "expired":
            why = "breaker_open" if admission.verdict == "held_open" else "cap"
            self.log.debug("webhook_held", endpoint=self.endpoint, reason=why, in_flight=admission.in_flight)
            return Held(webhook_id, why)
        breaker = admission.breaker
        waited = (
            breaker.describe()
            if breaker.state != "closed"
            else f"{admission.in_flight} attempts in flight, the endpoint's cap"
        )
        reason = f"held past the retry schedule ({retry_span_s(self.ctx.settings, self.delays):g} s): {waited}"
        record: dict[str, object] = {
            "at": iso_timestamp(self.ctx.clock(), milliseconds=True),
            "ok": False,
            "held": "expired",
            "breaker": breaker.state,
            "consecutive_failures": breaker.failures,
            "breaker_opened_at": breaker.opened_at,
            "error": reason,
        }
        return self.dead(self.event.tries, reason, record, metric="held_past_schedule", outcome="none", slot="")


def _started(raw: str) -> dict[str, object] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def gate_for(ctx: Context, event: StoredEvent, holder: str, now: float) -> Gate:
    """The endpoint's gate for the attempt ``holder`` is about to make at ``event``."""
    endpoint = endpoint_key(event.callback_url)
    return _gate(ctx, event, holder, now, endpoint=endpoint, limits=ctx.endpoint_limits(endpoint))


def _gate(ctx: Context, event: StoredEvent, holder: str, now: float, *, endpoint: str, limits: EndpointLimits) -> Gate:
    at = iso_timestamp(now, milliseconds=True)
    return ctx.endpoints.gate(
        webhook_id=event.webhook_id,
        endpoint=endpoint,
        holder=holder,
        limits=limits,
        now=now,
        # What is left of the step's hold on the event (its due time is the lease's end).
        lease_s=max(event.due - now, 0.0),
        deadline=event.since + retry_span_s(ctx.settings, _delays_of(ctx.settings, event)),
        created_at=event.created_at,
        started={"holder": holder, "attempt": _attempt_number(event), "at": at},
        now_iso=at,
        attempts_key=ctx.outbox.attempts_key(event.webhook_id),
    )


def deliver_claimed(
    ctx: Context, event: StoredEvent, body: bytes, holder: str, admission: Admission | None = None
) -> DeliveryResult:
    """One attempt at an event this step holds as ``holder``, if its endpoint lets it, and its bookkeeping.

    ``admission`` is the gate's answer when the step passed it already, in the finish that
    created the event (which cannot have an unfinished attempt yet).
    """
    settings = ctx.settings
    now = ctx.clock()
    webhook_id = event.webhook_id
    number = _attempt_number(event)
    # Every line of this step names the job, the event and which attempt it is.
    structlog.contextvars.bind_contextvars(job_id=event.job_id, webhook_id=webhook_id, attempt=number)
    endpoint = endpoint_key(event.callback_url)
    step = _Step(
        ctx,
        event,
        holder,
        endpoint,
        ctx.endpoint_limits(endpoint),
        log.bind(event_type=event.type, part=f"{event.part_index}/{event.part_count}"),
    )
    if admission is None:
        settled = step.unfinished()
        if settled is not None:
            return settled
        admission = ctx.endpoints.admit(_gate(ctx, event, holder, now, endpoint=endpoint, limits=step.limits))
    if admission.verdict == "lost":
        return Dropped("lost_claim", webhook_id)
    if not admission.admitted:
        return step.held(admission)

    attributes: dict[str, tracing.Attribute] = {
        "check365.job_id": event.job_id,
        "check365.webhook_id": webhook_id,
        "check365.attempt": number,
    }
    with tracing.span("check365.deliver", parent=event.trace, kind="client", attributes=attributes) as traced:
        attempt = send_attempt(
            ctx.webhooks,
            settings,
            url=event.callback_url,
            webhook_id=webhook_id,
            body=body,
            now=now,
            resolver=ctx.resolver,
            extra_headers=traced.headers(),
        )
        traced.set("http.response.status_code", attempt.status_code)
        traced.set("check365.delivered", attempt.ok)
    metrics.delivery_attempt(attempt.duration_s, sent=not attempt.unsafe)
    tries = event.tries + 1
    # Recorded by whichever call settles the step below, in the same round trip.
    record: dict[str, object] = {
        "attempt": number,
        "at": iso_timestamp(now, milliseconds=True),
        "ok": attempt.ok,
        "status_code": attempt.status_code,
        "error": attempt.error,
        "duration_ms": round(attempt.duration_s * 1000, 1),
        "replay": event.replays,
    }
    if admission.verdict == "probe":
        record["probe"] = True
    if attempt.ok:
        booking = ctx.outbox.mark_delivered(webhook_id, holder, ctx.clock(), tries, record)
        wake = step.settle(booking, outcome="ok", closed=True).released
        metrics.delivery("delivered")
        step.log.info(
            "webhook_delivered",
            status_code=attempt.status_code,
            attempt=tries,
            latency_ms=round(attempt.duration_s * 1000, 1),
        )
        return Delivered(webhook_id, wake)
    if attempt.gone:
        # A 410 is an answer: the endpoint is up.
        return step.dead(tries, "gone", record, metric="gone", outcome="ok")
    if attempt.unsafe:
        # Never sent: it says nothing about the endpoint.
        return step.dead(tries, attempt.describe(), record, metric="unsafe_callback", outcome="none")
    return step.failed(tries, attempt.describe(), attempt.retry_after, record)
