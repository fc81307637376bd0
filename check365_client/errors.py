"""The errors ``check365_client`` raises: nothing else escapes its functions.

    ClientError                  base class
    ├── InvalidWatchRequest      a kwarg breaks the contract's rules; nothing was enqueued
    │   └── UnsafeCallbackURL    the callback URL breaks the scheme or SSRF rules
    │       └── UnregisteredEndpoint  it matches no endpoint of the file, and only those are allowed
    ├── BrokerUnavailable        Redis could not be reached or refused the command
    └── EndpointsFileError       the endpoints file breaks a rule (``endpoint`` and ``key`` say where)

Messages name the field and the rule, never a password from the broker URL nor a secret.
"""

from __future__ import annotations


class ClientError(Exception):
    """Base class of every error ``check365_client`` raises."""


class InvalidWatchRequest(ClientError, ValueError):
    """``field`` (job_id, callback_url, metadata or kwargs) breaks ``rule``."""

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(f"{field}: {rule}")


class UnsafeCallbackURL(InvalidWatchRequest):
    def __init__(self, rule: str) -> None:
        super().__init__("callback_url", rule)


class UnregisteredEndpoint(UnsafeCallbackURL):
    """Only the endpoints file's URLs are allowed (``WEBHOOK_ENDPOINTS_ONLY``), and this one matches none."""

    reason = "unregistered_endpoint"

    def __init__(self) -> None:
        super().__init__("matches no endpoint of the endpoints file, and only registered endpoints are allowed")


class BrokerUnavailable(ClientError):
    """The broker (Redis) could not be reached or refused the command: nothing was enqueued."""


class EndpointsFileError(ClientError, ValueError):
    """The endpoints file breaks ``rule``; ``endpoint`` and ``key`` name where (None: the file itself)."""

    def __init__(self, rule: str, *, endpoint: str | None = None, key: str | None = None) -> None:
        self.endpoint = endpoint
        self.key = key
        self.rule = rule
        where = ""
        if endpoint is not None:
            where = f"endpoint {endpoint!r}" + (f", key {key!r}" if key is not None else "") + ": "
        elif key is not None:
            where = f"key {key!r}: "
        super().__init__(where + rule)
