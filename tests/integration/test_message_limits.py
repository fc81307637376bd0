"""Message limits at the boundary, with real messages sent to the shared worker.

A message may lower its task's time limit, never raise or lift it; it may not ask the
broker to hold it longer than the worker ever would; and the worker's follow-ups go only
to its configured queues, whatever routing key the message came with.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.support.cluster import DEFAULT_QUEUE, Cluster, WorkerProcess, wait_until
from worker.runtime.celeryconfig import delivery_queue

pytestmark = pytest.mark.integration


def _watch(cluster: Cluster, job_id: str, hook_path: str) -> dict[str, Any]:
    return {"job_id": job_id, "callback_url": cluster.callback_url(hook_path)}


def _rejection(worker: WorkerProcess, task_id: str) -> dict[str, Any]:
    return worker.wait_for_record(
        lambda r: r.get("event") == "watch_rejected" and r.get("task_id") == task_id, timeout=15
    )


@pytest.mark.parametrize(
    "limits",
    [
        {"time_limit": 1e308, "soft_time_limit": 1e308},
        {"time_limit": 10_000.0},
        {"soft_time_limit": 10_000.0},
        {"time_limit": -1.0},
    ],
)
def test_a_message_raising_its_time_limit_is_refused_with_a_reason(
    cluster: Cluster, shared_worker: WorkerProcess, job_id: str, hook_path: str, limits: dict[str, float]
) -> None:
    cluster.sim.add_job(job_id, size=1, duration_s=0.0)
    task_id = cluster.send_raw(_watch(cluster, job_id, hook_path), **limits)
    assert "timelimit" in _rejection(shared_worker, task_id)["reason"]
    assert cluster.watch_state(job_id) == []


def test_an_eta_beyond_the_longest_delay_the_worker_sends_is_refused(
    cluster: Cluster, shared_worker: WorkerProcess, job_id: str, hook_path: str
) -> None:
    far = datetime.now(UTC) + timedelta(days=30)
    task_id = cluster.send_raw(_watch(cluster, job_id, hook_path), eta=far)
    assert "eta" in _rejection(shared_worker, task_id)["reason"]
    task_id = cluster.send_raw(_watch(cluster, job_id, hook_path), countdown=7 * 86_400)
    assert "eta" in _rejection(shared_worker, task_id)["reason"]
    assert cluster.watch_state(job_id) == []


@pytest.fixture(scope="module")
def polling_at_once(cluster: Cluster) -> Iterator[str]:
    """A worker whose start step polls and delivers a completed job's event itself."""
    queue = "it-limits-at-once"
    worker = cluster.start_worker("limits-at-once", env_overrides={"POLL_INITIAL_DELAY_S": "0"}, queue=queue)
    yield queue
    worker.stop()
    cluster.processes.remove(worker)


def test_a_lowered_time_limit_is_the_steps_deadline(
    cluster: Cluster, polling_at_once: str, job_id: str, hook_path: str
) -> None:
    # The receiver answers after 3 s, well inside WEBHOOK_TIMEOUT_S: only the 1 s limit cuts it.
    cluster.receiver.script(hook_path, [(200, {}, 3.0)])
    cluster.sim.add_job(job_id, size=1, duration_s=0.0)
    cluster.send_raw(_watch(cluster, job_id, hook_path), queue=polling_at_once, time_limit=1.0)

    def first_attempt() -> dict[str, Any] | None:
        watches = cluster.watch_state(job_id)
        event = cluster.outbox().get(watches[0].events[0]) if watches and watches[0].events else None
        return event.attempts[0] if event and event.attempts else None

    attempt = wait_until(first_attempt, 30, "the first attempt is recorded")
    assert (attempt["ok"], attempt["error"]) == (False, "timeout")
    assert attempt["duration_ms"] < 1500
    # The retry, on a message of the worker's own, has the task's whole limit and delivers.
    cluster.receiver.wait_for(lambda rx: len([r for r in rx if r.path == hook_path]) >= 2, 30)


def test_follow_ups_go_to_the_configured_queues_whatever_the_routing_key(
    cluster: Cluster, shared_worker: WorkerProcess, job_id: str, hook_path: str
) -> None:
    victim = "another-service"
    cluster.sim.add_job(job_id, size=1, duration_s=2.0)
    # A message on our queue that names another service's queue as its routing key, as a
    # producer writing to Redis can make it: built by Celery, then re-addressed.
    parking = f"parking-{job_id}"
    cluster.send_raw(_watch(cluster, job_id, hook_path), queue=parking)
    raw = json.loads(cluster.redis().rpop(parking))
    raw["properties"]["delivery_info"]["routing_key"] = victim
    cluster.redis().lpush(DEFAULT_QUEUE, json.dumps(raw))

    cluster.receiver.wait_for(lambda rx: any(r.path == hook_path for r in rx), 30)
    [watch] = cluster.watch_state(job_id)
    assert watch.queue == DEFAULT_QUEUE
    assert watch.polls >= 2  # its follow-up polls came back to this worker
    # Nothing was ever published to the queue the message named.
    assert cluster.redis().exists(victim, delivery_queue(victim)) == 0
