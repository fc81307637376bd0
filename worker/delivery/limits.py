"""What one endpoint may take of the pool: its cap on attempts in flight and its breaker.

An endpoint is the scheme, host and port of a callback URL (``worker.delivery.urls.endpoint_key``).
The limits of each endpoint come from a function of its key, so that limits declared per
endpoint (the endpoints file) can replace the pool-wide defaults for some keys only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from worker.delivery.urls import endpoint_key
from worker.settings import Settings

# Each failed probe doubles the cool-down, up to this many times the first one: with the
# default 30 s, an endpoint down for hours is probed every 16 minutes at the slowest.
COOLDOWN_GROWTH_MAX = 32


@dataclass(frozen=True)
class EndpointLimits:
    max_in_flight: int  # attempts in flight towards the endpoint, pool-wide
    breaker_threshold: int  # consecutive failed attempts that open the breaker
    cooldown_s: float  # before the first probe of an open breaker; doubles per failed probe

    @property
    def cooldown_max_s(self) -> float:
        return self.cooldown_s * COOLDOWN_GROWTH_MAX


EndpointLimitsFor = Callable[[str], EndpointLimits]


def default_limits(settings: Settings) -> EndpointLimitsFor:
    """The settings' limits for every endpoint, except where the endpoints file overrides them.

    An override of ``max_in_flight`` or ``breaker_threshold`` in the file applies to the
    scheme, host and port of that endpoint's ``url``; where several named endpoints share
    one, the strictest (the smallest) of their values holds.
    """
    limits = EndpointLimits(
        max_in_flight=settings.webhook_endpoint_max_in_flight,
        breaker_threshold=settings.webhook_breaker_threshold,
        cooldown_s=settings.webhook_breaker_cooldown_s,
    )
    caps: dict[str, list[int]] = {}
    thresholds: dict[str, list[int]] = {}
    for named in settings.endpoints:
        key = endpoint_key(named.url)
        if named.max_in_flight is not None:
            caps.setdefault(key, []).append(named.max_in_flight)
        if named.breaker_threshold is not None:
            thresholds.setdefault(key, []).append(named.breaker_threshold)
    overridden = {
        key: replace(
            limits,
            max_in_flight=min(caps.get(key, [limits.max_in_flight])),
            breaker_threshold=min(thresholds.get(key, [limits.breaker_threshold])),
        )
        for key in caps.keys() | thresholds.keys()
    }

    def limits_for(endpoint: str) -> EndpointLimits:
        return overridden.get(endpoint, limits)

    return limits_for


def retry_span_s(settings: Settings, delays: tuple[float, ...] | None = None) -> float:
    """The retry schedule's total span (``delays``: an endpoint's own): how long an event may wait in all."""
    return float(sum(delays or settings.webhook_retry_delays_s))
