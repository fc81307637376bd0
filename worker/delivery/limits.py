"""What one endpoint may take of the pool: its cap on attempts in flight and its breaker.

An endpoint is the scheme, host and port of a callback URL (``worker.delivery.urls.endpoint_key``).
The limits of each endpoint come from a function of its key, so that limits declared per
endpoint (the endpoints file) can replace the pool-wide defaults for some keys only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
    """The same limits for every endpoint, from the settings."""
    limits = EndpointLimits(
        max_in_flight=settings.webhook_endpoint_max_in_flight,
        breaker_threshold=settings.webhook_breaker_threshold,
        cooldown_s=settings.webhook_breaker_cooldown_s,
    )

    def limits_for(endpoint: str) -> EndpointLimits:
        return limits

    return limits_for


def retry_span_s(settings: Settings) -> float:
    """The retry schedule's total span: how long an event may wait for its endpoint in all."""
    return float(sum(settings.webhook_retry_delays_s))
