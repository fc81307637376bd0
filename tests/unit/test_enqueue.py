"""The contract's kwarg rules, at the helper and the CLI, under hostile input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.errors import InvalidWatchRequest
from worker.intake.enqueue import MAX_METADATA_BYTES, MAX_METADATA_NESTING, enqueue_watch, validate_watch_request
from worker.ops import cli
from worker.settings import load_settings

CLIENT = load_settings({"REDIS_URL": "redis://127.0.0.1:9/0"}, process="cli")
URL = "https://hooks.example.com/check365"


class RecordingApp:
    """Stands in for the Celery app: records what would have been sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any], str]] = []

    def send_task(self, name: str, kwargs: dict[str, Any], queue: str) -> Any:
        self.sent.append((name, kwargs, queue))
        return type("Result", (), {"id": "task-1"})()


def check(kwargs: object) -> Any:
    return validate_watch_request(kwargs, allow_http=False, allow_private=False)


def test_valid_request_is_sent_by_task_name_to_the_queue() -> None:
    app = RecordingApp()
    task_id = enqueue_watch("J-42", URL, {"order": 17}, settings=CLIENT, app=app)
    assert task_id == "task-1"
    assert app.sent == [
        ("check365.watch_bulk_job", {"job_id": "J-42", "callback_url": URL, "metadata": {"order": 17}}, "check365")
    ]


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


def test_nothing_is_sent_when_a_rule_is_broken() -> None:
    app = RecordingApp()
    with pytest.raises(InvalidWatchRequest):
        enqueue_watch("bad id", URL, settings=CLIENT, app=app)
    assert app.sent == []


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
