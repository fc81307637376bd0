"""Broker messages that vanish: every watch and every delivery is re-armed by the sweep, on time.

The only worker is killed and every message of the broker is deleted: the queue (kombu
keeps it as a Redis list named after the queue) and the reserved messages (the
``unacked`` hash and ``unacked_index`` sorted set), so every scheduled poll and every
countdown of a webhook retry is gone. A new worker starts; beat has kept running. The
sweep must give each item a fresh token and message once it is REARM_GRACE_S overdue (a
step cut short: once its lease has run out), within one SWEEP_INTERVAL_S more, and every
watch must then complete and every event arrive.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.reliability.scenario import (
    SLACK_S,
    Row,
    check_completed_deliveries,
    longest_lease_s,
    wait_settled,
    watch_outcomes,
)
from tests.support.cluster import Cluster, wait_until
from worker.state.store import text

SETTINGS = {
    "POLL_INITIAL_DELAY_S": "0.3",
    "POLL_MAX_DELAY_S": "2",
    "BROKER_VISIBILITY_TIMEOUT_S": "10",
    "REARM_GRACE_S": "2",
    "SWEEP_INTERVAL_S": "1",
    "CHECK365_TIMEOUT_S": "2",
    "WEBHOOK_TIMEOUT_S": "2",
    # Under POLL_MAX_DELAY_S: each retry waits as a countdown message, which the deletion takes.
    "WEBHOOK_RETRY_DELAYS_S": "1.5,1.5,1.5",
    "WATCH_TIMEOUT_S": "120",
    "CHECK365_MAX_RPS": "1000",
}
GRACE_S = float(SETTINGS["REARM_GRACE_S"])
SWEEP_S = float(SETTINGS["SWEEP_INTERVAL_S"])
LEASE_S = longest_lease_s(SETTINGS)
# For each item's re-arm; kept tight because this bound is the point of the test.
REARM_SLACK_S = 5.0
# How often the test reads the tokens: the resolution of the measured re-arm times.
SAMPLE_EVERY_S = 0.05

RETRYING_JOBS = 10  # complete at once; their receiver fails twice, so a retry countdown is pending
RUNNING_JOBS = 40  # still running when the messages vanish


@dataclass
class Item:
    key: str
    kind: str
    token: str
    due: float
    armed: bool
    rearmed_at: float | None = None

    def latest_rearm(self, worker_ready_at: float) -> float:
        """When the sweep must have re-armed it: grace after due (a lease has none), and only once a worker runs it."""
        return max(self.due + (GRACE_S if self.armed else 0.0), worker_ready_at) + SWEEP_S + REARM_SLACK_S


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster() as started:
        starting = [
            started.start_worker("lost-w1", concurrency=3, env_overrides=SETTINGS, wait=False),
            started.start_beat("lost-beat", env_overrides=SETTINGS, wait=False),
        ]
        for process in starting:
            process.wait_ready(60)
        yield started


def snapshot(cluster: Cluster) -> list[Item]:
    """Every active watch and event with the token its (now deleted) message carried."""
    client = cluster.redis()
    items = []
    for kind, store in (("watch", cluster.watches().items), ("event", cluster.outbox().items)):
        for member in client.zrange(store.due_key, 0, -1):
            key = store.key(str(text(member)))
            token, due, armed = (text(v) for v in client.hmget(key, ["token", "due", "armed"]))
            if token:
                items.append(Item(key, kind, token, float(due or 0), armed == "1"))
    return items


def watch_rearms(cluster: Cluster, items: list[Item], timeout: float) -> None:
    """Record when each item's token changes: only the sweep can change it, no message is left."""
    client = cluster.redis()
    deadline = time.monotonic() + timeout
    while any(item.rearmed_at is None for item in items) and time.monotonic() < deadline:
        pending = [item for item in items if item.rearmed_at is None]
        with client.pipeline(transaction=False) as pipe:
            for item in pending:
                pipe.hget(item.key, "token")
            tokens = pipe.execute()
        now = time.time()
        for item, token in zip(pending, tokens, strict=True):
            if text(token) != item.token:
                item.rearmed_at = now
        time.sleep(SAMPLE_EVERY_S)


def test_deleted_broker_messages_are_re_armed_by_the_sweep_and_everything_completes(
    cluster: Cluster, record_row: Callable[..., Row]
) -> None:
    jobs: dict[str, int] = {}
    path_of: dict[str, str] = {}
    for n in range(RETRYING_JOBS + RUNNING_JOBS):
        job = f"lost-{n:02d}"
        jobs[job] = 1 + n % 5
        path_of[job] = f"/hooks/{job}"
        retrying = n < RETRYING_JOBS
        if retrying:
            cluster.receiver.script(path_of[job], [503, 503])
        duration = 0.2 if retrying else 5.0 + 4.0 * (n - RETRYING_JOBS) / RUNNING_JOBS
        cluster.sim.add_job(job, size=jobs[job], duration_s=duration)
        cluster.enqueue(job, path_of[job], {"scenario": "lost"})
    retrying_paths = [path_of[job] for job in list(jobs)[:RETRYING_JOBS]]

    def retries_pending() -> bool:
        received = cluster.receiver.received()
        failed = {r.path for r in received if r.status_sent == 503}
        accepted = {r.path for r in received if r.status_sent == 200}
        return all(p in failed for p in retrying_paths) and not accepted.intersection(retrying_paths)

    wait_until(
        lambda: retries_pending() and cluster.active_watch_count() >= 30,
        60,
        "webhook retries waiting as countdowns and watches between polls",
    )
    cluster.processes[0].kill()
    deleted = cluster.drop_broker_messages()
    lost_at = time.time()
    items = snapshot(cluster)
    cluster.start_worker("lost-w2", concurrency=3, env_overrides=SETTINGS)
    worker_ready_at = time.time()

    watch_rearms(cluster, items, timeout=LEASE_S + GRACE_S + SWEEP_S + SLACK_S)
    wait_settled(cluster, jobs, GRACE_S + SWEEP_S + LEASE_S + SLACK_S)
    result = check_completed_deliveries(cluster, jobs, path_of)
    record_row(
        f"broker messages deleted ({deleted} queued or reserved; {len(items)} items re-armed)",
        jobs=len(jobs),
        events_expected=len(jobs),
        delivered=result.delivered,
        duplicates=result.duplicates,
        lost=len(jobs) - result.delivered,
        recover_s=result.last_arrival() - lost_at,
    )

    assert deleted >= len(items) // 2, "the deletion took the messages of the items"
    assert {item.kind for item in items if item.armed} == {"watch", "event"}, "lost polls and lost webhook retries both"
    never = [item.key for item in items if item.rearmed_at is None]
    assert not never, f"never re-armed: {never[:5]}"
    for item in items:
        assert item.rearmed_at is not None
        late = item.rearmed_at - item.latest_rearm(worker_ready_at)
        assert late <= 0, (
            f"{item.key} (due {item.due:.1f}, armed={item.armed}) re-armed {late:.1f} s later than "
            f"REARM_GRACE_S + SWEEP_INTERVAL_S (+{REARM_SLACK_S:g} s) allow"
        )
        if item.armed:
            # The sweep waits out the grace: a message merely late is not doubled.
            assert item.rearmed_at >= item.due + GRACE_S - SAMPLE_EVERY_S, f"{item.key} re-armed before its grace"
    assert result.delivered == len(jobs)
    assert all(outcomes == ["completed"] for outcomes in watch_outcomes(cluster, jobs).values())
