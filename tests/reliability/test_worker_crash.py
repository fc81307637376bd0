"""A worker killed with SIGKILL loses no watch and no event; SIGTERM hands its messages back.

Crash: two workers share 240 watches; one of them is killed (its whole process group, as
a host crash would) while more than 200 watches are active and slow deliveries are in
flight. Its reserved countdowns and running steps are gone with it. The survivor and the
sweep must still deliver every event, a repeat only ever carrying the same webhook-id,
within the bound the settings give: the broker's visibility timeout, plus the sweep's
re-arm period (REARM_GRACE_S + SWEEP_INTERVAL_S) and the lease of an interrupted step.

Warm shutdown: a worker holding countdown messages gets SIGTERM. It must hand them back
so that another worker runs them long before the visibility timeout or the sweep's grace
(both set to minutes in that test, so that nothing but the hand-back can explain it).
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

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
from tests.support.settings import make_settings
from worker.runtime.celeryconfig import celery_config

# Small, fast settings; the recovery bound below is derived from them.
CRASH_SETTINGS = {
    "POLL_INITIAL_DELAY_S": "0.5",
    "POLL_MAX_DELAY_S": "2",
    "BROKER_VISIBILITY_TIMEOUT_S": "6",
    "REARM_GRACE_S": "2",
    "SWEEP_INTERVAL_S": "1",
    "CHECK365_TIMEOUT_S": "2",
    "WEBHOOK_TIMEOUT_S": "3",
    "WEBHOOK_RETRY_DELAYS_S": "0.5,1,1,1,1",
    "WATCH_TIMEOUT_S": "120",
    "CHECK365_MAX_RPS": "1000",
}
# The lease of an interrupted step (worker/runtime/leases.py); the longer of the two counts.
LEASE_S = longest_lease_s(CRASH_SETTINGS)
RECOVERY_BOUND_S = (
    float(CRASH_SETTINGS["BROKER_VISIBILITY_TIMEOUT_S"])
    + float(CRASH_SETTINGS["REARM_GRACE_S"])
    + float(CRASH_SETTINGS["SWEEP_INTERVAL_S"])
    + LEASE_S
)

EARLY_JOBS = 40  # complete within 2 s; their receivers answer slowly, so deliveries are in flight at the kill
LATE_JOBS = 200  # complete 8-12 s after the start: active when the worker dies
SLOW_ANSWER_S = 1.5  # under WEBHOOK_TIMEOUT_S: slow, not failed


@pytest.fixture
def crash_cluster() -> Iterator[Cluster]:
    with Cluster() as cluster:
        starting = [
            cluster.start_worker("crash-w1", concurrency=4, env_overrides=CRASH_SETTINGS, wait=False),
            cluster.start_worker("crash-w2", concurrency=4, env_overrides=CRASH_SETTINGS, wait=False),
            cluster.start_beat("crash-beat", env_overrides=CRASH_SETTINGS, wait=False),
        ]
        for process in starting:
            process.wait_ready(60)
        yield cluster


def test_kill_9_of_a_worker_loses_no_watch_and_no_event(crash_cluster: Cluster, record_row: Callable[..., Row]) -> None:
    cluster = crash_cluster
    survivor, victim = cluster.processes[0], cluster.processes[1]
    jobs: dict[str, int] = {}
    path_of: dict[str, str] = {}
    ends: list[float] = []
    for n in range(EARLY_JOBS + LATE_JOBS):
        job = f"crash-{n:03d}"
        jobs[job] = 1 + n % 3
        path_of[job] = f"/hooks/{job}"
        early = n < EARLY_JOBS
        duration = 0.5 + 1.5 * n / EARLY_JOBS if early else 8.0 + 4.0 * (n - EARLY_JOBS) / LATE_JOBS
        sim_job = cluster.sim.add_job(job, size=jobs[job], duration_s=duration)
        ends.append(sim_job.created_at + sim_job.duration_s)
        if early:
            cluster.receiver.default(path_of[job], 200, delay_s=SLOW_ANSWER_S)
    for job in jobs:
        cluster.enqueue(job, path_of[job], {"scenario": "crash"})

    def victims_deliveries_in_flight() -> int:
        ports = victim.local_tcp_ports()
        return sum(r.client_port in ports for r in cluster.receiver.in_flight())

    # The victim itself is in the middle of a delivery: the receiver has it, the victim will never know.
    wait_until(
        lambda: cluster.active_watch_count() >= 200 and victims_deliveries_in_flight() >= 1,
        60,
        "200 active watches and a delivery of the victim in flight",
    )
    active_at_kill = cluster.active_watch_count()
    in_flight_at_kill = len(cluster.receiver.in_flight())
    victim.kill()
    killed_at = time.time()
    assert not victim.alive

    # Every event arrives; the outbox then has nothing left to send (so no repeat can follow).
    budget = RECOVERY_BOUND_S + SLACK_S + 15
    wait_settled(cluster, jobs, budget)
    result = check_completed_deliveries(cluster, jobs, path_of)
    recover_s = result.last_arrival() - killed_at
    record_row(
        f"worker kill -9 ({active_at_kill} watches active, {in_flight_at_kill} deliveries in flight)",
        jobs=len(jobs),
        events_expected=len(jobs),
        delivered=result.delivered,
        duplicates=result.duplicates,
        lost=len(jobs) - result.delivered,
        recover_s=recover_s,
    )

    assert result.delivered == len(jobs)
    assert all(outcomes == ["completed"] for outcomes in watch_outcomes(cluster, jobs).values())
    assert survivor.alive
    # The victim had deliveries in flight: the receiver got them, the worker never recorded them.
    assert result.duplicates >= 1, "a delivery cut by the kill is repeated, under its own webhook-id"
    # Jobs still running at the kill finish by themselves; recovery is what comes after.
    late_by = result.last_arrival() - max(killed_at, *ends)
    assert late_by <= RECOVERY_BOUND_S + SLACK_S, (
        f"the last event came {late_by:.1f} s after the kill or the last completion; "
        f"the settings bound recovery to {RECOVERY_BOUND_S:g} s (+{SLACK_S:g} s slack)"
    )


# --------------------------------------------------------------------------- warm shutdown

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
# Minutes: if the messages came back through the visibility timeout or the sweep, the test would time out.
HAND_BACK_SETTINGS = {
    "BROKER_VISIBILITY_TIMEOUT_S": "600",
    "REARM_GRACE_S": "300",
    # Long enough for the taker to start and the holder to be signalled before the
    # first countdown falls due, on a loaded machine too (3 s was not: the holder then
    # ran polls itself).
    "POLL_INITIAL_DELAY_S": "15",
    "POLL_MAX_DELAY_S": "20",
    "WATCH_TIMEOUT_S": "120",
    "CHECK365_MAX_RPS": "1000",
}
HAND_BACK_JOBS = 30
# Every poll ends with one of these lines at INFO (a poll that finishes its watch is
# announced by the watch's outcome line).
POLL_LINES = {"poll_done", "poll_failed", "poll_rejected", "watch_completed", "watch_failed", "watch_timed_out"}


def compose_worker_setting(pattern: str) -> str:
    """A value of the worker service in docker-compose.yml (found by a regex with one group)."""
    match = re.search(pattern, COMPOSE_FILE.read_text(encoding="utf-8"))
    assert match, f"docker-compose.yml has no {pattern!r}"
    return match.group(1)


@pytest.mark.parametrize(
    ("remap", "label"),
    [("SIGQUIT", "SIGTERM as in the container (REMAP_SIGTERM=SIGQUIT)"), (None, "plain SIGTERM (warm shutdown)")],
    ids=["container", "plain"],
)
def test_sigterm_hands_reserved_countdowns_back_to_another_worker(
    remap: str | None, label: str, record_row: Callable[..., Row]
) -> None:
    soft_shutdown_s = float(celery_config(make_settings(process="cli"))["worker_soft_shutdown_timeout"])
    stop_grace_s = float(compose_worker_setting(r"stop_grace_period:\s*(\d+)s"))
    assert compose_worker_setting(r"REMAP_SIGTERM:\s*(\S+)") == "SIGQUIT"
    with Cluster() as cluster:
        # No beat: nothing but the worker itself can bring its messages back in time.
        holder = cluster.start_worker(
            "holder", concurrency=2, env_overrides={**HAND_BACK_SETTINGS, "REMAP_SIGTERM": remap}
        )
        jobs = {f"handback-{n:02d}": 1 + n % 3 for n in range(HAND_BACK_JOBS)}
        path_of = {job: f"/hooks/{job}" for job in jobs}
        for job, size in jobs.items():
            cluster.sim.add_job(job, size=size, duration_s=0.0)
            cluster.enqueue(job, path_of[job])
        # Every watch has started and the holder keeps each first poll as a countdown in memory.
        wait_until(
            lambda: (
                cluster.active_watch_count() == HAND_BACK_JOBS
                and cluster.unacked_count() == HAND_BACK_JOBS
                and cluster.queue_length() == 0
            ),
            30,
            "the holder has reserved every first poll",
        )
        taker = cluster.start_worker("taker", concurrency=2, env_overrides=HAND_BACK_SETTINGS)
        assert cluster.unacked_count() == HAND_BACK_JOBS, "the holder must still hold every countdown"

        holder.send_signal(signal.SIGTERM)  # to the main process only, as Docker does
        signalled_at = time.time()
        exit_code = holder.wait_exit(stop_grace_s + SLACK_S)
        exited_after = time.time() - signalled_at
        wait_settled(cluster, jobs, soft_shutdown_s + SLACK_S + 10)
        result = check_completed_deliveries(cluster, jobs, path_of)
        recover_s = result.last_arrival() - signalled_at
        record_row(
            f"{label}: countdowns handed back",
            jobs=len(jobs),
            events_expected=len(jobs),
            delivered=result.delivered,
            duplicates=result.duplicates,
            lost=len(jobs) - result.delivered,
            recover_s=recover_s,
        )

        assert exit_code == 0
        # Docker sends SIGKILL stop_grace_period after SIGTERM: the shutdown must be over by then.
        assert exited_after < stop_grace_s, f"the worker took {exited_after:.1f} s to stop"
        polled_by = {
            name: {r.get("watch_id") for r in process.log_records() if r.get("event") in POLL_LINES}
            for name, process in (("holder", holder), ("taker", taker))
        }
        assert polled_by["holder"] == set(), "the holder ran no poll: it only held the countdowns"
        assert len(polled_by["taker"]) == HAND_BACK_JOBS
        # The soft shutdown (only with the remap) waits its timeout before handing back.
        waited = soft_shutdown_s if remap == "SIGQUIT" else 0.0
        first_poll_s = float(HAND_BACK_SETTINGS["POLL_INITIAL_DELAY_S"])
        assert recover_s <= waited + first_poll_s + SLACK_S
        assert (
            recover_s
            < min(float(HAND_BACK_SETTINGS["BROKER_VISIBILITY_TIMEOUT_S"]), float(HAND_BACK_SETTINGS["REARM_GRACE_S"]))
            / 5
        )
