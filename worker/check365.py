"""The Check365 bulk-status client and the classification of its answers.

``fetch_status`` asks once; ``classify_response`` (pure) turns one answer into a
``PollOutcome`` or raises one of the errors of :mod:`worker.errors`:

    answer                                        outcome
    2xx, success true, status completed, all in   Completed(data)
    2xx, success true, status completed, missing  Incomplete (re-poll shortly)
    2xx, success true, failure-like status        Failed
    2xx, success true, any other status           Running
    2xx, success false, job unknown / key refused Check365Rejected
    429                                           Check365Throttled
    401 403 / 404 / 400 422 and other 4xx         Check365Rejected
    3xx, 408, 425, 5xx, garbage, success false    Check365Unavailable

The API key travels in the query string, so no message built here contains the
request URL, and no error is chained to an httpx exception (which carries it).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Final, NoReturn, TypeGuard

import httpx
import orjson

from config.settings import Settings
from worker import __version__
from worker.errors import Check365Rejected, Check365Throttled, Check365Unavailable

__all__ = [
    "TERMINAL_FAILURE_STATUSES",
    "USER_AGENT",
    "Completed",
    "Failed",
    "Incomplete",
    "PollOutcome",
    "Running",
    "classify_response",
    "fetch_status",
    "make_client",
    "parse_retry_after",
]

USER_AGENT: Final = f"check365-worker/{__version__}"

# Check365 documents only "completed"; these are the failure words its peers use.
TERMINAL_FAILURE_STATUSES: Final = frozenset(
    {"failed", "failure", "error", "errored", "canceled", "cancelled", "aborted", "expired", "rejected"}
)

# Enough of a Check365 message to diagnose, short enough to log on every poll.
MAX_MESSAGE_CHARS: Final = 200
# A server asking for more than an hour is more likely wrong than right; the
# watch deadline and the poll schedule still bound the wait.
MAX_RETRY_AFTER_S: Final = 3600.0
# Real Retry-After values are under 40 chars; anything far longer is garbage and
# not worth handing to the date parser.
_MAX_RETRY_AFTER_LEN: Final = 100
# Connecting should never take long; a slow connect means the host is unwell.
_MAX_CONNECT_TIMEOUT_S: Final = 10.0

_REDACTED: Final = "[redacted]"
_DELAY_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")

# A message that names the job is about the job even when it also names the key
# ("job not found for this API key"); otherwise key words win over a bare
# "not found" ("API key not found").
_JOB_MARKERS: Final = ("no such job", "unknown job")
_NOT_FOUND_MARKERS: Final = ("not found", "does not exist")
_KEY_MARKERS: Final = ("api key", "apikey", "api_key", "unauthori", "forbidden", "invalid key")


@dataclass(frozen=True)
class Running:
    status: str
    progress: float | None
    total: int | None


@dataclass(frozen=True)
class Incomplete:
    """Reported completed, but ``received`` results arrived out of ``total``."""

    status: str
    progress: float | None
    total: int
    received: int


@dataclass(frozen=True)
class Completed:
    """Check365's ``data`` object as parsed: fields unchanged, unknown ones kept."""

    data: dict[str, Any]


@dataclass(frozen=True)
class Failed:
    status: str
    message: str


PollOutcome = Running | Incomplete | Completed | Failed


def make_client(settings: Settings, transport: httpx.BaseTransport | None = None) -> httpx.Client:
    """The one Check365 client of a process: reuse it, its pool keeps connections warm."""
    t = settings.check365_timeout_s
    return httpx.Client(
        timeout=httpx.Timeout(connect=min(_MAX_CONNECT_TIMEOUT_S, t), read=t, write=t, pool=t),
        limits=httpx.Limits(max_connections=20, max_keepalive_connections=10),
        # A redirect would re-send the API key to wherever it points.
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        transport=transport,
    )


def fetch_status(client: httpx.Client, settings: Settings, job_id: str) -> PollOutcome:
    """Ask Check365 once about ``job_id``; see the module docstring for the outcomes."""
    answer = _get(client, settings, job_id)
    # Raised outside the ``except`` blocks of ``_get`` so that the error has no
    # ``__context__`` either: the httpx exception holds the request URL.
    if isinstance(answer, str):
        raise Check365Unavailable(answer)
    return classify_response(
        answer.status_code, answer.headers, answer.content, job_id, redact=settings.redacted_values
    )


def _get(client: httpx.Client, settings: Settings, job_id: str) -> httpx.Response | str:
    try:
        return client.get(settings.status_url, params={"api_key": settings.api_key, "job_id": job_id})
    except httpx.TimeoutException as exc:
        return f"Check365 did not answer in time ({type(exc).__name__})"
    except httpx.RequestError as exc:
        # Never str(exc): httpx messages may quote the URL, key included.
        return f"could not reach Check365 ({type(exc).__name__})"


def classify_response(
    status_code: int,
    headers: Mapping[str, str],
    body: bytes,
    job_id: str,
    *,
    redact: Iterable[str] = (),
) -> PollOutcome:
    """Turn one Check365 answer into an outcome, or raise the matching error.

    Every string in ``redact`` (the API key, in practice) is removed from any
    Check365 message quoted in an error or in ``Failed.message``.
    """
    secrets = tuple(s for s in redact if s)
    if not 200 <= status_code < 300:
        _raise_for_status(status_code, headers, body, secrets)
    parsed = _loads(body)
    if not isinstance(parsed, dict):
        raise Check365Unavailable("malformed answer: the body is not a JSON object")
    success = parsed.get("success")
    if not isinstance(success, bool):
        raise Check365Unavailable("malformed answer: 'success' is not a boolean")
    message = _message_of(parsed, secrets)
    if not success:
        _raise_for_refusal(message)
    data = parsed.get("data")
    if not isinstance(data, dict):
        raise Check365Unavailable("malformed answer: success without a 'data' object")
    return _classify_data(data, job_id, message)


def _classify_data(data: dict[str, Any], job_id: str, message: str) -> PollOutcome:
    if "jobId" in data and data["jobId"] != job_id:
        raise Check365Unavailable("malformed answer: answer for another job")
    status = data.get("status")
    if not isinstance(status, str):
        raise Check365Unavailable("malformed answer: 'data.status' is not a string")
    normalized = status.strip().lower()
    if normalized == "completed":
        return _classify_completed(data, status)
    if normalized in TERMINAL_FAILURE_STATUSES:
        return Failed(status=status, message=message)
    total = data.get("total")
    return Running(
        status=status,
        progress=_progress(data.get("progress")),
        total=total if _is_count(total) else None,
    )


def _classify_completed(data: dict[str, Any], status: str) -> Completed | Incomplete:
    results = data.get("results")
    total = data.get("total")
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise Check365Unavailable("malformed answer: 'data.results' is not a list of objects")
    if not _is_count(total):
        raise Check365Unavailable("malformed answer: 'data.total' is not a non-negative integer")
    if len(results) == total:
        return Completed(data=data)
    return Incomplete(
        status=status, progress=_progress(data.get("progress")), total=total, received=len(results)
    )


def _raise_for_status(
    status_code: int, headers: Mapping[str, str], body: bytes, secrets: tuple[str, ...]
) -> NoReturn:
    detail = f"Check365 answered HTTP {status_code}"
    parsed = _loads(body)
    if isinstance(parsed, dict) and (quoted := _message_of(parsed, secrets)):
        detail = f"{detail}: {quoted}"
    if status_code in (401, 403):
        raise Check365Rejected("unauthorized", detail)
    if status_code == 404:
        raise Check365Rejected("job_not_found", detail)
    if status_code == 429:
        raise Check365Throttled(detail, retry_after=_retry_after(headers))
    if status_code in (408, 425) or 500 <= status_code < 600:
        raise Check365Unavailable(detail, retry_after=_retry_after(headers))
    if 300 <= status_code < 400:
        raise Check365Unavailable(f"unexpected redirect: {detail}")
    if 400 <= status_code < 500:
        raise Check365Rejected("bad_request", detail)
    raise Check365Unavailable(f"unexpected status: {detail}")


def _raise_for_refusal(message: str) -> NoReturn:
    lowered = message.lower()
    detail = f"Check365 answered success=false: {message}" if message else "Check365 answered success=false"
    names_job = "job" in lowered and any(m in lowered for m in _NOT_FOUND_MARKERS)
    if names_job or any(m in lowered for m in _JOB_MARKERS):
        raise Check365Rejected("job_not_found", detail)
    if any(m in lowered for m in _KEY_MARKERS):
        raise Check365Rejected("unauthorized", detail)
    if any(m in lowered for m in _NOT_FOUND_MARKERS):
        raise Check365Rejected("job_not_found", detail)
    # Anything else may be a hiccup on their side: try again later.
    raise Check365Unavailable(detail)


_MALFORMED: Final = object()


def _loads(body: bytes) -> object:
    # Returns a sentinel instead of raising: orjson's error keeps the whole
    # document, which must not hang off our exception as its context.
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return _MALFORMED


def _message_of(parsed: dict[str, Any], secrets: tuple[str, ...]) -> str:
    message = parsed.get("message")
    if not isinstance(message, str):
        return ""
    # Redact before truncating: a cut could otherwise leave most of a secret.
    for secret in secrets:
        message = message.replace(secret, _REDACTED)
    return message[:MAX_MESSAGE_CHARS]


def _progress(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    progress = float(value)
    if not math.isfinite(progress):
        return None
    return min(100.0, max(0.0, progress))


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _retry_after(headers: Mapping[str, str]) -> float | None:
    for name, value in headers.items():
        if name.lower() == "retry-after":
            return parse_retry_after(value, time.time())
    return None


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After value (delay-seconds or HTTP-date).

    The result lies in [0, 3600]; a missing or unparseable value gives None.
    """
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > _MAX_RETRY_AFTER_LEN:
        return None
    if _DELAY_SECONDS.fullmatch(value):
        return min(MAX_RETRY_AFTER_S, float(value))
    try:
        when = parsedate_to_datetime(value)
        if when.tzinfo is None:
            # An HTTP-date is GMT by definition; naive means the zone was "-0000".
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    if not math.isfinite(seconds):
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))
