"""Hostile broker messages, sent straight to a real worker: none crashes it, none loops.

A foreign producer can put anything on the queue: kwargs of the wrong types, huge or odd
unicode strings, missing and unknown fields, positional arguments, wrong arguments for
the delivery task, bodies that are not JSON or not Celery's [args, kwargs, options]
triple, content types the worker refuses, headers of the wrong type. Hypothesis generates
such messages and publishes each with kombu, as any producer could. For every one:

- the worker stays up (the same process: a crash would show as a new pid or none);
- it logs ``watch_rejected`` or ``delivery_rejected`` with a reason, or runs the task to
  a normal return (a message of the right shape whose ids match nothing is just stale);
- it is gone from the broker afterwards: nothing is re-queued, nothing left reserved;
- no task raised and nothing stopped the consumer.

A probe (a delivery message for an unknown event) follows each message; the worker has
one process and takes one message at a time, so once the probe has run, the message
before it has been dealt with. Tests in tests/unit/ cover the enqueue helper, the CLI and
the Check365 client against hostile input; these cover the worker's own boundary.
"""

from __future__ import annotations

import json
import pickle
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kombu import Connection, Producer

from check365_client.rules import validate_watch_request
from tests.reliability.scenario import Row, check_completed_deliveries, wait_settled
from tests.support.cluster import Cluster, WorkerProcess, wait_until
from worker.errors import InvalidWatchRequest
from worker.runtime.celeryconfig import DELIVER_TASK, SWEEP_TASK, WATCH_TASK

QUEUE = "hostile"
TIMEOUT = 20.0
REJECTED = ("watch_rejected", "delivery_rejected")
# Log lines that mean something broke: a task raised, the consumer stopped, a timer failed,
# or the consumer's last-resort guard caught what the checks should have.
BROKEN = (
    "raised unexpected",
    "Unrecoverable error",
    "Error in timer",
    "message_crashed_consumer",
    "Exception raised outside body",
)


@dataclass
class Hostile:
    cluster: Cluster
    worker: WorkerProcess
    producer: Producer
    rejected: int = 0
    accepted: int = 0


class LogCursor:
    """Reads what a process has logged since the last read (its log only grows)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def read(self) -> str:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        # Only whole lines: the rest is read next time.
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return complete.decode("utf-8", "replace")


def records(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    with Cluster() as cluster:
        # At DEBUG, Celery logs its verdict on every task run ("... succeeded in ..."): the
        # evidence that a message ran to a normal return, whatever the task logged itself.
        worker = cluster.start_worker("hostile", concurrency=1, queue=QUEUE, env_overrides={"LOG_LEVEL": "debug"})
        with Connection(cluster.redis_url) as connection:
            yield Hostile(cluster, worker, Producer(connection.channel()))


# --------------------------------------------------------------------------- what hostile producers send

ODD_STRINGS = [
    "",
    " ",
    "\x00",
    "\ud800",
    "\udfff",
    "\u202e\u202d",
    "\u200b\u200d\ufeff",
    "e\u0301",
    "\U0001d54f",
    "\U0001f642" * 200,
    "A" * 129,
    "x" * (1 << 20),
    "../../etc/passwd",
    "https://",
    "http://",
    "J\nK",
    "%00",
    "https://user:pw@hooks.example.com/",
    "https://hooks.example.com/#frag",
    "https://127.0.0.1/",
    "https://[::1]/",
    "https://0x7f.1/",
    "https://hooks.example.com:99999/",
    "https://xn--/",
    "w_" + "0" * 20,
    "0123456789abcdef",
]
texts = st.text(max_size=40) | st.sampled_from(ODD_STRINGS)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=8,
)
FIELDS = ["job_id", "callback_url", "metadata", "watch_id", "token", "webhook_id", "self", "args", "kwargs", "id"]
field_names = st.sampled_from(FIELDS) | texts
any_kwargs = st.dictionaries(field_names, json_values, max_size=5)
big_metadata = st.integers(min_value=4000, max_value=200_000).map(lambda n: {"blob": "x" * n})
near_valid_watch = st.fixed_dictionaries(
    {"job_id": st.just("J-hostile") | texts, "callback_url": st.just("https://hooks.example.com/x") | texts},
    optional={
        "metadata": json_values | big_metadata,
        "watch_id": st.just("w_" + "0" * 20) | texts,
        "token": st.just("0" * 16) | texts,
        "extra": json_values,
    },
)


def starts_a_watch(kwargs: object) -> bool:
    """Whether the worker (which allows http and private callbacks) would start a watch for these kwargs."""
    if not isinstance(kwargs, dict) or "watch_id" in kwargs or "token" in kwargs:
        return False
    try:
        validate_watch_request(kwargs, allow_http=True, allow_private=True)
    except InvalidWatchRequest:
        return False
    return True


watch_kwargs = (any_kwargs | near_valid_watch).filter(lambda kw: not starts_a_watch(kw))
delivery_kwargs = any_kwargs | st.fixed_dictionaries({"webhook_id": texts, "token": texts}, optional={"x": json_values})
args_lists = st.just([]) | st.lists(json_values, max_size=3)
embeds = (
    st.just({})
    | st.none()
    | json_values
    | st.dictionaries(st.sampled_from(["callbacks", "errbacks", "chain", "chord", "group"]), json_values, max_size=2)
)


@dataclass(frozen=True)
class Message:
    body: bytes
    content_type: str
    headers: dict[str, Any]

    @property
    def task_id(self) -> str | None:
        """The id Celery knows the message by: a header, or in the body for protocol 1."""
        task_id = self.headers.get("id")
        if "task" not in self.headers:
            try:
                body = json.loads(self.body)
            except ValueError:
                body = None
            task_id = body.get("id") if isinstance(body, dict) else None
        return task_id if isinstance(task_id, str) else None


def triple(kwargs: Any) -> st.SearchStrategy[bytes]:
    return st.tuples(args_lists, st.just(kwargs), embeds).map(lambda t: json.dumps(list(t)).encode())


JUNK_HEADERS = [
    "id",
    "task",
    "timelimit",
    "retries",
    "root_id",
    "parent_id",
    "group",
    "argsrepr",
    "kwargsrepr",
    "ignore_result",
    "shadow",
    "stamped_headers",
    "stamps",
    "origin",
    "lang",
]
# A date Celery cannot read, or one in the past (run at once). Never a future one: the
# message would rightly wait for it. Never a past expiry: Celery rightly discards it silently.
junk_eta = st.sampled_from(["not a date", "", "2000-01-01T00:00:00+00:00", "9999-99-99"]) | scalars
junk_expires = st.sampled_from(["not a date", "9999-99-99"]) | st.integers() | st.lists(st.none(), max_size=2)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    task = draw(st.sampled_from([WATCH_TASK, WATCH_TASK, DELIVER_TASK, SWEEP_TASK]))
    kwargs = draw(watch_kwargs if task == WATCH_TASK else delivery_kwargs if task == DELIVER_TASK else any_kwargs)
    body_kind = draw(st.sampled_from(["triple", "triple", "triple", "json", "bytes", "deep", "pickle", "protocol1"]))
    content_type = "application/json"
    if body_kind == "triple":
        body = draw(triple(kwargs))
    elif body_kind == "json":
        body = json.dumps(draw(json_values)).encode()
    elif body_kind == "bytes":
        body = draw(st.binary(max_size=300))
        content_type = draw(st.sampled_from(["application/json", "application/octet-stream", "text/plain", ""]))
    elif body_kind == "deep":
        depth = draw(st.integers(min_value=500, max_value=100_000))
        body = b'[[], {"metadata": ' + b"[" * depth + b"]" * depth + b"}, {}]"
    elif body_kind == "pickle":
        body = pickle.dumps(([], kwargs, {}))
        content_type = "application/x-python-serialize"
    else:  # Celery's old protocol: everything in the body, no task header
        body = json.dumps(
            {
                "task": draw(st.just(task) | json_values),
                "id": draw(st.just(str(uuid.uuid4())) | json_values),
                "args": draw(args_lists | json_values),
                "kwargs": kwargs,
            }
        ).encode()
    headers: dict[str, Any] = {} if body_kind == "protocol1" else {"task": task, "id": str(uuid.uuid4()), "lang": "py"}
    headers.update(
        draw(
            st.dictionaries(
                st.sampled_from(JUNK_HEADERS),
                json_values | st.sampled_from([[None, None], [1, "2"], [1, 2, 3]]),
                max_size=2,
            )
        )
    )
    headers.update(draw(st.fixed_dictionaries({}, optional={"eta": junk_eta, "expires": junk_expires})))
    return Message(body, content_type, headers)


# --------------------------------------------------------------------------- the property

NAMED_CASES = [
    # The brief's list, always run, besides whatever Hypothesis draws.
    Message(
        pickle.dumps(([], {"job_id": "J", "callback_url": "https://hooks.example.com/"}, {})),
        "application/x-python-serialize",
        {"task": WATCH_TASK, "id": "pickle"},
    ),
    Message(b"\xff\xfe\x00garbage", "application/json", {"task": WATCH_TASK, "id": "garbage"}),
    Message(b'"just a string"', "application/json", {"task": WATCH_TASK, "id": "not-a-triple"}),
    Message(
        json.dumps([[], {"job_id": "J" * 1_000_000, "callback_url": "https://hooks.example.com/"}, {}]).encode(),
        "application/json",
        {"task": WATCH_TASK, "id": "huge-job-id"},
    ),
    Message(
        json.dumps([[], {"job_id": "J-\u202e\ud800", "callback_url": "https://h\u00e9.example/"}, {}]).encode(),
        "application/json",
        {"task": WATCH_TASK, "id": "odd-unicode"},
    ),
    Message(
        json.dumps(
            [[], {"job_id": "J", "callback_url": "https://hooks.example.com/", "metadata": {"blob": "x" * 100_000}}, {}]
        ).encode(),
        "application/json",
        {"task": WATCH_TASK, "id": "oversized-metadata"},
    ),
    Message(
        json.dumps([[], {"callback_url": "https://hooks.example.com/"}, {}]).encode(),
        "application/json",
        {"task": WATCH_TASK, "id": "missing-job-id"},
    ),
    Message(
        json.dumps([[], {"job_id": "J", "callback_url": "https://hooks.example.com/", "priority": 1}, {}]).encode(),
        "application/json",
        {"task": WATCH_TASK, "id": "unknown-field"},
    ),
    Message(
        json.dumps([["J", "https://hooks.example.com/"], {}, {}]).encode(),
        "application/json",
        {"task": WATCH_TASK, "id": "positional"},
    ),
    Message(
        json.dumps([[], {"webhook_id": ["x"], "token": 5, "extra": 1}, {}]).encode(),
        "application/json",
        {"task": DELIVER_TASK, "id": "deliver-wrong-args"},
    ),
    Message(json.dumps([[], {}, {}]).encode(), "application/json", {"task": ["not", "a", "name"], "id": "task-list"}),
    Message(
        json.dumps([[], {}, {}]).encode(),
        "application/json",
        {"task": SWEEP_TASK, "id": "bad-stamps", "stamped_headers": 5},
    ),
]


def publish(hostile: Hostile, message: Message) -> None:
    hostile.producer.publish(
        message.body,
        routing_key=QUEUE,
        headers=message.headers,
        content_type=message.content_type,
        content_encoding="utf-8" if message.content_type == "application/json" else "binary",
    )


def send_and_judge(hostile: Hostile, message: Message) -> None:
    cluster, worker = hostile.cluster, hostile.worker
    assert worker.alive, "the worker died on an earlier message"
    cursor = LogCursor(worker.stderr_path)
    probe = f"probe-{uuid.uuid4()}"
    publish(hostile, message)
    publish(
        hostile,
        Message(
            json.dumps([[], {"webhook_id": "nothing_here", "token": "nothing"}, {}]).encode(),
            "application/json",
            {"task": DELIVER_TASK, "id": probe},
        ),
    )
    seen: list[str] = []

    def probe_done() -> bool:
        seen.append(cursor.read())
        return f"[{probe}] succeeded" in "".join(seen) or not worker.alive

    wait_until(probe_done, TIMEOUT, "the probe after the message has run")
    wait_until(
        lambda: cluster.queue_length(QUEUE) == 0 and cluster.unacked_count() == 0,
        TIMEOUT,
        "the broker holds nothing: no message re-queued or left reserved",
    )
    text = "".join(seen)
    assert worker.alive, f"the worker died: {worker.tail(10)}"
    broken = [line[:300] for line in text.splitlines() if any(b in line for b in BROKEN)]
    assert not broken, broken
    rejections = [r for r in records(text) if r.get("event") in REJECTED]
    if rejections:
        # A task that refuses its kwargs returns normally as well: one rejection is the verdict.
        assert len(rejections) == 1, rejections
        assert str(rejections[0].get("reason", "")).strip(), rejections[0]
        hostile.rejected += 1
    else:
        ran = message.task_id is not None and f"[{message.task_id}] succeeded" in text
        assert ran, "neither rejected with a reason nor run to a normal return"
        hostile.accepted += 1


@pytest.mark.parametrize("message", NAMED_CASES, ids=[str(m.headers["id"]) for m in NAMED_CASES])
def test_each_named_hostile_message_is_rejected_with_a_reason(hostile: Hostile, message: Message) -> None:
    send_and_judge(hostile, message)
    assert hostile.worker.alive


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@given(message=messages())
@example(message=Message(b"[[], {}, {}]", "application/json", {"task": WATCH_TASK, "id": "no-kwargs"}))
def test_no_message_crashes_the_worker_or_stays_on_the_broker(hostile: Hostile, message: Message) -> None:
    send_and_judge(hostile, message)


def test_the_worker_that_took_all_of_that_is_the_same_one_and_still_completes_jobs(
    hostile: Hostile, record_row: Callable[..., Row]
) -> None:
    cluster, worker = hostile.cluster, hostile.worker
    jobs = {f"after-hostile-{n}": 2 for n in range(3)}
    path_of = {job: f"/hooks/{job}" for job in jobs}
    for job, size in jobs.items():
        cluster.sim.add_job(job, size=size, duration_s=0.3)
        cluster.enqueue(job, path_of[job], CHECK365_QUEUE=QUEUE)
    wait_settled(cluster, jobs, TIMEOUT)
    result = check_completed_deliveries(cluster, jobs, path_of)
    record_row(
        f"hostile messages ({hostile.rejected} rejected, {hostile.accepted} stale but well-formed), then valid jobs",
        jobs=len(jobs),
        events_expected=len(jobs),
        delivered=result.delivered,
        duplicates=result.duplicates,
        lost=len(jobs) - result.delivered,
        recover_s=None,
    )
    assert worker.alive and [p.pid for p in cluster.processes] == [worker.pid], "never restarted"
    assert result.delivered == len(jobs)
