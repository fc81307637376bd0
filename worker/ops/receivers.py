"""What the receivers' commands do: ``send-test``, ``endpoints`` and ``endpoints recover``.

What Svix users reach for: a signed sample event to check a receiver's verification
without a job, the endpoints as the workers see them (each secret by its fingerprint,
never its value), and a replay of one endpoint's dead letters since a time, once the
receiver is fixed. Bad arguments raise ValueError, whose message the CLI prints.
"""

from __future__ import annotations

import math
import re
import secrets as token_source
import time
from datetime import datetime
from typing import Any

from worker.delivery.events import COMPLETED, FAILED, TIMED_OUT, sample_event
from worker.errors import SettingsError
from worker.settings import Settings

EVENT_TYPES = {"completed": COMPLETED, "failed": FAILED, "timed_out": TIMED_OUT}
_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(raw: str, now: float) -> float:
    """``--since``: an ISO 8601 time (``2026-12-04T10:00:00Z``), unix seconds, or a duration ago (``6h``, ``2d``)."""
    text = raw.strip()
    ago = _AGO.fullmatch(text)
    if ago:
        return now - float(ago.group(1)) * _UNIT_S[ago.group(2)]
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise ValueError(f"--since {raw!r} is not a time")
        return seconds
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {raw!r}: give an ISO 8601 time, unix seconds, or a duration ago like 6h") from None
    if moment.tzinfo is None:
        raise ValueError(f"--since {raw!r}: give the time zone (Z for UTC)")
    return moment.timestamp()


def fingerprints(values: tuple[str, ...]) -> list[str]:
    from worker.delivery.signing import fingerprint

    return [fingerprint(v) for v in values]


def endpoint_rows(settings: Settings) -> list[dict[str, Any]]:
    """Each endpoint of the file as the workers see it; secrets by fingerprint only."""
    rows = []
    for e in settings.endpoints:
        rows.append(
            {
                "name": e.name,
                "url": e.url,
                "secret_source": f"env {e.secret_env}" if e.secret_env else "inline",
                "secret_fingerprints": fingerprints(settings.endpoints.secrets_of(e.name)),
                "allow_http": e.allow_http,
                "allow_private_networks": e.allow_private_networks,
                "max_in_flight": e.max_in_flight,
                "breaker_threshold": e.breaker_threshold,
                "retry_delays_s": list(e.retry_delays_s) if e.retry_delays_s else None,
                "timeout_s": e.timeout_s,
            }
        )
    return rows


def named_line(row: dict[str, Any], shown: Any) -> str:
    """A named endpoint under its scheme, host and port in ``check365-worker endpoints``."""
    flags = [k for k in ("allow_http", "allow_private_networks") if row[k]]
    overrides = [f"{k}={row[k]}" for k in ("max_in_flight", "breaker_threshold", "retry_delays_s", "timeout_s")]
    extra = " ".join([*flags, *(o for o in overrides if not o.endswith("=None"))])
    secrets = " ".join(row["secret_fingerprints"])
    return f"    {row['name']}  {shown(row['url'])}  secrets ({row['secret_source']}): {secrets}" + (
        f"  {extra}" if extra else ""
    )


def other_urls_line(settings: Settings) -> str:
    """What becomes of a callback URL of no endpoint."""
    if settings.webhook_endpoints_only:
        return "other URLs: refused (WEBHOOK_ENDPOINTS_ONLY)"
    default = " ".join(fingerprints(settings.webhook_secrets)) or "(not set)"
    return f"other URLs: signed with WEBHOOK_SECRET {default}"


def send_test(settings: Settings, *, endpoint: str | None, url: str | None, kind: str) -> dict[str, Any]:
    """Send one signed sample event, marked ``"test": true`` in its data, to an endpoint or URL; no job."""
    from worker.delivery.policy import policy_for
    from worker.delivery.step import send_attempt
    from worker.delivery.urls import system_resolver
    from worker.errors import UnsafeCallbackURL
    from worker.runtime.context import WebhookClients

    if endpoint is not None:
        registered = settings.endpoints.get(endpoint)
        if registered is None:
            known = ", ".join(e.name for e in settings.endpoints) or "none: WEBHOOK_ENDPOINTS_FILE is not set"
            raise ValueError(f"no endpoint {endpoint!r} (known: {known})")
        url = registered.url
    assert url is not None  # noqa: S101 - argparse requires one of --endpoint and --url
    try:
        policy = policy_for(settings, url)
    except UnsafeCallbackURL as exc:
        raise ValueError(f"refused: {exc}") from None
    if not policy.secrets:
        raise SettingsError("WEBHOOK_SECRET", "is needed to sign a test to a URL of no endpoint")
    now = time.time()
    event = sample_event(EVENT_TYPES[kind], now=now, nonce=token_source.token_hex(8))
    clients = WebhookClients(settings)
    try:
        attempt = send_attempt(
            clients, settings, url=url, webhook_id=event.webhook_id, body=event.body, now=now, resolver=system_resolver
        )
    finally:
        clients.close()
    return {
        "ok": attempt.ok,
        "webhook_id": event.webhook_id,
        "type": event.type,
        "endpoint": policy.endpoint,
        "url": url,
        "signed_with": fingerprints(policy.secrets),
        "status_code": attempt.status_code,
        "error": attempt.error,
        "duration_ms": round(attempt.duration_s * 1000, 1),
    }


def recover(settings: Settings, outbox: Any, name: str, since: float, replay: Any) -> dict[str, Any]:
    """Replay the dead letters of endpoint ``name`` dead-lettered since ``since``, with their webhook-ids."""
    if settings.endpoints.get(name) is None:
        known = ", ".join(e.name for e in settings.endpoints) or "none: WEBHOOK_ENDPOINTS_FILE is not set"
        raise ValueError(f"no endpoint {name!r} (known: {known})")
    replayed: list[str] = []
    not_replayed: list[dict[str, str]] = []
    for webhook_id in outbox.dead_letters_since(since):
        event = outbox.get(webhook_id)
        if event is None:
            continue
        owner = settings.endpoints.match(event.callback_url)
        if owner is None or owner.name != name:
            continue
        why_not = replay(settings, outbox, webhook_id)
        if why_not is None:
            replayed.append(webhook_id)
        else:
            not_replayed.append({"webhook_id": webhook_id, "reason": why_not})
    return {"endpoint": name, "since": since, "replayed": replayed, "not_replayed": not_replayed}
