"""Delivery as the contract promises it: retries, Retry-After, 410, redirects, dead letters, replay.

The receiver answers what each test scripts; the shared worker retries after
0.3 s three times (WEBHOOK_RETRY_DELAYS_S=0.3,0.3,0.3).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from standardwebhooks import Webhook

from tests.support.cluster import (
    FAST_SETTINGS,
    Cluster,
    WorkerProcess,
    new_secret,
    quiet_period,
    wait_until,
    webhook_ids,
)
from worker.intake.enqueue import enqueue_watch
from worker.local.receiver import Received
from worker.local.redisserver import free_port
from worker.state.outbox import StoredEvent

pytestmark = pytest.mark.integration

TIMEOUT = 25.0
# Longer than a retry delay plus a sweep interval: a stray attempt would show by then.
QUIET_S = 2.0
RETRIES = len(FAST_SETTINGS["WEBHOOK_RETRY_DELAYS_S"].split(","))


def start_job(cluster: Cluster, job_id: str, hook_path: str) -> None:
    # Completes at the first poll, so the test is about delivery only.
    cluster.sim.add_job(job_id, size=2, duration_s=0.0)
    cluster.enqueue(job_id, hook_path, {"test": "delivery"})


def wait_for_requests(cluster: Cluster, path: str, count: int) -> list[Received]:
    cluster.receiver.wait_for(lambda rx: sum(r.path == path for r in rx) >= count, TIMEOUT)
    return cluster.receiver.received(path)


def assert_all_verified(received: list[Received]) -> None:
    assert received
    assert all(r.verified for r in received), [(r.headers.get("webhook-id"), r.error) for r in received]


def stored_event(cluster: Cluster, webhook_id: str, state: str) -> StoredEvent:
    """The event once the outbox shows it in ``state`` (the receiver sees a POST before it is recorded)."""
    outbox = cluster.outbox()

    def in_state() -> StoredEvent | None:
        event = outbox.get(webhook_id)
        return event if event is not None and event.state == state else None

    found: StoredEvent = wait_until(in_state, TIMEOUT, f"event {webhook_id} is {state}")
    return found


def dead_letters(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """``check365-worker dead-letters list --json``, by webhook id."""
    result = cluster.cli("dead-letters", "list", "--json")
    assert result.returncode == 0, result.stderr
    return {row["webhook_id"]: row for row in json.loads(result.stdout)}


def test_a_503_with_retry_after_is_retried_with_the_same_id_a_fresh_timestamp_and_not_sooner(
    cluster: Cluster, job_id: str, hook_path: str
) -> None:
    cluster.receiver.script(hook_path, [(503, {"Retry-After": "2"})])
    start_job(cluster, job_id, hook_path)

    first, second = wait_for_requests(cluster, hook_path, 2)
    quiet_period(QUIET_S)

    assert len(cluster.receiver.received(hook_path)) == 2, "delivered on the second attempt: no third"
    assert_all_verified([first, second])
    assert (first.status_sent, second.status_sent) == (503, 200)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body, "every attempt sends the same signed bytes"
    # Retry-After (2 s) outweighs the configured 0.3 s delay.
    assert second.at - first.at >= 2.0
    assert int(second.headers["webhook-timestamp"]) > int(first.headers["webhook-timestamp"])
    stored_event(cluster, first.headers["webhook-id"], "delivered")


def test_410_gone_stops_delivery_at_once_and_dead_letters_the_event(
    cluster: Cluster, job_id: str, hook_path: str
) -> None:
    cluster.receiver.default(hook_path, 410)
    start_job(cluster, job_id, hook_path)

    (request,) = wait_for_requests(cluster, hook_path, 1)
    webhook_id = request.headers["webhook-id"]
    event = stored_event(cluster, webhook_id, "dead")
    quiet_period(QUIET_S)

    assert len(cluster.receiver.received(hook_path)) == 1, "410 means no further attempt"
    assert request.verified
    assert event.last_error == "gone"
    assert len(event.attempts) == 1
    row = dead_letters(cluster)[webhook_id]
    assert row["last_error"] == "gone"
    assert row["attempts"] == 1
    assert row["job_id"] == job_id


def test_a_redirect_is_not_followed_and_counts_as_a_failed_attempt(
    cluster: Cluster, job_id: str, hook_path: str
) -> None:
    elsewhere = hook_path + "-elsewhere"
    cluster.receiver.script(hook_path, [(302, {"Location": cluster.callback_url(elsewhere)})])
    start_job(cluster, job_id, hook_path)

    first, second = wait_for_requests(cluster, hook_path, 2)
    event = stored_event(cluster, first.headers["webhook-id"], "delivered")
    quiet_period(QUIET_S)

    assert cluster.receiver.received(elsewhere) == [], "a redirect must never be followed"
    assert_all_verified([first, second])
    assert (first.status_sent, second.status_sent) == (302, 200)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert [(a["ok"], a["status_code"]) for a in event.attempts] == [(False, 302), (True, 200)]


def test_exhausted_retries_are_dead_lettered_with_every_attempt_and_replay_delivers_the_same_id(
    cluster: Cluster, job_id: str, hook_path: str
) -> None:
    cluster.receiver.default(hook_path, 500)
    start_job(cluster, job_id, hook_path)

    requests = wait_for_requests(cluster, hook_path, 1 + RETRIES)
    webhook_id = requests[0].headers["webhook-id"]
    event = stored_event(cluster, webhook_id, "dead")
    quiet_period(QUIET_S)

    requests = cluster.receiver.received(hook_path)
    assert len(requests) == 1 + RETRIES, "one attempt and one per configured retry delay, then stop"
    assert webhook_ids(requests) == [webhook_id]
    assert_all_verified(requests)
    assert [(a["ok"], a["status_code"]) for a in event.attempts] == [(False, 500)] * (1 + RETRIES)
    assert "retries exhausted" in str(event.last_error)
    row = dead_letters(cluster)[webhook_id]
    assert row["attempts"] == 1 + RETRIES

    cluster.receiver.default(hook_path, 200)
    replay = cluster.cli("dead-letters", "replay", webhook_id)
    assert replay.returncode == 0, replay.stderr

    requests = wait_for_requests(cluster, hook_path, 2 + RETRIES)
    replayed = requests[-1]
    assert replayed.verified
    assert replayed.status_sent == 200
    assert replayed.headers["webhook-id"] == webhook_id, "a replay keeps the receiver's idempotency key"
    assert replayed.body == requests[0].body
    stored_event(cluster, webhook_id, "delivered")
    assert webhook_id not in dead_letters(cluster)


def test_any_2xx_is_success(cluster: Cluster, job_id: str, hook_path: str) -> None:
    # 204 is the 2xx a receiver is most likely to answer, and the one without a body.
    cluster.receiver.script(hook_path, [204])
    start_job(cluster, job_id, hook_path)

    (request,) = wait_for_requests(cluster, hook_path, 1)
    stored_event(cluster, request.headers["webhook-id"], "delivered")
    quiet_period(QUIET_S)

    assert len(cluster.receiver.received(hook_path)) == 1, "a 2xx must not be retried"
    assert request.verified


def test_an_unreachable_receiver_is_retried_then_dead_lettered(cluster: Cluster, job_id: str) -> None:
    # Nothing listens on this port: every attempt is a connection error.
    url = f"http://127.0.0.1:{free_port()}/hooks/{job_id}"
    cluster.sim.add_job(job_id, size=1, duration_s=0.0)
    enqueue_watch(job_id, url, settings=cluster.client_settings())

    def webhook_id() -> str | None:
        watches = cluster.watch_state(job_id)
        return watches[0].events[0] if watches and watches[0].events else None

    event = stored_event(cluster, wait_until(webhook_id, TIMEOUT, "the event is created"), "dead")

    assert len(event.attempts) == 1 + RETRIES
    assert all(a["ok"] is False and a["status_code"] is None and "connection" in a["error"] for a in event.attempts)
    assert event.webhook_id in dead_letters(cluster)


@pytest.fixture(scope="module")
def rotating_worker(cluster: Cluster) -> Iterator[tuple[WorkerProcess, str]]:
    """A worker signing with a new secret and the cluster's (old) one, as during a key rotation."""
    new = new_secret()
    process = cluster.start_worker(
        "rotating", concurrency=2, queue="it-rotation", env_overrides={"WEBHOOK_SECRET": f"{new} {cluster.secret}"}
    )
    yield process, new
    process.stop()


def test_every_active_secret_signs_during_a_rotation(
    cluster: Cluster, rotating_worker: tuple[WorkerProcess, str], job_id: str, hook_path: str
) -> None:
    _, new = rotating_worker
    cluster.sim.add_job(job_id, size=1, duration_s=0.0)
    cluster.enqueue(job_id, hook_path, CHECK365_QUEUE="it-rotation")

    (request,) = wait_for_requests(cluster, hook_path, 1)

    # The receiver knows only the old secret; a receiver already on the new one verifies too.
    assert request.verified
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    assert all(entry.startswith("v1,") for entry in request.headers["webhook-signature"].split(" "))
    Webhook(new).verify(request.body, request.headers)
