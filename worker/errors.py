"""The one exception hierarchy of check365-worker.

    Check365WorkerError
    ├── SettingsError            a setting is missing or breaks its rule (start-up stops)
    ├── RetryableError           try again later; ``retry_after`` is a server-given delay
    │   ├── Check365Unavailable  5xx, timeout, connection error, garbage, success:false
    │   │   └── Check365Misconfigured  an answer that is not Check365's: the deployment is wrong
    │   ├── Check365Throttled    429 from Check365
    │   ├── OutOfTime            an answer still arriving when its exchange's budget ran out
    │   └── DeliveryFailed       the callback host could not be resolved (the attempt is retried)
    └── PermanentError           trying again cannot help (``reason`` says why)
        ├── Check365Rejected     job not found, key refused, request refused
        ├── UnsafeCallbackURL    the callback URL breaks the SSRF or scheme rules
        │                        (also the client's UnsafeCallbackURL: refused at enqueue too)
        │   └── UnregisteredCallback  it matches no endpoint, and only registered ones are allowed
        └── InvalidSignature     a webhook fails Standard Webhooks verification

The producers' client has its own tree, drawn in ``check365_client/errors.py``;
``InvalidWatchRequest`` (raised by both, re-exported here) and ``UnsafeCallbackURL`` are in it.

Messages never contain the API key, a webhook secret or a full Check365 URL:
callers may log ``str(exc)`` freely.
"""

from __future__ import annotations

from check365_client import errors as client_errors


class Check365WorkerError(Exception):
    """Base class of every error raised on purpose by check365-worker."""


class SettingsError(Check365WorkerError):
    def __init__(self, variable: str, rule: str) -> None:
        self.variable = variable
        self.rule = rule
        super().__init__(f"{variable} {rule}")


# The producers' client and the worker share one implementation of the request rules,
# and with it their error: raised by either, it is the same class.
InvalidWatchRequest = client_errors.InvalidWatchRequest


class RetryableError(Check365WorkerError):
    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class Check365Unavailable(RetryableError):
    pass


class Check365Throttled(RetryableError):
    pass


class Check365Misconfigured(Check365Unavailable):
    """Whatever answered is not Check365 (a web server's 404 page, a proxy's 401, HTML).

    A wrong ``CHECK365_BASE_URL`` or proxy is the operator's fault, not the job's: it is
    retried like an outage, but logged as an error and counted apart, and never ends a watch.
    """


class OutOfTime(RetryableError):
    """An answer was still arriving when its exchange's total budget ran out (see worker/runtime/leases.py)."""

    def __init__(self) -> None:
        super().__init__("the answer took longer than its budget")


class DeliveryFailed(RetryableError):
    def __init__(self, message: str, *, status_code: int | None = None, retry_after: float | None = None) -> None:
        self.status_code = status_code
        super().__init__(message, retry_after=retry_after)


class PermanentError(Check365WorkerError):
    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class Check365Rejected(PermanentError):
    """reason is one of ``job_not_found``, ``unauthorized``, ``bad_request``."""


class UnsafeCallbackURL(PermanentError, client_errors.UnsafeCallbackURL):
    """Both permanent (at delivery) and an invalid request (at enqueue)."""

    def __init__(self, rule: str) -> None:
        self.reason = "unsafe_callback_url"
        self.field = "callback_url"
        self.rule = rule
        Exception.__init__(self, f"callback_url: {rule}")


class UnregisteredCallback(UnsafeCallbackURL):
    """The URL matches no endpoint of the endpoints file, and ``WEBHOOK_ENDPOINTS_ONLY`` allows only those."""

    def __init__(self, rule: str) -> None:
        super().__init__(rule)
        self.reason = client_errors.UnregisteredEndpoint.reason


class InvalidSignature(PermanentError):
    """Raised by ``worker.delivery.signing.verify``; the message says which check failed."""

    def __init__(self, message: str) -> None:
        super().__init__("invalid_signature", message)
