"""Hostile answers: whatever Check365 (or a proxy in front of it) sends, the
classifier returns an outcome or raises one of its three documented errors."""

from __future__ import annotations

from datetime import datetime, timedelta
from email.utils import format_datetime
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.errors import Check365Rejected, Check365Throttled, Check365Unavailable
from worker.polling.check365 import (
    TERMINAL_FAILURE_STATUSES,
    Completed,
    Failed,
    Incomplete,
    PollOutcome,
    Running,
    classify_response,
)
from worker.retry_after import parse_retry_after

JOB_ID = "J-42"
SECRET = "ck365_live_9fQ2xZrT7wLmB4vK"
DOCUMENTED_ERRORS = (Check365Unavailable, Check365Throttled, Check365Rejected)

# Generous enough never to trip on a loaded machine, tight enough to catch a
# super-linear blow-up on hostile input.
hostile = settings(max_examples=150, deadline=timedelta(seconds=2), suppress_health_check=[HealthCheck.too_slow])

json_scalars = (
    st.none()
    | st.booleans()
    # orjson serialises integers within 64 bits only.
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25,
)
statuses = st.sampled_from(["completed", "Completed", "queued", "processing", *TERMINAL_FAILURE_STATUSES])
results = st.lists(st.dictionaries(st.text(max_size=8), json_scalars, max_size=4), max_size=6)
data_objects = st.fixed_dictionaries(
    {},
    optional={
        "jobId": st.just(JOB_ID) | json_values,
        "status": statuses | st.text() | json_values,
        "progress": st.integers(-1000, 1000) | st.floats(allow_nan=False, allow_infinity=False) | json_values,
        "total": st.integers(-2, 8) | json_values,
        "results": results | json_values,
        "creditsUsed": json_values,
    },
)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "success": st.booleans() | json_values,
        "message": st.text() | json_values,
        "data": data_objects | json_values,
    },
)


@st.composite
def plausible_envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly well-formed answers with one or two fields made hostile, so that
    every outcome, not only the errors, is reached."""
    rows = draw(results)
    data: dict[str, Any] = {
        "jobId": JOB_ID,
        "status": draw(statuses),
        "progress": draw(st.integers(-50, 150) | st.floats(allow_nan=False) | json_scalars),
        "total": draw(st.just(len(rows)) | st.integers(-1, 8)),
        "results": rows,
    }
    for key in draw(st.lists(st.sampled_from([*data, "extra"]), max_size=2)):
        if draw(st.booleans()):
            data.pop(key, None)
        else:
            data[key] = draw(json_values)
    return {"success": True, "message": draw(st.text() | json_scalars), "data": data}


status_codes = st.integers(min_value=0, max_value=999) | st.sampled_from([200, 401, 404, 429, 500, 503])
headers = st.dictionaries(st.sampled_from(["Retry-After", "retry-after", "X-Other"]), st.text(max_size=60))


def check(status_code: int, hdrs: dict[str, str], body: bytes) -> PollOutcome | None:
    """Classify and check the outcome's invariants; None when a documented error was raised."""
    try:
        outcome = classify_response(status_code, hdrs, body, JOB_ID, redact=[SECRET])
    except DOCUMENTED_ERRORS as exc:
        assert isinstance(str(exc), str)
        retry_after = getattr(exc, "retry_after", None)
        assert retry_after is None or 0.0 <= retry_after <= 3600.0
        return None
    assert 200 <= status_code < 300
    match outcome:
        case Completed(data=data):
            assert isinstance(data["results"], list)
            assert all(isinstance(r, dict) for r in data["results"])
            assert len(data["results"]) == data["total"]
            assert data.get("jobId", JOB_ID) == JOB_ID
        case Incomplete(progress=progress, total=total, received=received):
            assert total != received
            assert progress is None or 0.0 <= progress <= 100.0
        case Running(progress=progress, total=total):
            assert progress is None or 0.0 <= progress <= 100.0
            assert total is None or (isinstance(total, int) and total >= 0)
        case Failed(status=status, message=message):
            assert status.strip().lower() in TERMINAL_FAILURE_STATUSES
            assert len(message) <= 200
    return outcome


@hostile
@given(status_codes, headers, st.binary(max_size=2000))
def test_arbitrary_bytes(status_code: int, hdrs: dict[str, str], body: bytes) -> None:
    check(status_code, hdrs, body)


@hostile
@given(status_codes, headers, json_values)
def test_arbitrary_json_values(status_code: int, hdrs: dict[str, str], value: Any) -> None:
    check(status_code, hdrs, orjson.dumps(value))


@hostile
@given(st.sampled_from([200, 200, 200, 201, 400, 404, 500]), envelopes | plausible_envelopes())
def test_envelopes_with_hostile_fields(status_code: int, envelope: dict[str, Any]) -> None:
    check(status_code, {}, orjson.dumps(envelope))


@hostile
@given(envelopes, st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_truncated_json(envelope: dict[str, Any], fraction: float) -> None:
    body = orjson.dumps(envelope)
    assert check(200, {}, body[: int(len(body) * fraction)]) is None


@hostile
@given(
    st.integers(min_value=0, max_value=2_000_000),
    st.sampled_from(["message", "status", "jobId", "progress"]),
    st.sampled_from([200, 401, 429, 503]),
)
def test_huge_strings(size: int, field: str, status_code: int) -> None:
    huge = "x" * size
    envelope: dict[str, Any] = {"success": True, "message": "m", "data": {"status": "processing"}}
    if field == "message":
        envelope["message"] = huge
    else:
        envelope["data"][field] = huge
    check(status_code, {"Retry-After": huge}, orjson.dumps(envelope))


@hostile
@given(st.text(), st.text(), st.booleans(), st.sampled_from([200, 401, 404, 500]))
def test_echoed_secret_never_escapes(prefix: str, suffix: str, success: bool, status_code: int) -> None:
    data = {"jobId": JOB_ID, "status": "failed"}
    body = orjson.dumps({"success": success, "message": prefix + SECRET + suffix, "data": data})
    try:
        outcome = classify_response(status_code, {}, body, JOB_ID, redact=[SECRET])
    except DOCUMENTED_ERRORS as exc:
        assert SECRET not in str(exc)
        assert SECRET not in repr(exc)
    else:
        assert isinstance(outcome, Failed)
        assert SECRET not in outcome.message


def test_deep_nesting_is_malformed_not_a_crash() -> None:
    for body in (b"[" * 100_000, b'{"a":' * 100_000, b"[" * 100_000 + b"]" * 100_000):
        assert check(200, {}, body) is None


def test_hundred_thousand_results_complete() -> None:
    rows = [{"email": f"user{i}@company.com", "status": "valid"} for i in range(100_000)]
    body = orjson.dumps(
        {"success": True, "data": {"jobId": JOB_ID, "status": "completed", "total": 100_000, "results": rows}}
    )
    outcome = check(200, {}, body)
    assert isinstance(outcome, Completed)
    assert outcome.data["results"] == rows


@hostile
@given(
    st.one_of(st.none(), st.text(), st.from_regex(r"\s*[0-9]{1,12}(\.[0-9]{1,6})?\s*", fullmatch=True)),
    st.floats(min_value=-1e12, max_value=1e12, allow_nan=False),
)
def test_parse_retry_after_is_total(value: str | None, now: float) -> None:
    result = parse_retry_after(value, now)
    assert result is None or 0.0 <= result <= 3600.0


@hostile
@given(st.datetimes(timezones=st.timezones()), st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_parse_retry_after_http_dates(when: datetime, now: float) -> None:
    result = parse_retry_after(format_datetime(when), now)
    assert result is None or 0.0 <= result <= 3600.0
