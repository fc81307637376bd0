"""The contract's kwarg rules (check365_client.rules, shared by the client and the worker), under hostile input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from check365_client import Check365Client
from check365_client.rules import MAX_METADATA_BYTES, MAX_METADATA_NESTING, validate_watch_request
from worker import errors
from worker.errors import InvalidWatchRequest
from worker.local.redisserver import free_port
from worker.ops import cli

URL = "https://hooks.example.com/check365"


def check(kwargs: object) -> Any:
    return validate_watch_request(kwargs, allow_http=False, allow_private=False)


def test_the_worker_and_the_client_raise_one_class() -> None:
    import check365_client

    assert errors.InvalidWatchRequest is check365_client.InvalidWatchRequest
    # Refused at delivery, a URL is a permanent failure of the worker's tree; at enqueue, the client's error.
    assert issubclass(errors.UnsafeCallbackURL, check365_client.UnsafeCallbackURL)
    assert issubclass(errors.UnsafeCallbackURL, errors.PermanentError)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"callback_url": URL}, "job_id"),
        ({"job_id": "J"}, "callback_url"),
        ({"job_id": "has space", "callback_url": URL}, "job_id"),
        ({"job_id": "x" * 129, "callback_url": URL}, "job_id"),
        ({"job_id": "", "callback_url": URL}, "job_id"),
        ({"job_id": 42, "callback_url": URL}, "job_id"),
        ({"job_id": "J", "callback_url": "http://hooks.example.com/"}, "callback_url"),
        ({"job_id": "J", "callback_url": "ftp://x/"}, "callback_url"),
        ({"job_id": "J", "callback_url": "https://127.0.0.1/"}, "callback_url"),
        ({"job_id": "J", "callback_url": "/relative"}, "callback_url"),
        ({"job_id": "J", "callback_url": URL, "metadata": [1]}, "metadata"),
        ({"job_id": "J", "callback_url": URL, "metadata": "{}"}, "metadata"),
        ({"job_id": "J", "callback_url": URL, "metadata": {"a": float("nan")}}, "metadata"),
        ({"job_id": "J", "callback_url": URL, "metadata": {"a": "x" * MAX_METADATA_BYTES}}, "metadata"),
        ({"job_id": "J", "callback_url": URL, "metadata": {"a": object()}}, "metadata"),
        ({"job_id": "J", "callback_url": URL, "metadata": {1: "int key"}}, "metadata"),
        ({"job_id": "J", "callback_url": URL, "extra": 1}, "kwargs"),
        ({"job_id": "J", "callback_url": URL, "watch_id": "w"}, "kwargs"),
        ([("job_id", "J")], "kwargs"),
    ],
)
def test_each_rule_names_its_field(kwargs: object, field: str) -> None:
    with pytest.raises(InvalidWatchRequest) as caught:
        check(kwargs)
    assert caught.value.field == field


def test_the_rules_run_before_the_broker_is_touched() -> None:
    # No broker listens there: a rule's error, not BrokerUnavailable, means nothing was tried.
    client = Check365Client(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(InvalidWatchRequest):
        client.enqueue_watch("bad id", URL)


def test_integers_past_64_bits_are_refused_and_64_bit_ones_pass() -> None:
    for value in (2**64 - 1, -(2**63), True):
        assert check({"job_id": "J", "callback_url": URL, "metadata": {"n": [value]}}).metadata == {"n": [value]}
    for value in (2**64, -(2**63) - 1):
        with pytest.raises(InvalidWatchRequest, match="64 bits"):
            check({"job_id": "J", "callback_url": URL, "metadata": {"n": {"m": value}}})


def nested(levels: int) -> dict[str, object]:
    value: dict[str, object] = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"n": value}
    return value


def test_metadata_nested_as_deep_as_the_worker_accepts_passes_and_deeper_is_refused_by_name() -> None:
    assert check({"job_id": "J", "callback_url": URL, "metadata": nested(MAX_METADATA_NESTING)}).metadata
    for levels in (MAX_METADATA_NESTING + 2, 300):  # orjson gives up past 255 levels: not an integer problem
        with pytest.raises(InvalidWatchRequest, match="nested at most") as caught:
            check({"job_id": "J", "callback_url": URL, "metadata": nested(levels)})
        assert caught.value.field == "metadata"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinity_are_named(value: float) -> None:
    with pytest.raises(InvalidWatchRequest, match="must not contain NaN or Infinity") as caught:
        check({"job_id": "J", "callback_url": URL, "metadata": {"a": {"b": [1, value]}}})
    assert caught.value.field == "metadata"
    assert "ValueError" not in str(caught.value)


def test_oversized_metadata_states_its_size() -> None:
    metadata = {"a": "x" * 5000}
    size = len(json.dumps(metadata, separators=(",", ":")))
    with pytest.raises(InvalidWatchRequest) as caught:
        check({"job_id": "J", "callback_url": URL, "metadata": metadata})
    assert str(caught.value) == f"metadata: must serialize to at most 4,096 bytes; this one is {size:,} bytes"


def test_metadata_just_under_the_limit_passes_unchanged() -> None:
    metadata = {"a": "é" * ((MAX_METADATA_BYTES - 10) // 2)}
    assert len(json.dumps(metadata, ensure_ascii=False).encode()) <= MAX_METADATA_BYTES
    assert check({"job_id": "J", "callback_url": URL, "metadata": metadata}).metadata == metadata


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
anything = json_values | st.binary(max_size=50) | st.text(max_size=3000)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["job_id", "callback_url", "metadata", "watch_id", "token", "other"]) | st.text(max_size=20),
        anything,
        max_size=6,
    )
    | anything
)
def test_arbitrary_kwargs_are_accepted_or_rejected_with_a_reason(kwargs: object) -> None:
    try:
        request = check(kwargs)
    except InvalidWatchRequest as exc:
        assert exc.field
        assert exc.rule
        return
    assert isinstance(kwargs, dict)
    assert request.job_id == kwargs["job_id"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(job_id=st.text(max_size=200), url=st.text(max_size=300), metadata=st.none() | st.text(max_size=5000))
def test_cli_enqueue_rejects_garbage_with_a_message_and_sends_nothing(
    job_id: str, url: str, metadata: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    # The "=" form: a value starting with "-" must not be read as another option.
    options = [] if metadata is None else [f"--metadata={metadata}"]
    argv = ["enqueue", *options, "--", job_id, url]
    try:
        validate_watch_request(
            {"job_id": job_id, "callback_url": url, "metadata": json.loads(metadata) if metadata else None},
            allow_http=False,
            allow_private=False,
        )
    except (InvalidWatchRequest, ValueError):
        pass
    else:
        return  # valid input would really enqueue: covered by the integration tests
    # Validation runs before any broker connection: exit code 2 with a message
    # means the command stopped at the rules, before anything could be sent.
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("check365-worker: invalid request: ")
