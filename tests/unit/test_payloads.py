"""The published schemas accept every body the worker builds, and reject broken ones.

Each broken body is a valid one with exactly one thing changed, so a rejection can
only come from that change.
"""

from __future__ import annotations

import base64
import copy
import json
import time
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
from standardwebhooks.webhooks import Webhook

from worker.delivery.events import COMPLETED, FAILED, TIMED_OUT, completed_events, failed_event, timed_out_event
from worker.delivery.payloads import EVENT_TYPES, load_schema, validate_event
from worker.delivery.signing import webhook_headers
from worker.local.simulator import generate_results

NOW = 1_795_000_000.0  # a fixed instant, so that failures are reproducible


def check365_data(job_id: str, size: int) -> dict[str, Any]:
    """A completed bulk-status ``data`` object shaped like the API reference's example."""
    return {
        "jobId": job_id,
        "status": "completed",
        "creditsUsed": size,
        "progress": 100,
        "total": size,
        "results": generate_results(job_id, size),
    }


def single_part() -> bytes:
    (event,) = completed_events("w_1", "J-1", check365_data("J-1", 3), {"order": 17}, per_part=1000, now=NOW)
    return event.body


def failed() -> bytes:
    return failed_event("w_2", "J-2", "job_not_found", "Check365 answered HTTP 404", None, now=NOW).body


def timed_out() -> bytes:
    return timed_out_event("w_3", "J-3", "processing", 42.5, {"order": 18}, now=NOW).body


def body_of(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def test_every_schema_is_a_valid_draft_2020_12_schema() -> None:
    for event_type in EVENT_TYPES:
        schema = load_schema(event_type)
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["properties"]["type"] == {"const": event_type}


def test_load_schema_refuses_an_unknown_type() -> None:
    with pytest.raises(ValueError, match="unknown event type"):
        load_schema("bulk_validation.started")


@pytest.mark.parametrize("metadata", [None, {"order": 17, "tags": ["a"]}])
def test_completed_events_validate_single_and_multi_part(metadata: dict[str, Any] | None) -> None:
    data = check365_data("J-multi", 5)
    events = completed_events("w_4", "J-multi", data, metadata, per_part=2, now=NOW)
    assert [e.part_count for e in events] == [3, 3, 3]
    for event in events:
        validate_event(event.body)
    (whole,) = completed_events("w_5", "J-multi", data, metadata, per_part=1000, now=NOW)
    validate_event(whole.body)


def test_a_completed_job_without_results_validates() -> None:
    (event,) = completed_events("w_6", "J-empty", check365_data("J-empty", 0), None, per_part=10, now=NOW)
    validate_event(event.body)


def test_check365_fields_pass_through_and_are_allowed() -> None:
    data = check365_data("J-extra", 2)
    data["batchName"] = "march"
    data["results"][0]["mxRecord"] = "mx.example.com"
    (event,) = completed_events("w_7", "J-extra", data, None, per_part=10, now=NOW)
    validate_event(event.body)


def test_a_completed_answer_without_job_id_gets_the_watched_one() -> None:
    data = check365_data("J-anon", 1)
    del data["jobId"]
    (event,) = completed_events("w_8", "J-anon", data, None, per_part=10, now=NOW)
    validate_event(event.body)
    assert json.loads(event.body)["data"]["jobId"] == "J-anon"


@pytest.mark.parametrize("reason", ["job_failed", "job_not_found", "unauthorized", "bad_request"])
def test_failed_events_validate(reason: str) -> None:
    validate_event(failed_event("w_8", "J.8:a-b_c", reason, "detail", {"k": 1}, now=NOW).body)


@pytest.mark.parametrize(("status", "progress"), [("processing", 42.5), (None, None), ("queued", 0)])
def test_timed_out_events_validate(status: str | None, progress: float | None) -> None:
    validate_event(timed_out_event("w_9", "J-9", status, progress, None, now=NOW).body)


def _drop(path: tuple[str, ...]) -> Callable[[dict[str, Any]], None]:
    def change(event: dict[str, Any]) -> None:
        target = event
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return change


def _set(path: tuple[str | int, ...], value: object) -> Callable[[dict[str, Any]], None]:
    def change(event: dict[str, Any]) -> None:
        target: Any = event
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


BROKEN: list[tuple[str, Callable[[], bytes], Callable[[dict[str, Any]], None]]] = [
    ("completed without jobId", single_part, _drop(("data", "jobId"))),
    ("failed without jobId", failed, _drop(("data", "jobId"))),
    ("timed_out without jobId", timed_out, _drop(("data", "jobId"))),
    ("completed body labelled failed", single_part, _set(("type",), FAILED)),
    ("failed body labelled timed_out", failed, _set(("type",), TIMED_OUT)),
    ("unknown type", failed, _set(("type",), "bulk_validation.started")),
    ("part.index 0", single_part, _set(("data", "part", "index"), 0)),
    ("part.count 0", single_part, _set(("data", "part", "count"), 0)),
    ("part without count", single_part, _drop(("data", "part", "count"))),
    ("no part", single_part, _drop(("data", "part"))),
    ("results not an array", single_part, _set(("data", "results"), {"email": "a@b.c"})),
    ("result safeToSend as a string", single_part, _set(("data", "results", 0, "safeToSend"), "false")),
    ("result without statusReason", single_part, _drop(("data", "results", 0, "statusReason"))),
    ("negative total", single_part, _set(("data", "total"), -1)),
    ("metadata a list", single_part, _set(("data", "metadata"), [1])),
    ("no metadata key", failed, _drop(("data", "metadata"))),
    ("timestamp with an offset", failed, _set(("timestamp",), "2026-11-26T12:00:00+00:00")),
    ("timestamp as a number", failed, _set(("timestamp",), NOW)),
    ("timed_out with another reason", timed_out, _set(("data", "reason"), "job_failed")),
    ("timed_out progress above 100", timed_out, _set(("data", "progress"), 101)),
    ("failed reason not machine-readable", failed, _set(("data", "reason"), "Job Failed")),
    ("jobId outside the enqueue rule", failed, _set(("data", "jobId"), "J 42")),
    ("an unknown top-level field", timed_out, _set(("extra",), 1)),
    ("no data", failed, _drop(("data",))),
]


@pytest.mark.parametrize(("build", "change"), [(b, c) for _, b, c in BROKEN], ids=[n for n, _, _ in BROKEN])
def test_broken_events_are_rejected(build: Callable[[], bytes], change: Callable[[dict[str, Any]], None]) -> None:
    valid = json.loads(build())
    validate_event(body_of(valid))  # the starting point is valid, so only the change can fail it
    broken = copy.deepcopy(valid)
    change(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate_event(body_of(broken))


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]", b'"bulk_validation.failed"'])
def test_bodies_that_are_not_event_objects_are_rejected(body: bytes) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate_event(body)


def test_the_object_a_standard_webhooks_library_returns_validates_too() -> None:
    secret = "whsec_" + base64.b64encode(bytes(range(32))).decode()
    (event,) = completed_events("w_10", "J-10", check365_data("J-10", 2), {"k": 1}, per_part=10, now=NOW)
    headers = webhook_headers([secret], event.webhook_id, int(time.time()), event.body, "check365-worker/test")
    verified = Webhook(secret).verify(event.body, headers)
    assert isinstance(verified, dict)
    validate_event(verified)
    validate_event(event.body.decode())
    del verified["data"]["part"]
    with pytest.raises(jsonschema.ValidationError, match="part"):
        validate_event(verified)
    with pytest.raises(TypeError, match="raw body or its parsed object"):
        validate_event(42)  # type: ignore[arg-type]


def test_the_completed_schema_documents_the_eight_result_fields() -> None:
    result = load_schema(COMPLETED)["$defs"]["result"]
    types = {name: spec["type"] for name, spec in result["properties"].items()}
    assert types == {
        "email": "string",
        "emailProvider": "string",
        "emailType": "string",
        "status": "string",
        "safeToSend": "boolean",
        "risk": "string",
        "isRole": "boolean",
        "statusReason": "string",
    }
    assert sorted(result["required"]) == sorted(types)
