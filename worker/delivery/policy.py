"""What applies to one callback URL: its endpoint's secrets, flags, retry delays and timeout.

A URL that belongs to an endpoint of ``WEBHOOK_ENDPOINTS_FILE`` (contract section 5) is
signed with that endpoint's secrets only and delivered under its overrides; any other
URL gets the pool's settings (``WEBHOOK_SECRET``...), or is refused when
``WEBHOOK_ENDPOINTS_ONLY`` is on. The policy is looked up at each attempt, from the
settings this process started with: restarting the workers with new secrets re-signs
every pending retry with them.
"""

from __future__ import annotations

from dataclasses import dataclass

from check365_client import errors as client_errors
from check365_client.endpoints import callback_rules
from worker.errors import UnregisteredCallback
from worker.settings import Settings


@dataclass(frozen=True)
class CallbackPolicy:
    endpoint: str | None  # the endpoint's name; None: WEBHOOK_SECRET and the pool's settings
    secrets: tuple[str, ...]
    allow_http: bool
    allow_private: bool
    retry_delays_s: tuple[float, ...]
    timeout_s: float

    def __repr__(self) -> str:
        return f"CallbackPolicy(endpoint={self.endpoint!r}, secrets={len(self.secrets)})"


def policy_for(settings: Settings, url: object) -> CallbackPolicy:
    """The policy of ``url``; UnregisteredCallback when only registered endpoints are allowed and it is none."""
    try:
        rules = callback_rules(
            url,
            settings.endpoints.file,
            allow_http=settings.webhook_allow_http,
            allow_private=settings.webhook_allow_private_networks,
            endpoints_only=settings.webhook_endpoints_only,
        )
    except client_errors.UnregisteredEndpoint as exc:
        raise UnregisteredCallback(exc.rule) from None
    endpoint = rules.endpoint
    if endpoint is None:
        return CallbackPolicy(
            None,
            settings.webhook_secrets,
            rules.allow_http,
            rules.allow_private,
            settings.webhook_retry_delays_s,
            settings.webhook_timeout_s,
        )
    return CallbackPolicy(
        endpoint.name,
        settings.endpoints.secrets_of(endpoint.name),
        rules.allow_http,
        rules.allow_private,
        endpoint.retry_delays_s or settings.webhook_retry_delays_s,
        endpoint.timeout_s or settings.webhook_timeout_s,
    )


def longest_timeout_s(settings: Settings) -> float:
    """The longest timeout any attempt may get: what the steps' time limits and leases are built from."""
    return max((settings.webhook_timeout_s, *(e.timeout_s for e in settings.endpoints if e.timeout_s)))
