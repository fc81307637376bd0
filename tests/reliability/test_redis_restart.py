"""Redis, broker and state store at once, crashes and comes back: nothing is lost.

Redis runs with an append-only file, as docker-compose.yml runs it, and is killed with
SIGKILL while watches are active, deliveries are in flight and retries are pending, then
started again on the same port. The workers and beat are not touched: they must reconnect
by themselves, and every event must arrive within the bound the settings give (the
broker's visibility timeout, the sweep's re-arm period and the lease of a step that the
outage cut short).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

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

SETTINGS = {
    "POLL_INITIAL_DELAY_S": "0.3",
    "POLL_MAX_DELAY_S": "1.5",
    "BROKER_VISIBILITY_TIMEOUT_S": "6",
    "REARM_GRACE_S": "2",
    "SWEEP_INTERVAL_S": "1",
    "CHECK365_TIMEOUT_S": "2",
    "WEBHOOK_TIMEOUT_S": "3",
    "WEBHOOK_RETRY_DELAYS_S": "0.5,1,1,1,2,2,2",
    "WATCH_TIMEOUT_S": "120",
    "CHECK365_MAX_RPS": "1000",
}
LEASE_S = longest_lease_s(SETTINGS)
RECOVERY_BOUND_S = (
    float(SETTINGS["BROKER_VISIBILITY_TIMEOUT_S"])
    + float(SETTINGS["REARM_GRACE_S"])
    + float(SETTINGS["SWEEP_INTERVAL_S"])
    + LEASE_S
)
DOWN_S = 1.0

SLOW_JOBS = 10  # complete at once; their receiver answers after 1 s, so deliveries are in flight
FAILING_JOBS = 10  # complete at once; their receiver fails twice first, so retries are pending
LATE_JOBS = 40  # still running when Redis goes down


def state_keys_of(cluster: Cluster) -> set[bytes]:
    """The keys of every watch and event (finished ones stay for STATE_TTL_S)."""
    client = cluster.redis()
    return {*client.scan_iter("check365:watch:*", count=1000), *client.scan_iter("check365:event:*", count=1000)}


@pytest.fixture
def aof_cluster() -> Iterator[Cluster]:
    with Cluster(appendonly=True) as cluster:
        starting = [
            cluster.start_worker("redis-w1", concurrency=3, env_overrides=SETTINGS, wait=False),
            cluster.start_worker("redis-w2", concurrency=3, env_overrides=SETTINGS, wait=False),
            cluster.start_beat("redis-beat", env_overrides=SETTINGS, wait=False),
        ]
        for process in starting:
            process.wait_ready(60)
        yield cluster


def test_a_redis_crash_and_restart_loses_nothing_and_needs_no_process_restart(
    aof_cluster: Cluster, record_row: Callable[..., Row]
) -> None:
    cluster = aof_cluster
    pids = {process.name: process.pid for process in cluster.processes}
    jobs: dict[str, int] = {}
    path_of: dict[str, str] = {}
    ends: list[float] = []
    durations: dict[str, float] = {}
    for n in range(SLOW_JOBS + FAILING_JOBS + LATE_JOBS):
        job = f"redis-{n:02d}"
        jobs[job] = 1 + n % 4
        path_of[job] = f"/hooks/{job}"
        if n < SLOW_JOBS:
            durations[job] = 0.3
            cluster.receiver.default(path_of[job], 200, delay_s=1.0)
        elif n < SLOW_JOBS + FAILING_JOBS:
            durations[job] = 0.3
            cluster.receiver.script(path_of[job], [503, 503])
        else:
            durations[job] = 4.0 + 4.0 * n / (SLOW_JOBS + FAILING_JOBS + LATE_JOBS)
        # Running until every watch is enqueued: on a loaded machine enqueueing takes seconds,
        # and the first jobs' deliveries were over before the last watches started.
        cluster.sim.add_job(job, size=jobs[job], duration_s=3600.0)
        cluster.enqueue(job, path_of[job], {"scenario": "redis-restart"})
    for job, duration in durations.items():
        sim_job = cluster.sim.add_job(job, size=jobs[job], duration_s=duration)  # its clock starts now
        ends.append(sim_job.created_at + sim_job.duration_s)

    def failed_once() -> bool:
        return any(r.status_sent == 503 for r in cluster.receiver.received())

    wait_until(
        lambda: cluster.active_watch_count() >= LATE_JOBS and cluster.receiver.in_flight() and failed_once(),
        60,
        "watches active, deliveries in flight and retries pending",
    )
    active_before = cluster.active_watch_count()
    pending_before = cluster.pending_event_count()
    in_flight = len(cluster.receiver.in_flight())
    state_keys = state_keys_of(cluster)
    crashed_at = time.time()
    cluster.redis_server.restart(kill=True, down_s=DOWN_S)

    # Written with fsync on every command, the state is all there after the restart.
    missing = state_keys - state_keys_of(cluster)
    assert not missing, f"{len(missing)} watch/event keys did not survive the restart, e.g. {sorted(missing)[:3]}"
    wait_settled(cluster, jobs, RECOVERY_BOUND_S + SLACK_S + 15)
    result = check_completed_deliveries(cluster, jobs, path_of)
    record_row(
        f"Redis SIGKILL + restart, AOF ({active_before} watches active, {pending_before} events pending, "
        f"{in_flight} in flight)",
        jobs=len(jobs),
        events_expected=len(jobs),
        delivered=result.delivered,
        duplicates=result.duplicates,
        lost=len(jobs) - result.delivered,
        recover_s=result.last_arrival() - crashed_at,
    )

    assert result.delivered == len(jobs)
    assert all(outcomes == ["completed"] for outcomes in watch_outcomes(cluster, jobs).values())
    assert cluster.outbox().dead_letters() == []
    # Nobody restarted a process: the same ones are still up, and they did the work after the restart.
    assert {process.name: process.pid for process in cluster.processes if process.alive} == pids
    late_by = result.last_arrival() - max(crashed_at + DOWN_S, *ends)
    assert late_by <= RECOVERY_BOUND_S + SLACK_S, (
        f"the last event came {late_by:.1f} s after Redis was back (or the last completion); "
        f"the settings bound recovery to {RECOVERY_BOUND_S:g} s (+{SLACK_S:g} s slack)"
    )
