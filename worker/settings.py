"""Typed, frozen settings read from the environment.

This module is the only reader of ``os.environ`` in the project. Every value is
validated here, at the boundary, so that a bad deployment stops at start-up with
one line naming the variable and the rule it broke, instead of failing hours
later in the middle of a watch.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal, TypeVar
from urllib.parse import quote, quote_plus, urlsplit

from worker.errors import SettingsError

T = TypeVar("T")

Role = Literal["worker", "client"]
LogFormat = Literal["auto", "json", "console"]

DEFAULT_RETRY_DELAYS = "5,300,1800,7200,18000,36000,36000"


@dataclass(frozen=True)
class Settings:
    # Secrets are excluded from repr so that a settings object printed in a
    # traceback or a debug log never shows them.
    api_key: str = field(repr=False)
    webhook_secrets: tuple[str, ...] = field(repr=False)
    base_url: str = "https://api.check365.io"
    redis_url: str = "redis://localhost:6379/0"
    queue: str = "check365"
    poll_initial_delay_s: float = 5.0
    poll_max_delay_s: float = 300.0
    watch_timeout_s: float = 86400.0
    webhook_retry_delays_s: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
    webhook_max_results_per_part: int = 1000
    webhook_allow_http: bool = False
    webhook_allow_private_networks: bool = False
    broker_visibility_timeout_s: float = 3600.0
    # Beyond the contract: tuning knobs with safe defaults, documented in the README.
    check365_max_rps: float = 4.0
    check365_timeout_s: float = 30.0
    webhook_timeout_s: float = 15.0
    sweep_interval_s: float = 15.0
    rearm_grace_s: float = 60.0
    state_ttl_s: float = 7 * 86400.0
    log_format: LogFormat = "auto"
    log_level: str = "INFO"
    metrics_port: int = 0
    # All interfaces by default: a scraper reaches the worker from outside its container.
    metrics_addr: str = "0.0.0.0"  # noqa: S104

    @property
    def status_url(self) -> str:
        return self.base_url.rstrip("/") + "/api/validation/bulk-status"

    @cached_property
    def redacted_values(self) -> tuple[str, ...]:
        """Every secret string that must never reach a log line or exception text.

        Each secret in every spelling it may come back in: the API key travels
        percent-encoded in a query string, and a server quoting its request quotes
        that form.
        """
        values = [self.api_key, *self.webhook_secrets]
        values += [s.removeprefix("whsec_") for s in self.webhook_secrets]
        return tuple(dict.fromkeys(form for v in values if v for form in url_spellings(v)))


_ESCAPE = re.compile(r"%[0-9A-F]{2}")


def url_spellings(value: str) -> tuple[str, ...]:
    """``value`` as written and as URLs carry it, with upper- and lower-case escapes."""
    encoded = (quote_plus(value), quote(value, safe=""))
    lower = tuple(_ESCAPE.sub(lambda m: m.group().lower(), e) for e in encoded)
    return tuple(dict.fromkeys((value, *encoded, *lower)))


# No duration is meant to reach a year; a larger one is a typo, and Redis refuses
# expiry times far beyond it only when the first watch is created.
MAX_SECONDS = 365 * 24 * 3600.0


def _parse_float(
    name: str, raw: str, *, minimum: float = 0.0, strict: bool = False, maximum: float = MAX_SECONDS
) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(name, f"must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or value < minimum or (strict and value == minimum) or value > maximum:
        rule = f"greater than {minimum:g}" if strict else f"at least {minimum:g}"
        raise SettingsError(name, f"must be a finite number {rule} and at most {maximum:,.0f}, got {raw!r}")
    return value


def _parse_int(name: str, raw: str, *, minimum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(name, f"must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(name, f"must be at least {minimum}, got {raw!r}")
    return value


def _parse_bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise SettingsError(name, f"must be true or false, got {raw!r}")


def _parse_delays(name: str, raw: str) -> tuple[float, ...]:
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if not parts:
        raise SettingsError(name, "must list at least one delay, comma-separated seconds")
    return tuple(_parse_float(name, p) for p in parts)


def _parse_url(name: str, raw: str, schemes: tuple[str, ...], *, base: bool = False) -> str:
    # The value is never echoed: a Redis URL may hold a password.
    rule = f"must be an absolute {' or '.join(schemes)} URL"
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - parsing the port is the check: it raises on 'host:abc'
    except ValueError:
        raise SettingsError(name, f"{rule}; this one does not parse (host or port)") from None
    if parts.scheme not in schemes:
        raise SettingsError(name, rule)
    if parts.scheme == "unix" and not parts.path:
        raise SettingsError(name, f"{rule}; a unix URL needs the socket's path")
    if parts.scheme != "unix" and not parts.hostname:
        raise SettingsError(name, rule)
    if base and (parts.query or parts.fragment):
        # The endpoint's path is appended to the base: a query or fragment would swallow it.
        raise SettingsError(name, f"{rule} without a query string or fragment")
    return raw


def _parse_secrets(name: str, raw: str) -> tuple[str, ...]:
    secrets = tuple(raw.split())
    for secret in secrets:
        if not secret.startswith("whsec_"):
            # Never echo the value: it is a secret, even when malformed.
            raise SettingsError(name, "each secret must look like whsec_<base64 key>")
        try:
            key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError):
            raise SettingsError(name, "the part after whsec_ must be valid base64") from None
        if len(key) < 16:
            raise SettingsError(name, "each key must decode to at least 16 bytes")
    return secrets


def _choice(options: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise SettingsError(name, f"must be one of {', '.join(options)}, got {raw!r}")
        return value

    return parse


def load_settings(environ: Mapping[str, str] | None = None, *, role: Role = "worker") -> Settings:
    """Read and validate every setting.

    ``role="client"`` is for processes that only enqueue or inspect (the CLI, the
    Python helper): they need neither the API key nor the webhook secret.
    """
    env = os.environ if environ is None else environ

    def get(name: str, parse: Callable[[str, str], T], default: T) -> T:
        raw = env.get(name)
        if raw is None or raw.strip() == "":
            return default
        return parse(name, raw.strip())

    api_key = env.get("CHECK365_API_KEY", "").strip()
    secrets_raw = env.get("WEBHOOK_SECRET", "").strip()
    if role == "worker":
        if not api_key:
            raise SettingsError("CHECK365_API_KEY", "is required by the worker")
        if not secrets_raw:
            raise SettingsError("WEBHOOK_SECRET", "is required by the worker (whsec_<base64 key>)")
    if any(c.isspace() or ord(c) < 32 for c in api_key):
        raise SettingsError("CHECK365_API_KEY", "must not contain whitespace or control characters")
    secrets = _parse_secrets("WEBHOOK_SECRET", secrets_raw) if secrets_raw else ()

    d = Settings(api_key="", webhook_secrets=())
    settings = Settings(
        api_key=api_key,
        webhook_secrets=secrets,
        base_url=get("CHECK365_BASE_URL", lambda n, r: _parse_url(n, r, ("http", "https"), base=True), d.base_url),
        redis_url=get("REDIS_URL", lambda n, r: _parse_url(n, r, ("redis", "rediss", "unix")), d.redis_url),
        queue=get("CHECK365_QUEUE", _parse_queue, d.queue),
        poll_initial_delay_s=get("POLL_INITIAL_DELAY_S", _parse_float, d.poll_initial_delay_s),
        poll_max_delay_s=get("POLL_MAX_DELAY_S", lambda n, r: _parse_float(n, r, strict=True), d.poll_max_delay_s),
        watch_timeout_s=get("WATCH_TIMEOUT_S", lambda n, r: _parse_float(n, r, strict=True), d.watch_timeout_s),
        webhook_retry_delays_s=get("WEBHOOK_RETRY_DELAYS_S", _parse_delays, d.webhook_retry_delays_s),
        webhook_max_results_per_part=get(
            "WEBHOOK_MAX_RESULTS_PER_PART",
            lambda n, r: _parse_int(n, r, minimum=1),
            d.webhook_max_results_per_part,
        ),
        webhook_allow_http=get("WEBHOOK_ALLOW_HTTP", _parse_bool, d.webhook_allow_http),
        webhook_allow_private_networks=get(
            "WEBHOOK_ALLOW_PRIVATE_NETWORKS", _parse_bool, d.webhook_allow_private_networks
        ),
        broker_visibility_timeout_s=get(
            "BROKER_VISIBILITY_TIMEOUT_S",
            lambda n, r: _parse_float(n, r, strict=True),
            d.broker_visibility_timeout_s,
        ),
        check365_max_rps=get(
            "CHECK365_MAX_RPS", lambda n, r: _parse_float(n, r, strict=True, maximum=1e6), d.check365_max_rps
        ),
        check365_timeout_s=get(
            "CHECK365_TIMEOUT_S", lambda n, r: _parse_float(n, r, strict=True), d.check365_timeout_s
        ),
        webhook_timeout_s=get("WEBHOOK_TIMEOUT_S", lambda n, r: _parse_float(n, r, strict=True), d.webhook_timeout_s),
        sweep_interval_s=get("SWEEP_INTERVAL_S", lambda n, r: _parse_float(n, r, strict=True), d.sweep_interval_s),
        rearm_grace_s=get("REARM_GRACE_S", _parse_float, d.rearm_grace_s),
        state_ttl_s=get("STATE_TTL_S", lambda n, r: _parse_float(n, r, strict=True), d.state_ttl_s),
        log_format=get("LOG_FORMAT", _choice(("auto", "json", "console")), d.log_format),  # type: ignore[arg-type]
        log_level=get(
            "LOG_LEVEL",
            lambda n, r: _choice(("debug", "info", "warning", "error"))(n, r).upper(),
            d.log_level,
        ),
        metrics_port=get("METRICS_PORT", lambda n, r: _parse_int(n, r, minimum=0), d.metrics_port),
        metrics_addr=get("METRICS_ADDR", _parse_address, d.metrics_addr),
    )
    _check_relations(settings)
    return settings


def _parse_address(name: str, raw: str) -> str:
    try:
        ipaddress.ip_address(raw)
    except ValueError:
        raise SettingsError(name, f"must be an IP address to listen on, got {raw!r}") from None
    return raw


def _parse_queue(name: str, raw: str) -> str:
    if not raw.replace("_", "").replace("-", "").replace(".", "").isalnum() or len(raw) > 200:
        raise SettingsError(name, "must be a queue name of letters, digits, '.', '_' or '-'")
    return raw


def _check_relations(s: Settings) -> None:
    if s.poll_initial_delay_s > s.poll_max_delay_s:
        raise SettingsError("POLL_INITIAL_DELAY_S", "must not exceed POLL_MAX_DELAY_S")
    # A countdown longer than the visibility timeout is re-delivered by kombu
    # while still waiting, so every countdown must stay well inside it.
    if s.broker_visibility_timeout_s <= s.poll_max_delay_s:
        raise SettingsError("BROKER_VISIBILITY_TIMEOUT_S", "must exceed POLL_MAX_DELAY_S")
    if s.metrics_port > 65535:
        raise SettingsError("METRICS_PORT", "must be a TCP port (0 disables the endpoint)")
