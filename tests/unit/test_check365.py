"""The Check365 bulk-status client: requests, classification rules, secrecy."""

from __future__ import annotations

import re
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import httpx
import orjson
import pytest

from tests.support.settings import make_settings as settings_for
from worker import __version__
from worker.errors import (
    Check365Misconfigured,
    Check365Rejected,
    Check365Throttled,
    Check365Unavailable,
    RetryableError,
)
from worker.local.simulator import Simulator
from worker.polling.check365 import (
    MAX_STATUS_CHARS,
    TERMINAL_FAILURE_STATUSES,
    USER_AGENT,
    Completed,
    Failed,
    Incomplete,
    PollOutcome,
    Running,
    classify_response,
    fetch_status,
    make_client,
)
from worker.retry_after import parse_retry_after
from worker.settings import Settings

API_KEY = "ck365_live_9fQ2xZrT7wLmB4vK"
JOB_ID = "J-42"
RESULT = {
    "email": "name@company.com",
    "emailProvider": "unknown",
    "emailType": "unknown",
    "status": "unvalidated",
    "safeToSend": False,
    "risk": "high",
    "isRole": False,
    "statusReason": "invalid_domain",
}

Handler = Callable[[httpx.Request], httpx.Response]


def make_settings(**env: str) -> Settings:
    return settings_for({"CHECK365_API_KEY": API_KEY, "CHECK365_BASE_URL": "https://api.test"}, **env)


_MISSING: Any = object()


def answer(data: Any = _MISSING, *, success: Any = True, message: Any = "Job status", **extra: Any) -> bytes:
    envelope: dict[str, Any] = {"success": success, "message": message, **extra}
    if data is not _MISSING:
        envelope["data"] = data
    return orjson.dumps(envelope)


def job(**fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "jobId": JOB_ID,
        "status": "completed",
        "creditsUsed": 2,
        "progress": 100,
        "total": 2,
        "results": [RESULT, {**RESULT, "email": "ceo@company.com"}],
    }
    data.update(fields)
    return {k: v for k, v in data.items() if v is not _MISSING}


def classify(body: bytes, status_code: int = 200, headers: dict[str, str] | None = None) -> PollOutcome:
    return classify_response(status_code, headers or {}, body, JOB_ID)


def fetch(handler: Handler, settings: Settings | None = None) -> PollOutcome:
    settings = settings or make_settings()
    with make_client(settings, transport=httpx.MockTransport(handler)) as client:
        return fetch_status(client, settings, JOB_ID)


def respond(body: bytes, status_code: int = 200, headers: dict[str, str] | None = None) -> Handler:
    return lambda request: httpx.Response(status_code, content=body, headers=headers)


# --- the request --------------------------------------------------------------------------


def test_request_carries_key_job_id_and_user_agent() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=answer(job()))

    fetch(handler)

    (request,) = seen
    assert request.method == "GET"
    assert request.url.scheme == "https"
    assert request.url.host == "api.test"
    assert request.url.path == "/api/validation/bulk-status"
    assert dict(request.url.params) == {"api_key": API_KEY, "job_id": JOB_ID}
    assert request.headers["user-agent"] == USER_AGENT == f"check365-worker/{__version__}"


def test_base_url_with_trailing_slash_hits_the_same_endpoint() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, content=answer(job()))

    fetch(handler, make_settings(CHECK365_BASE_URL="https://api.test/"))
    assert seen == ["/api/validation/bulk-status"]


def test_make_client_sets_explicit_timeouts() -> None:
    with make_client(make_settings(CHECK365_TIMEOUT_S="30")) as client:
        assert client.timeout == httpx.Timeout(connect=10, read=30, write=30, pool=30)
    with make_client(make_settings(CHECK365_TIMEOUT_S="0.5")) as client:
        assert client.timeout == httpx.Timeout(connect=0.5, read=0.5, write=0.5, pool=0.5)


def test_make_client_does_not_follow_redirects() -> None:
    calls: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url)
        return httpx.Response(302, headers={"location": "https://elsewhere.test/steal"})

    with pytest.raises(Check365Unavailable, match="redirect"):
        fetch(handler)
    assert [url.host for url in calls] == ["api.test"]
    with make_client(make_settings()) as client:
        assert client.follow_redirects is False
        assert client.headers["user-agent"] == USER_AGENT


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "ALL_PROXY", "http_proxy"])
def test_the_environment_s_proxy_never_sees_the_key(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    # A proxy (or NETRC, SSL_CERT_FILE) set for other programs must not carry the API key
    # elsewhere: nothing listens on this proxy's port, so a client that honours it cannot connect.
    monkeypatch.setenv(variable, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with Simulator(API_KEY) as sim:
        sim.add_job(JOB_ID, size=2, duration_s=0)
        settings = make_settings(CHECK365_BASE_URL=sim.url)
        with make_client(settings) as client:  # the client a process builds: no transport injected
            outcome = fetch_status(client, settings, JOB_ID)
        assert isinstance(outcome, Completed)
        assert [r.job_id for r in sim.requests()] == [JOB_ID]


# --- successful answers -----------------------------------------------------------------------


def test_completed_keeps_data_exactly_as_sent() -> None:
    data = job(unknownField={"nested": [1, 2]}, creditsUsed=12)
    outcome = fetch(respond(answer(data, message="Job has been completed")))
    assert outcome == Completed(data=data)
    assert isinstance(outcome, Completed)
    assert list(outcome.data) == list(data)


def test_documented_example_response_is_completed_when_counts_match() -> None:
    body = (
        b'{"success": true, "message": "Job has been completed", "data": {"jobId": "J-42",'
        b' "status": "completed", "creditsUsed": 12, "progress": 100, "total": 1, "results": ['
        b'{"email": "name@company.com", "emailProvider": "unknown", "emailType": "unknown",'
        b' "status": "unvalidated", "safeToSend": false, "risk": "high", "isRole": false,'
        b' "statusReason": "invalid_domain"}]}}'
    )
    outcome = classify(body)
    assert isinstance(outcome, Completed)
    assert outcome.data["results"] == [RESULT]
    assert outcome.data["creditsUsed"] == 12


@pytest.mark.parametrize("status", ["Completed", "COMPLETED", " completed "])
def test_completed_is_case_insensitive(status: str) -> None:
    data = job(status=status)
    assert classify(answer(data)) == Completed(data=data)


def test_completed_empty_job() -> None:
    data = job(total=0, results=[])
    assert classify(answer(data)) == Completed(data=data)


def test_completed_without_job_id_is_accepted() -> None:
    data = job(jobId=_MISSING)
    assert classify(answer(data)) == Completed(data=data)


def test_completed_with_results_shorter_than_total_is_incomplete() -> None:
    outcome = classify(answer(job(total=5, progress=99)))
    assert outcome == Incomplete(status="completed", progress=99.0, total=5, received=2)


def test_completed_with_results_longer_than_total_is_incomplete() -> None:
    outcome = classify(answer(job(total=1, progress="done")))
    assert outcome == Incomplete(status="completed", progress=None, total=1, received=2)


@pytest.mark.parametrize("status", ["queued", "validating", "Processing", "pending", "", "in_progress"])
def test_unknown_intermediate_statuses_are_running(status: str) -> None:
    outcome = classify(answer(job(status=status, progress=40, total=2, results=_MISSING)))
    assert outcome == Running(status=status, progress=40.0, total=2)


@pytest.mark.parametrize(
    ("progress", "expected"),
    [
        (50, 50.0),
        (42.5, 42.5),
        (0, 0.0),
        (100, 100.0),
        (-5, 0.0),
        (250, 100.0),
        ("50", None),
        (True, None),
        (False, None),
        (None, None),
        ([50], None),
        (_MISSING, None),
    ],
)
def test_running_progress(progress: Any, expected: float | None) -> None:
    outcome = classify(answer(job(status="processing", progress=progress)))
    assert isinstance(outcome, Running)
    assert outcome.progress == expected


@pytest.mark.parametrize(("total", "expected"), [(10, 10), (0, 0), ("10", None), (True, None), (-1, None), (2.0, None)])
def test_running_total_only_when_a_count(total: Any, expected: int | None) -> None:
    outcome = classify(answer(job(status="processing", total=total)))
    assert isinstance(outcome, Running)
    assert outcome.total == expected


@pytest.mark.parametrize("status", [*sorted(TERMINAL_FAILURE_STATUSES), "FAILED", "Cancelled", " error "])
def test_failure_like_statuses_are_failed(status: str) -> None:
    outcome = classify(answer(job(status=status, results=_MISSING), message="Job failed: bad file"))
    assert outcome == Failed(status=status, message="Job failed: bad file")


@pytest.mark.parametrize("message", [_MISSING, None, 42, ["x"]])
def test_failed_without_a_string_message_has_empty_message(message: Any) -> None:
    envelope = {"success": True, "data": job(status="failed")}
    if message is not _MISSING:
        envelope["message"] = message
    assert classify(orjson.dumps(envelope)) == Failed(status="failed", message="")


def test_failed_message_is_truncated() -> None:
    outcome = classify(answer(job(status="failed"), message="x" * 5000))
    assert outcome == Failed(status="failed", message="x" * 200)


def test_a_status_of_megabytes_is_cut() -> None:
    huge = "processing" + "x" * 5_000_000
    running = classify(answer(job(status=huge, results=[])))
    assert isinstance(running, Running)
    assert running.status == huge[:MAX_STATUS_CHARS]
    # Padded with blanks it still reads as completed, and the data passed on is cut too.
    completed = classify(answer(job(status="completed" + " " * 5_000_000)))
    assert isinstance(completed, Completed)
    assert len(completed.data["status"]) == MAX_STATUS_CHARS


def test_other_2xx_codes_are_classified_by_body() -> None:
    data = job()
    assert classify(answer(data), status_code=203) == Completed(data=data)


# --- malformed answers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(answer(job())[:-7], id="truncated"),
        pytest.param(b'  {"success": true, "da', id="cut-after-blanks"),
        pytest.param(answer(), id="data-missing"),
        pytest.param(answer(None), id="data-null"),
        pytest.param(answer([job()]), id="data-list"),
        pytest.param(answer(job(status=_MISSING)), id="status-missing"),
        pytest.param(answer(job(status=1)), id="status-int"),
        pytest.param(answer(job(status=None)), id="status-null"),
        pytest.param(answer(job(results=[RESULT, "name@company.com"])), id="result-not-object"),
        pytest.param(answer(job(results=[RESULT, None])), id="result-null"),
        pytest.param(answer(job(results={"0": RESULT})), id="results-object"),
        pytest.param(answer(job(results=_MISSING)), id="results-missing"),
        pytest.param(answer(job(total=_MISSING)), id="total-missing"),
        pytest.param(answer(job(total="2")), id="total-string"),
        pytest.param(answer(job(total=True, results=[RESULT])), id="total-bool"),
        pytest.param(answer(job(total=-1)), id="total-negative"),
        pytest.param(answer(job(total=2.0)), id="total-float"),
    ],
)
def test_malformed_answers_are_unavailable(body: bytes) -> None:
    with pytest.raises(Check365Unavailable, match="malformed answer") as caught:
        classify(body)
    assert not isinstance(caught.value, Check365Misconfigured)
    assert caught.value.retry_after is None


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"<html>502 Bad Gateway</html>", id="html"),
        pytest.param(b"<!doctype html><title>Acme</title>", id="a-website"),
        pytest.param(b"\xff\xfe\x00garbage", id="not-utf8"),
        pytest.param(b"[1, 2]", id="array"),
        pytest.param(b'"completed"', id="string"),
        pytest.param(b"null", id="null"),
        pytest.param(b"[" * 5000, id="deep-nesting"),
        pytest.param(orjson.dumps({"message": "ok", "data": job()}), id="success-missing"),
        pytest.param(orjson.dumps({"detail": "Not Found"}), id="another-api"),
        pytest.param(answer(job(), success="true"), id="success-string"),
        pytest.param(answer(job(), success=1), id="success-int"),
    ],
)
def test_a_2xx_that_is_not_check365s_json_is_misconfigured(body: bytes) -> None:
    with pytest.raises(Check365Misconfigured, match=r"not Check365's JSON.*CHECK365_BASE_URL"):
        classify(body)


@pytest.mark.parametrize("other", ["J-43", "", None, 42, "j-42"])
def test_answer_for_another_job_is_unavailable(other: Any) -> None:
    with pytest.raises(Check365Unavailable, match="another job"):
        classify(answer(job(jobId=other)))


# --- success: false ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("Job not found", "job_not_found"),
        ("The job does not exist", "job_not_found"),
        ("No such job: J-42", "job_not_found"),
        ("UNKNOWN JOB", "job_not_found"),
        ("Job not found for this API key", "job_not_found"),
        ("Invalid API key", "unauthorized"),
        ("API key not found", "unauthorized"),
        ("apikey missing", "unauthorized"),
        ("Unauthorized", "unauthorized"),
        ("unauthorised request", "unauthorized"),
        ("Forbidden", "unauthorized"),
        ("invalid key", "unauthorized"),
    ],
)
def test_success_false_with_permanent_message_is_rejected(message: str, reason: str) -> None:
    with pytest.raises(Check365Rejected) as caught:
        classify(answer(success=False, message=message))
    assert caught.value.reason == reason
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "message",
    ["Internal error, try again", "", None, 17, "Rate limit exceeded", "Resource does not exist", "Not found"],
)
def test_success_false_with_other_message_is_unavailable(message: Any) -> None:
    with pytest.raises(Check365Unavailable, match="success=false"):
        classify(answer(job(), success=False, message=message))


# --- HTTP status codes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status_code", "message", "reason"),
    [
        (401, "Invalid API key", "unauthorized"),
        (403, "Forbidden", "unauthorized"),
        (404, "Job not found", "job_not_found"),
        (404, "No such job", "job_not_found"),
        (400, "job_id is required", "bad_request"),
        (422, "Invalid job_id", "bad_request"),
        (405, "Method not allowed", "bad_request"),
        (409, "Conflict", "bad_request"),
        (418, "", "bad_request"),
        (499, "x", "bad_request"),
    ],
)
def test_check365s_own_refusals_are_rejected(status_code: int, message: str, reason: str) -> None:
    with pytest.raises(Check365Rejected) as caught:
        fetch(respond(answer(success=False, message=message), status_code))
    assert caught.value.reason == reason
    assert str(status_code) in str(caught.value)


NGINX_404 = b"<html><head><title>404 Not Found</title></head><body><h1>404 Not Found</h1></body></html>"


@pytest.mark.parametrize(
    ("status_code", "body"),
    [
        # A CHECK365_BASE_URL one path segment off: the web server's page for every request.
        pytest.param(404, NGINX_404, id="404-html"),
        pytest.param(404, b"", id="404-empty"),
        pytest.param(404, orjson.dumps({"detail": "Not Found"}), id="404-another-api"),
        pytest.param(404, answer(job()), id="404-success-true"),
        # Check365's envelope, but a missing route rather than an unknown job.
        pytest.param(404, answer(success=False, message="Not found"), id="404-route"),
        pytest.param(404, answer(success=False, message=None), id="404-no-message"),
        # A proxy or gateway in front that wants its own credentials.
        pytest.param(401, b"<html><h1>401 Authorization Required</h1></html>", id="401-html"),
        pytest.param(401, b"", id="401-empty"),
        pytest.param(403, b"Forbidden", id="403-text"),
        pytest.param(403, orjson.dumps({"error": "access denied"}), id="403-another-api"),
        pytest.param(405, NGINX_404, id="405-html"),
        pytest.param(400, b"<html>400 Bad Request</html>", id="400-html"),
    ],
)
def test_client_errors_that_are_not_check365s_answer_are_misconfigured(status_code: int, body: bytes) -> None:
    with pytest.raises(Check365Misconfigured, match="CHECK365_BASE_URL") as caught:
        fetch(respond(body, status_code))
    assert str(status_code) in str(caught.value)
    assert not isinstance(caught.value, Check365Rejected)


def test_client_error_quotes_check365_message() -> None:
    body = answer(success=False, message="Invalid API key")
    with pytest.raises(Check365Rejected, match="HTTP 401: Invalid API key"):
        classify(body, status_code=401)


@pytest.mark.parametrize("status_code", [408, 425, 500, 502, 503, 504, 599])
def test_server_errors_are_unavailable(status_code: int) -> None:
    with pytest.raises(Check365Unavailable, match=str(status_code)) as caught:
        fetch(respond(b"oops", status_code))
    assert caught.value.retry_after is None


@pytest.mark.parametrize("status_code", [300, 301, 302, 303, 304, 307, 308])
def test_redirects_are_misconfigured(status_code: int) -> None:
    with pytest.raises(Check365Misconfigured, match="unexpected redirect"):
        classify(answer(job()), status_code=status_code, headers={"location": "https://x.test/"})


@pytest.mark.parametrize("status_code", [0, 100, 199, 600, 999])
def test_nonsense_status_codes_are_unavailable(status_code: int) -> None:
    with pytest.raises(Check365Unavailable, match="unexpected status"):
        classify(answer(job()), status_code=status_code)


def test_429_is_throttled_with_retry_after_seconds() -> None:
    with pytest.raises(Check365Throttled) as caught:
        fetch(respond(b"slow down", 429, {"Retry-After": "120"}))
    assert caught.value.retry_after == 120.0


def test_429_without_retry_after() -> None:
    with pytest.raises(Check365Throttled) as caught:
        classify(b"", status_code=429)
    assert caught.value.retry_after is None


def test_503_with_retry_after_http_date() -> None:
    # A far-future date is clamped, which keeps the test free of clock arithmetic.
    when = format_datetime(datetime(2999, 1, 1, tzinfo=UTC), usegmt=True)
    with pytest.raises(Check365Unavailable) as caught:
        fetch(respond(b"", 503, {"Retry-After": when}))
    assert caught.value.retry_after == 3600.0


def test_retry_after_header_name_is_case_insensitive() -> None:
    with pytest.raises(Check365Throttled) as caught:
        classify(b"", status_code=429, headers={"RETRY-AFTER": "7"})
    assert caught.value.retry_after == 7.0


def test_retry_after_is_ignored_on_rejections() -> None:
    with pytest.raises(Check365Rejected) as caught:
        classify(answer(success=False, message="Invalid API key"), status_code=401, headers={"Retry-After": "7"})
    assert not isinstance(caught.value, RetryableError)


# --- parse_retry_after ----------------------------------------------------------------------

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("3600", 3600.0),
        ("99999999", 3600.0),
        ("9" * 90, 3600.0),
        ("Thu, 26 Nov 2026 12:00:30 GMT", 30.0),
        ("Thu, 26 Nov 2026 12:00:30 -0000", 30.0),
        ("Thu, 26 Nov 2026 13:00:30 +0100", 30.0),
        ("Thu, 26 Nov 2026 11:00:00 GMT", 0.0),
        ("Fri, 27 Nov 2026 12:00:00 GMT", 3600.0),
        (None, None),
        ("", None),
        ("   ", None),
        ("soon", None),
        ("-5", None),
        ("1e3", None),
        ("inf", None),
        ("nan", None),
        ("12 seconds", None),
        ("Thu, 99 Nov 2026 12:00:30 GMT", None),
        ("9" * 500, None),
        ("\u0663\u0660", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


# --- transport failures -----------------------------------------------------------------------


def _raising(exc_type: type[httpx.RequestError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        # httpx puts the URL, key included, into its own messages: mimic that.
        raise exc_type(f"failed: {request.url}", request=request)

    return handler


@pytest.mark.parametrize(
    "exc_type",
    [
        httpx.ConnectError,
        httpx.ConnectTimeout,
        httpx.ReadTimeout,
        httpx.WriteTimeout,
        httpx.PoolTimeout,
        httpx.ReadError,
        httpx.RemoteProtocolError,
        httpx.ProxyError,
        httpx.DecodingError,
    ],
)
def test_transport_failures_are_unavailable(exc_type: type[httpx.RequestError]) -> None:
    with pytest.raises(Check365Unavailable) as caught:
        fetch(_raising(exc_type))
    assert exc_type.__name__ in str(caught.value)
    assert caught.value.retry_after is None


# --- secrecy ----------------------------------------------------------------------------------


def _error_paths() -> list[Any]:
    echo = f"bad key {API_KEY} for https://api.test/?api_key={API_KEY}"
    return [
        pytest.param(_raising(httpx.ReadTimeout), id="timeout"),
        pytest.param(_raising(httpx.ConnectError), id="connection-refused"),
        pytest.param(_raising(httpx.RemoteProtocolError), id="dropped"),
        pytest.param(respond(answer(success=False, message=echo), 500), id="500"),
        pytest.param(respond(answer(success=False, message=echo), 401), id="401"),
        pytest.param(respond(answer(success=False, message=echo), 404), id="404"),
        pytest.param(respond(answer(success=False, message=echo), 429), id="429"),
        pytest.param(respond(answer(success=False, message=echo)), id="success-false-key"),
        pytest.param(respond(answer(success=False, message="oops " + echo)), id="success-false"),
        pytest.param(respond(orjson.dumps({"success": True, "echo": echo})[:-3]), id="malformed"),
        pytest.param(respond(answer(message=echo)), id="data-missing"),
        pytest.param(respond(b"", 302, {"location": f"https://x.test/?api_key={API_KEY}"}), id="302"),
    ]


@pytest.mark.parametrize("handler", _error_paths())
def test_errors_never_reveal_the_api_key(handler: Handler) -> None:
    with pytest.raises((Check365Unavailable, Check365Rejected, Check365Throttled)) as caught:
        fetch(handler)
    exc = caught.value
    rendered = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    assert all(API_KEY not in text for text in rendered)
    assert all("/api/validation/bulk-status" not in text for text in rendered)
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__


def test_error_messages_bound_the_quoted_check365_message() -> None:
    with pytest.raises(Check365Unavailable) as caught:
        fetch(respond(answer(success=False, message="x" * 100_000)))
    assert "x" * 200 in str(caught.value)
    assert "x" * 201 not in str(caught.value)


def test_key_is_redacted_before_truncation() -> None:
    # Truncating first would keep the key's first characters at the cut.
    message = "x" * 190 + API_KEY
    with pytest.raises(Check365Unavailable) as caught:
        fetch(respond(answer(success=False, message=message)))
    assert API_KEY[:8] not in str(caught.value)


def test_failed_message_redacts_the_api_key() -> None:
    outcome = fetch(respond(answer(job(status="failed"), message=f"key {API_KEY} is over quota")))
    assert outcome == Failed(status="failed", message="key [redacted] is over quota")


# A key with characters that URLs escape: it leaves in a query string as %2F, %2B, %3D.
ODD_KEY = "ck365/live+9fQ2xZrT7wLmB4vK=="


def quoting_what_it_received(status_code: int, template: str) -> Handler:
    """A server whose message quotes what it received: the key, or the whole query string."""

    def handler(request: httpx.Request) -> httpx.Response:
        query = request.url.query.decode()
        sent = query.split("api_key=", 1)[1].split("&", 1)[0]
        lower = re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), sent)
        message = template.format(query=query, key=sent, lower=lower)
        return httpx.Response(status_code, content=answer(success=False, message=message))

    return handler


@pytest.mark.parametrize(
    "template",
    ["Unknown key '{key}'", "upstream failed for /api/validation/bulk-status?{query}", "bad key {lower}"],
    ids=["encoded-key", "whole-query", "lower-case-escapes"],
)
@pytest.mark.parametrize("status_code", [401, 503])
def test_a_key_quoted_back_as_it_travelled_is_redacted(template: str, status_code: int) -> None:
    settings = make_settings(CHECK365_API_KEY=ODD_KEY)
    with pytest.raises((Check365Rejected, Check365Unavailable)) as caught:
        fetch(quoting_what_it_received(status_code, template), settings)
    text = str(caught.value)
    assert "[redacted]" in text
    assert "9fq2xzrt7wlmb4vk" not in text.lower()


def test_a_failed_jobs_message_quoting_the_encoded_key_is_redacted() -> None:
    settings = make_settings(CHECK365_API_KEY=ODD_KEY)
    encoded = "ck365%2Flive%2B9fQ2xZrT7wLmB4vK%3D%3D"
    outcome = fetch(respond(answer(job(status="failed"), message=f"key {encoded} is over quota")), settings)
    assert outcome == Failed(status="failed", message="key [redacted] is over quota")


def trickling(first: bytes, rest: bytes, pause_s: float, status_code: int = 200) -> Handler:
    """An answer whose second chunk comes ``pause_s`` after its first."""

    def chunks() -> Iterator[bytes]:
        yield first
        time.sleep(pause_s)
        yield rest

    return lambda request: httpx.Response(status_code, content=chunks())


def test_an_answer_trickling_in_past_its_budget_is_given_up() -> None:
    # Each chunk comes well inside the read timeout; the whole answer does not come
    # inside twice CHECK365_TIMEOUT_S, the budget that keeps a poll within its lease.
    body = answer(job())
    settings = make_settings(CHECK365_TIMEOUT_S="0.1")
    with pytest.raises(Check365Unavailable, match=r"took longer than 0\.2 s"):
        fetch(trickling(body[:10], body[10:], pause_s=0.3), settings)


def test_an_answer_slower_than_one_read_but_inside_its_budget_is_taken() -> None:
    body = answer(job())
    outcome = fetch(trickling(body[:10], body[10:], pause_s=0.05), make_settings(CHECK365_TIMEOUT_S="0.1"))
    assert isinstance(outcome, Completed)


def test_an_endless_error_answer_is_read_only_as_far_as_its_message() -> None:
    prefix = b'{"success": false, "message": "overloaded", "pad": "'

    def endless() -> Iterator[bytes]:
        yield prefix
        while True:
            yield b"x" * 65536

    with pytest.raises(Check365Unavailable, match="HTTP 503"):
        fetch(lambda request: httpx.Response(503, content=endless()))


def test_classify_response_redacts_what_it_is_told() -> None:
    body = answer(success=False, message="token s3cr3t refused")
    with pytest.raises(Check365Unavailable) as caught:
        classify_response(200, {}, body, JOB_ID, redact=["s3cr3t", ""])
    assert "s3cr3t" not in str(caught.value)
