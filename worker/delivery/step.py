"""Delivering one webhook event: an attempt, its classification, the retry schedule.

``deliver_once`` is a plain function of a context; the task module turns its result
into a countdown (short delays) or leaves the event to the sweep (delays too long
to wait for inside the broker's visibility timeout).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
import structlog

from worker.delivery.events import iso_timestamp
from worker.delivery.signing import webhook_headers
from worker.delivery.urls import Resolver, pin_callback
from worker.errors import DeliveryFailed, OutOfTime, UnsafeCallbackURL
from worker.ops import metrics
from worker.polling.check365 import USER_AGENT, parse_retry_after
from worker.runtime.context import Context, WebhookClients
from worker.runtime.leases import delivery_lease_s, head, webhook_budget_s, within
from worker.settings import Settings
from worker.state.outbox import StoredEvent
from worker.state.store import Lease

log = structlog.get_logger("check365.delivery")

# Beyond this a server-given Retry-After is not trusted further.
MAX_RETRY_AFTER_S = 3600.0
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


@dataclass(frozen=True)
class Delivered:
    webhook_id: str


@dataclass(frozen=True)
class RetryLater:
    webhook_id: str
    token: str
    delay: float
    countdown: bool


@dataclass(frozen=True)
class DeadLettered:
    webhook_id: str
    reason: str


@dataclass(frozen=True)
class Skipped:
    webhook_id: str
    reason: str


DeliveryResult = Delivered | RetryLater | DeadLettered | Skipped


def send_attempt(
    clients: WebhookClients,
    settings: Settings,
    *,
    url: str,
    webhook_id: str,
    body: bytes,
    now: float,
    resolver: Resolver,
) -> Attempt:
    """POST one signed attempt to the address that was checked, and classify the answer."""
    started = time.monotonic()
    try:
        target = pin_callback(
            url,
            allow_http=settings.webhook_allow_http,
            allow_private=settings.webhook_allow_private_networks,
            resolver=resolver,
        )
    except UnsafeCallbackURL as exc:
        return Attempt(ok=False, error=str(exc), unsafe=True)
    except DeliveryFailed as exc:
        return Attempt(ok=False, error=str(exc), duration_s=time.monotonic() - started)

    headers = webhook_headers(settings.webhook_secrets, webhook_id, int(now), body, USER_AGENT)
    headers["Host"] = target.host_header
    extensions = {"sni_hostname": target.sni_hostname} if target.sni_hostname else {}
    try:
        client = clients.for_server_name(target.sni_hostname)
        request = client.build_request("POST", target.url, content=body, headers=headers, extensions=extensions)
        response = client.send(request, stream=True)
        try:
            # The status and headers are the answer. A short body is read so that the
            # connection can serve the next attempt; a long, slow or broken one is cut
            # off (the connection is then closed, not reused), and the status stands.
            if not response.is_stream_consumed:  # a transport may hand back a body it has read already
                head(within(response.iter_raw(), started + webhook_budget_s(settings)), _ANSWER_BODY_MAX_BYTES)
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


def countdown_limit(settings: Settings) -> float:
    """The longest delay that may wait as a countdown message in the broker."""
    return min(settings.poll_max_delay_s, settings.broker_visibility_timeout_s / 2)


def retry_delay(tries: int, settings: Settings, retry_after: float | None, jitter: float) -> float | None:
    """Delay before the next attempt after ``tries`` failed ones, or None when exhausted.

    ``jitter`` is a number in [0, 1) drawn by the caller.
    """
    delays = settings.webhook_retry_delays_s
    if tries > len(delays):
        return None
    delay = delays[tries - 1] * (1 + JITTER * jitter)
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
    return delay


def deliver_once(ctx: Context, webhook_id: str, token: str) -> DeliveryResult:
    """Make the attempt the message carrying ``token`` asks for, if that message still holds the event."""
    claimed = ctx.outbox.claim(webhook_id, token, Lease.starting(ctx.clock(), delivery_lease_s(ctx.settings)))
    if claimed is None:
        return Skipped(webhook_id, "stale_token")
    event, body, holder = claimed
    return deliver_claimed(ctx, event, body, holder)


def deliver_claimed(ctx: Context, event: StoredEvent, body: bytes, holder: str) -> DeliveryResult:
    """One attempt at an event this step holds as ``holder``, and its bookkeeping."""
    settings = ctx.settings
    now = ctx.clock()
    webhook_id = event.webhook_id
    # Every line of this step names the job, the event and which attempt it is.
    structlog.contextvars.bind_contextvars(job_id=event.job_id, webhook_id=webhook_id, attempt=len(event.attempts) + 1)
    bound = log.bind(event_type=event.type, part=f"{event.part_index}/{event.part_count}")

    attempt = send_attempt(
        ctx.webhooks,
        settings,
        url=event.callback_url,
        webhook_id=webhook_id,
        body=body,
        now=now,
        resolver=ctx.resolver,
    )
    metrics.delivery_attempt(attempt.duration_s, sent=not attempt.unsafe)
    tries = event.tries + 1
    # Recorded by whichever call settles the step below, in the same round trip.
    record = {
        "attempt": len(event.attempts) + 1,
        "at": iso_timestamp(now, milliseconds=True),
        "ok": attempt.ok,
        "status_code": attempt.status_code,
        "error": attempt.error,
        "duration_ms": round(attempt.duration_s * 1000, 1),
        "replay": event.replays,
    }
    done = ctx.clock()
    if attempt.ok:
        ctx.outbox.mark_delivered(webhook_id, holder, done, tries, record)
        metrics.delivery("delivered")
        bound.info(
            "webhook_delivered",
            status_code=attempt.status_code,
            attempt=tries,
            latency_ms=round(attempt.duration_s * 1000, 1),
        )
        return Delivered(webhook_id)
    if attempt.gone or attempt.unsafe:
        reason = "gone" if attempt.gone else attempt.describe()
        ctx.outbox.dead_letter(webhook_id, holder, done, tries, reason=reason, attempt=record)
        metrics.dead_lettered("gone" if attempt.gone else "unsafe_callback")
        bound.warning("webhook_dead_lettered", reason=reason, attempt=tries)
        return DeadLettered(webhook_id, reason)

    delay = retry_delay(tries, settings, attempt.retry_after, ctx.rng.random())
    if delay is None:
        reason = f"retries exhausted: {attempt.describe()}"
        ctx.outbox.dead_letter(webhook_id, holder, done, tries, reason=reason, attempt=record)
        metrics.dead_lettered("retries_exhausted")
        bound.warning("webhook_dead_lettered", reason=reason, attempt=tries)
        return DeadLettered(webhook_id, reason)
    countdown = delay <= countdown_limit(settings)
    if not ctx.outbox.retry_later(
        webhook_id, holder, done + delay, armed=countdown, tries=tries, last_error=attempt.describe(), attempt=record
    ):
        return Skipped(webhook_id, "lost_claim")
    metrics.delivery("failed")
    bound.warning(
        "webhook_failed",
        error=attempt.describe(),
        attempt=tries,
        retry_in_s=round(delay, 3),
        retry_after_s=attempt.retry_after,
    )
    return RetryLater(webhook_id, holder, delay, countdown)
