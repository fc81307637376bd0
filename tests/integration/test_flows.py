"""End to end: a watch enqueued on the broker ends in the signed webhooks the contract promises.

Every webhook is checked by the receiver with the independent ``standardwebhooks``
package; every test asserts that each request it received verified.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

import worker
from tests.support.cluster import Cluster, WorkerProcess, new_api_key, quiet_period, wait_until, webhook_ids
from worker.errors import InvalidWatchRequest
from worker.local.receiver import Received
from worker.local.redisserver import free_port
from worker.local.simulator import generate_results

pytestmark = pytest.mark.integration

# Long enough for any flow here with the fast settings; only reached when something is broken.
TIMEOUT = 25.0
# Longer than a retry delay (0.3 s) plus a sweep interval (1 s): a second webhook from a
# retry or from a duplicate chain would have arrived by then.
QUIET_S = 2.0

COMPLETED = "bulk_validation.completed"
FAILED = "bulk_validation.failed"
TIMED_OUT = "bulk_validation.timed_out"


def wait_for_events(cluster: Cluster, path: str, count: int, timeout: float = TIMEOUT) -> list[Received]:
    """The requests on ``path`` once ``count`` distinct webhook-ids have arrived there."""
    cluster.receiver.wait_for(lambda rx: len(webhook_ids([r for r in rx if r.path == path])) >= count, timeout)
    return cluster.receiver.received(path)


def assert_all_verified(received: Sequence[Received]) -> None:
    assert received, "no webhook received"
    failures = [(r.headers.get("webhook-id"), r.error) for r in received if not r.verified]
    assert not failures, f"signature verification failed: {failures}"


def only_event(cluster: Cluster, path: str) -> tuple[Received, dict[str, Any]]:
    """The single event of ``path``, after a quiet period that would have let a duplicate arrive."""
    wait_for_events(cluster, path, 1)
    quiet_period(QUIET_S)
    received = cluster.receiver.received(path)
    assert_all_verified(received)
    assert len(received) == 1, f"expected one request, got {webhook_ids(received)} in {len(received)} requests"
    return received[0], received[0].json()


# --------------------------------------------------------------------------- completion


def test_a_completed_job_is_delivered_once_with_checks365_data_unchanged(
    cluster: Cluster, job_id: str, hook_path: str
) -> None:
    cluster.sim.add_job(job_id, size=7, duration_s=1.0)
    metadata = {"order": 17, "nested": {"tags": ["a", "é"], "ok": True, "n": None}}

    cluster.enqueue(job_id, hook_path, metadata)
    request, body = only_event(cluster, hook_path)

    assert body["type"] == COMPLETED
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", body["timestamp"])
    # Check365's data object exactly, plus part and metadata: nothing renamed, dropped or added.
    assert body["data"] == {
        "jobId": job_id,
        "status": "completed",
        "creditsUsed": 7,
        "progress": 100,
        "total": 7,
        "results": generate_results(job_id, 7),
        "part": {"index": 1, "count": 1},
        "metadata": metadata,
    }
    headers = request.headers
    assert headers["content-type"] == "application/json"
    assert headers["webhook-id"]
    assert headers["webhook-timestamp"].isdigit()
    assert all(sig.startswith("v1,") for sig in headers["webhook-signature"].split(" "))
    assert headers["user-agent"] == f"check365-worker/{worker.__version__}"


def test_a_large_job_is_sent_in_parts_whose_union_is_the_results_in_order(
    cluster: Cluster, job_id: str, hook_path: str
) -> None:
    # The shared worker keeps the default of 1000 results per part: 2500 results make 3 parts.
    cluster.sim.add_job(job_id, size=2500, duration_s=0.5)
    cluster.enqueue(job_id, hook_path, {"batch": 3})

    received = wait_for_events(cluster, hook_path, 3)
    quiet_period(QUIET_S)
    received = cluster.receiver.received(hook_path)
    assert_all_verified(received)
    ids = webhook_ids(received)
    assert len(ids) == 3 and len(received) == 3, "one request per part, each with its own webhook-id"

    parts = sorted((r.json() for r in received), key=lambda b: b["data"]["part"]["index"])
    assert [p["data"]["part"] for p in parts] == [{"index": i, "count": 3} for i in (1, 2, 3)]
    assert all(p["type"] == COMPLETED for p in parts)
    assert [len(p["data"]["results"]) for p in parts] == [1000, 1000, 500]
    union = [result for p in parts for result in p["data"]["results"]]
    assert union == generate_results(job_id, 2500)
    for p in parts:
        rest = {k: v for k, v in p["data"].items() if k not in ("results", "part")}
        assert rest == {
            "jobId": job_id,
            "status": "completed",
            "creditsUsed": 2500,
            "progress": 100,
            "total": 2500,
            "metadata": {"batch": 3},
        }


def test_a_job_without_results_is_one_completed_event_with_an_empty_list(
    cluster: Cluster, job_id: str, hook_path: str
) -> None:
    cluster.sim.add_job(job_id, size=0, duration_s=0.3)
    cluster.enqueue(job_id, hook_path)

    _, body = only_event(cluster, hook_path)

    assert body["type"] == COMPLETED
    assert body["data"]["results"] == []
    assert body["data"]["total"] == 0
    assert body["data"]["part"] == {"index": 1, "count": 1}


def test_unknown_intermediate_statuses_are_waited_out(
    cluster: Cluster, shared_worker: WorkerProcess, job_id: str, hook_path: str
) -> None:
    cluster.sim.add_job(job_id, size=4, duration_s=2.5, behaviour="unknown_statuses")
    cluster.enqueue(job_id, hook_path)

    _, body = only_event(cluster, hook_path)

    assert body["type"] == COMPLETED
    assert body["data"]["results"] == generate_results(job_id, 4)
    (watch,) = cluster.watch_state(job_id)
    assert (watch.last_status, watch.polls >= 2) == ("completed", True)
    # The statuses seen before completion were ones Check365 does not document: tolerated.
    polls = [r for r in shared_worker.log_records() if r.get("event") == "poll_done" and r.get("job_id") == job_id]
    seen = {r["status"] for r in polls}
    assert seen and seen <= {"queued", "validating", "finalizing"}


def test_results_that_arrive_after_completed_are_waited_for(cluster: Cluster, job_id: str, hook_path: str) -> None:
    job = cluster.sim.add_job(job_id, size=10, duration_s=0.5, behaviour="late_results")
    cluster.enqueue(job_id, hook_path)

    _, body = only_event(cluster, hook_path)

    # Never a short event: the one event carries every result.
    assert body["data"]["results"] == generate_results(job_id, 10)
    assert body["data"]["part"] == {"index": 1, "count": 1}
    completed_at = job.created_at + job.duration_s
    after_completion = [r for r in cluster.sim.requests() if r.job_id == job_id and r.at >= completed_at]
    assert len(after_completion) > 1, "the short answer after 'completed' should have been re-polled"


def test_metadata_with_a_big_integer_is_echoed_unchanged_or_refused_at_enqueue(
    cluster: Cluster, job_id: str, hook_path: str
) -> None:
    metadata = {"big": 2**70, "small": -(2**63)}
    cluster.sim.add_job(job_id, size=1, duration_s=0.0)
    try:
        cluster.enqueue(job_id, hook_path, metadata)
    except InvalidWatchRequest as exc:
        # Refusing at enqueue is a clear error before anything is enqueued: also within the contract.
        assert "metadata" in str(exc)
        return
    try:
        # Fail fast on the crash instead of waiting out the timeout.
        wait_until(
            lambda: cluster.receiver.received(hook_path) or cluster.error_records(job_id),
            TIMEOUT,
            "an event or a crash",
        )
        assert not cluster.error_records(job_id), cluster.error_records(job_id)[0][1].get("event")
        _, body = only_event(cluster, hook_path)
        assert body["data"]["metadata"] == metadata
    finally:
        # Stop a watch that crashes at every finish from looping in the shared worker's background.
        for watch in cluster.watch_state(job_id):
            cluster.watches().cancel(watch.watch_id)


# --------------------------------------------------------------------------- failures and deadline


def test_a_failed_job_ends_in_a_failed_event(cluster: Cluster, job_id: str, hook_path: str) -> None:
    cluster.sim.add_job(job_id, size=5, duration_s=0.5, behaviour="fail")
    cluster.enqueue(job_id, hook_path, {"k": "v"})

    _, body = only_event(cluster, hook_path)

    assert body["type"] == FAILED
    assert body["data"]["jobId"] == job_id
    assert body["data"]["reason"] == "job_failed"
    assert isinstance(body["data"]["message"], str) and body["data"]["message"]
    assert body["data"]["metadata"] == {"k": "v"}


def test_an_unknown_job_ends_in_job_not_found(cluster: Cluster, job_id: str, hook_path: str) -> None:
    # Not registered with the simulator: Check365 answers 404.
    cluster.enqueue(job_id, hook_path, {"k": 1})

    _, body = only_event(cluster, hook_path)

    assert body["type"] == FAILED
    assert body["data"]["jobId"] == job_id
    assert body["data"]["reason"] == "job_not_found"
    assert body["data"]["metadata"] == {"k": 1}


@pytest.fixture(scope="module")
def unauthorized_worker(cluster: Cluster) -> Iterator[WorkerProcess]:
    """A worker whose API key Check365 refuses, alone on its own queue."""
    process = cluster.start_worker(
        "wrong-key",
        concurrency=2,
        queue="it-wrong-key",
        env_overrides={"CHECK365_API_KEY": new_api_key(), "CHECK365_AUTH_GRACE_S": "1"},
    )
    yield process
    process.stop()


def test_an_api_key_refused_past_the_grace_ends_in_unauthorized(
    cluster: Cluster, unauthorized_worker: WorkerProcess, job_id: str, hook_path: str
) -> None:
    cluster.sim.add_job(job_id, size=3, duration_s=0.0)
    cluster.enqueue(job_id, hook_path, CHECK365_QUEUE="it-wrong-key")

    _, body = only_event(cluster, hook_path)
    refusals = [
        r
        for r in unauthorized_worker.log_records()
        if r.get("event") == "poll_key_refused" and r.get("job_id") == job_id
    ]
    assert refusals, "the pool waits out CHECK365_AUTH_GRACE_S before a watch fails"

    assert body["type"] == FAILED
    assert body["data"]["reason"] == "unauthorized"
    assert body["data"]["jobId"] == job_id
    assert body["data"]["metadata"] is None


@pytest.fixture(scope="module")
def short_deadline_worker(cluster: Cluster) -> Iterator[WorkerProcess]:
    """A worker whose watches give up after 3 s, alone on its own queue."""
    process = cluster.start_worker(
        "short-deadline", concurrency=2, queue="it-short-deadline", env_overrides={"WATCH_TIMEOUT_S": "3"}
    )
    yield process
    process.stop()


def test_a_job_that_never_completes_times_out_with_its_last_status(
    cluster: Cluster, short_deadline_worker: WorkerProcess, job_id: str, hook_path: str
) -> None:
    # The "never" job stalls at 87 % from 0.87 s on; polls at most 1 s apart see that before 3 s.
    cluster.sim.add_job(job_id, size=3, duration_s=1.0, behaviour="never")
    cluster.enqueue(job_id, hook_path, {"m": 2}, CHECK365_QUEUE="it-short-deadline")

    _, body = only_event(cluster, hook_path)

    assert body["type"] == TIMED_OUT
    assert body["data"] == {
        "jobId": job_id,
        "reason": "timed_out",
        "status": "processing",
        "progress": 87,
        "metadata": {"m": 2},
    }
    (watch,) = cluster.watch_state(job_id)
    assert watch.outcome == "timed_out"
    assert (watch.last_status, watch.last_progress) == ("processing", 87)


# --------------------------------------------------------------------------- duplicates


def test_enqueueing_the_same_watch_three_times_gives_one_set_of_webhooks(
    cluster: Cluster, job_id: str, hook_path: str
) -> None:
    cluster.sim.add_job(job_id, size=3, duration_s=1.5)
    for _ in range(3):
        cluster.enqueue(job_id, hook_path)

    _request, body = only_event(cluster, hook_path)

    assert body["type"] == COMPLETED
    assert len(cluster.watch_state(job_id)) == 1, "a duplicate enqueue must not create a second watch"


def test_a_start_message_delivered_again_after_its_webhook_starts_nothing(
    cluster: Cluster, shared_worker: WorkerProcess, job_id: str, hook_path: str
) -> None:
    # As the broker does when a worker dies after the watch ended but before it
    # acknowledged the start message: the same message, with the same task id, again.
    cluster.sim.add_job(job_id, size=2, duration_s=0.0)
    kwargs = {"job_id": job_id, "callback_url": cluster.callback_url(hook_path)}
    task_id = cluster.send_raw(kwargs, task_id=f"start-{job_id}")
    only_event(cluster, hook_path)
    assert cluster.send_raw(kwargs, task_id=task_id) == task_id
    shared_worker.wait_for_task_record(task_id, "watch_duplicate", TIMEOUT)
    _, body = only_event(cluster, hook_path)
    assert body["type"] == COMPLETED
    assert len(cluster.watch_state(job_id)) == 1


def test_the_same_job_with_another_callback_url_is_a_second_watch(
    cluster: Cluster, job_id: str, hook_path: str
) -> None:
    other_path = hook_path + "-other"
    cluster.sim.add_job(job_id, size=3, duration_s=1.5)
    cluster.enqueue(job_id, hook_path)
    cluster.enqueue(job_id, other_path)

    _, first = only_event(cluster, hook_path)
    (second_request,) = cluster.receiver.received(other_path)

    assert second_request.verified
    assert first["type"] == second_request.json()["type"] == COMPLETED
    assert second_request.headers["webhook-id"] not in webhook_ids(cluster.receiver.received(hook_path))
    assert sorted(w.callback_url for w in cluster.watch_state(job_id)) == sorted(
        [cluster.callback_url(hook_path), cluster.callback_url(other_path)]
    )


def test_duplicate_poll_messages_converge_on_one_chain(
    cluster: Cluster, shared_worker: WorkerProcess, job_id: str, hook_path: str
) -> None:
    cluster.sim.add_job(job_id, size=3, duration_s=2.0)
    cluster.enqueue(job_id, hook_path)
    watch = wait_until(lambda: next(iter(cluster.watch_state(job_id)), None), TIMEOUT, "the watch is created")
    token = cluster.redis().hget(f"check365:watch:{watch.watch_id}", "token")
    assert isinstance(token, bytes) and token, "an active watch carries the token of its pending message"

    # The same internal message twice, as a broker re-delivery would present it: with the
    # token of the message already on its way, so three messages now race for one claim.
    message = {
        "job_id": job_id,
        "callback_url": cluster.callback_url(hook_path),
        "watch_id": watch.watch_id,
        "token": token.decode(),
    }
    task_ids = [cluster.send_raw(message), cluster.send_raw(message)]
    for task_id in task_ids:
        # Every run leaves a line (the poll it made, or why its message was dropped):
        # both duplicates were processed, not lost.
        shared_worker.wait_for_record(lambda r, task_id=task_id: r.get("task_id") == task_id, TIMEOUT)

    _, body = only_event(cluster, hook_path)
    assert body["type"] == COMPLETED
    (finished,) = cluster.watch_state(job_id)
    assert finished.outcome == "completed"
    dropped = [
        r
        for r in shared_worker.log_records()
        if r.get("event") == "watch_message_dropped" and r.get("watch_id") == watch.watch_id
    ]
    assert [r["reason"] for r in dropped] == ["stale_token"] * 2, "of three messages with one token, one polls"


# --------------------------------------------------------------------------- foreign producers


def test_a_foreign_producers_bad_messages_are_rejected_with_a_reason_and_the_worker_stays_up(
    cluster: Cluster, shared_worker: WorkerProcess, job_id: str, hook_path: str
) -> None:
    def case(n: int) -> tuple[str, str]:
        # Jobs that would complete at once, so that a message wrongly accepted would be delivered.
        bad_job = f"{job_id}-bad{n}"
        cluster.sim.add_job(bad_job, size=1, duration_s=0.0)
        return bad_job, f"{hook_path}-bad{n}"

    jobs, paths = zip(*(case(n) for n in range(6)), strict=True)
    urls = [cluster.callback_url(p) for p in paths]
    # (kwargs, positional args, the field the logged reason must name)
    bad_messages: list[tuple[dict[str, Any] | None, list[Any] | None, str]] = [
        ({"callback_url": urls[0]}, None, "job_id"),
        ({"job_id": f"{jobs[1]} with spaces", "callback_url": urls[1]}, None, "job_id"),
        ({"job_id": jobs[2], "callback_url": "ftp://x"}, None, "callback_url"),
        ({"job_id": jobs[3], "callback_url": urls[3], "metadata": [1, 2]}, None, "metadata"),
        ({"job_id": jobs[4], "callback_url": urls[4], "metadata": {"blob": "x" * 5000}}, None, "metadata"),
        (None, [jobs[5], urls[5]], "positional"),
    ]
    sent = [(cluster.send_raw(kwargs, args), field) for kwargs, args, field in bad_messages]

    for task_id, field in sent:
        record = shared_worker.wait_for_task_record(task_id, "watch_rejected", TIMEOUT)
        assert field in record["reason"], f"the reason should name {field!r}: {record['reason']!r}"

    # The worker is still up and serving: a valid job right after completes.
    cluster.sim.add_job(job_id, size=2, duration_s=0.5)
    cluster.enqueue(job_id, hook_path)
    _, body = only_event(cluster, hook_path)
    assert body["type"] == COMPLETED
    assert shared_worker.alive

    for path in paths:
        assert cluster.receiver.received(path) == [], f"nothing may be delivered for a rejected message ({path})"
    for bad_job in jobs:
        assert cluster.watch_state(bad_job) == [], f"a rejected message must not start a watch ({bad_job})"
    # Rejected once each, not retried.
    rejected = [r for r in shared_worker.log_records() if r.get("event") == "watch_rejected"]
    for task_id, _ in sent:
        assert sum(r.get("task_id") == task_id for r in rejected) == 1


# --------------------------------------------------------------------------- the CLI


def test_the_cli_enqueues_a_watch_that_is_delivered(cluster: Cluster, job_id: str, hook_path: str) -> None:
    cluster.sim.add_job(job_id, size=2, duration_s=0.5)

    result = cluster.cli("enqueue", job_id, cluster.callback_url(hook_path), "--metadata", '{"a":1}')

    assert result.returncode == 0, result.stderr
    assert job_id in result.stdout
    _, body = only_event(cluster, hook_path)
    assert body["type"] == COMPLETED
    assert body["data"]["metadata"] == {"a": 1}


PARKED_QUEUE = "it-parked"  # no worker consumes it, so whatever is enqueued there stays countable


# (arguments after "enqueue", "{receiver}" standing for the receiver's URL; settings; the field named)
BAD_CLI_INPUT = [
    pytest.param(["J-ok", "{receiver}/hooks/parked", "--metadata", "[1]"], {}, "metadata", id="metadata-list"),
    pytest.param(
        ["J-ok", "{receiver}/hooks/parked", "--metadata", "{not json"], {}, "metadata", id="metadata-not-json"
    ),
    pytest.param(["J bad id", "{receiver}/hooks/parked"], {}, "job_id", id="job-id-with-space"),
    pytest.param(
        ["J-ok", "{receiver}/hooks/parked"], {"WEBHOOK_ALLOW_HTTP": "false"}, "callback_url", id="http-not-allowed"
    ),
    pytest.param(
        ["J-ok", "https://127.0.0.1/hooks/parked"],
        {"WEBHOOK_ALLOW_PRIVATE_NETWORKS": "false"},
        "callback_url",
        id="loopback-not-allowed",
    ),
]


@pytest.mark.parametrize(("args", "env", "named"), BAD_CLI_INPUT)
def test_the_cli_refuses_bad_input_before_enqueueing(
    cluster: Cluster, args: list[str], env: dict[str, str], named: str
) -> None:
    cluster.redis().delete(PARKED_QUEUE)
    job, url, *extra_args = args
    callback_url = url.format(receiver=cluster.receiver.url)

    result = cluster.cli(
        "enqueue", job, callback_url, *extra_args, env_overrides={"CHECK365_QUEUE": PARKED_QUEUE, **env}
    )

    assert result.returncode != 0
    assert named in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert cluster.queue_length(PARKED_QUEUE) == 0

    # A valid command does land in the same queue: the count above would have seen an enqueue.
    control = cluster.cli(
        "enqueue", "J-ok", cluster.callback_url("/hooks/parked"), env_overrides={"CHECK365_QUEUE": PARKED_QUEUE}
    )
    assert control.returncode == 0, control.stderr
    assert cluster.queue_length(PARKED_QUEUE) == 1
    cluster.redis().delete(PARKED_QUEUE)


def test_the_cli_reports_an_unreachable_broker_in_one_line(cluster: Cluster, job_id: str, hook_path: str) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"

    result = cluster.cli("enqueue", job_id, cluster.callback_url(hook_path), env_overrides={"REDIS_URL": closed})

    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_cli_status_shows_the_outcome_polls_and_delivery(cluster: Cluster, job_id: str, hook_path: str) -> None:
    cluster.sim.add_job(job_id, size=2, duration_s=0.5)
    cluster.enqueue(job_id, hook_path)
    request, _ = only_event(cluster, hook_path)

    def delivered_status() -> list[dict[str, Any]] | None:
        result = cluster.cli("status", job_id, "--json")
        assert result.returncode == 0, result.stderr
        found: list[dict[str, Any]] = json.loads(result.stdout)
        return found if found and found[0]["events"] and found[0]["events"][0]["state"] == "delivered" else None

    (status,) = wait_until(delivered_status, TIMEOUT, "the status shows the event as delivered")
    assert status["job_id"] == job_id
    assert status["outcome"] == "completed"
    assert status["state"] == "finished"
    assert status["polls"] >= 1
    (event,) = status["events"]
    assert event["webhook_id"] == request.headers["webhook-id"]
    assert event["type"] == COMPLETED
    (attempt,) = event["attempts"]
    assert attempt["ok"] is True
    assert attempt["status_code"] == 200
