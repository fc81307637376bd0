"""A receiver that answers a byte at a time: only the step's own deadline stops the attempt.

Each byte comes well inside WEBHOOK_TIMEOUT_S, so httpx's per-read timeout never fires,
and the bytes before the status line are not the body the budget checks. The step's
deadline (worker/runtime/deadlines.py) bounds every read by the attempt's budget, twice
WEBHOOK_TIMEOUT_S: the attempt ends there as a timeout, is counted, and the attempt after its
retry delay delivers the event with the same webhook-id. The step never outlives its lease.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime

import pytest

from tests.reliability.scenario import SLACK_S, Row, tally
from tests.support.cluster import Cluster, WorkerProcess, wait_until
from tests.support.settings import make_settings
from worker.runtime.leases import watch_lease_s, watch_time_limit_s, webhook_budget_s

SETTINGS = {
    "POLL_INITIAL_DELAY_S": "0.2",
    "POLL_MAX_DELAY_S": "1",
    "SWEEP_INTERVAL_S": "1",
    "REARM_GRACE_S": "3",
    "CHECK365_TIMEOUT_S": "1",
    "WEBHOOK_TIMEOUT_S": "1",
    "WEBHOOK_RETRY_DELAYS_S": "0.5,0.5",
    "WATCH_TIMEOUT_S": "60",
    "CHECK365_MAX_RPS": "1000",
}
LIMITS = make_settings(SETTINGS, process="cli")
TIME_LIMIT_S = watch_time_limit_s(LIMITS)  # the step that finishes the watch delivers its single event
BUDGET_S = webhook_budget_s(LIMITS)
LEASE_S = watch_lease_s(LIMITS)
TRICKLE_S = 0.5  # a byte every half second: inside the 1 s read timeout, 50 s for the whole answer


@pytest.fixture(scope="module")
def trickle_cluster() -> Iterator[tuple[Cluster, WorkerProcess]]:
    with Cluster() as cluster:
        worker = cluster.start_worker("trickle", concurrency=2, env_overrides=SETTINGS, wait=False)
        beat = cluster.start_beat("trickle-beat", env_overrides=SETTINGS, wait=False)
        worker.wait_ready(60)
        beat.wait_ready(60)
        yield cluster, worker


def test_a_receiver_trickling_its_answer_is_cut_off_by_the_time_limit_and_the_event_delivered_once_after(
    trickle_cluster: tuple[Cluster, WorkerProcess], record_row: Callable[..., Row]
) -> None:
    cluster, worker = trickle_cluster
    job, path = "trickle-1", "/hooks/trickle-1"
    cluster.receiver.script(path, [(200, {}, 0.0, TRICKLE_S)])  # then 200 at once
    cluster.sim.add_job(job, size=2, duration_s=0.0)
    cluster.enqueue(job, path, {"scenario": "trickle"})

    bound = TIME_LIMIT_S + LEASE_S + 2 * float(SETTINGS["SWEEP_INTERVAL_S"]) + SLACK_S
    cluster.receiver.wait_for(lambda rx: len([r for r in rx if r.path == path]) >= 2, bound)
    first, second = cluster.receiver.received(path)[:2]
    result = tally([first, second], [path])
    record_row(
        f"receiver trickling its answer (a byte every {TRICKLE_S:g} s), cut at the attempt's budget",
        jobs=1,
        events_expected=1,
        delivered=result.delivered,
        duplicates=result.duplicates,
        lost=1 - result.delivered,
        recover_s=second.at - first.at,
    )

    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body and first.verified and second.verified
    [watch] = cluster.watch_state(job)
    event = wait_until(
        lambda: (e := cluster.outbox().get(watch.events[0])) is not None and e.state == "delivered" and e,
        30,
        "the event is delivered",
    )
    [cut, delivered] = event.attempts
    assert (cut["ok"], cut["status_code"], cut["error"]) == (False, None, "timeout")
    # The first attempt was cut at its budget, long before the step's lease ended, and the
    # second arrived after it ended: never two attempts at once. (When the first arrived
    # after its start is the receiver's business: the budget runs from the start.)
    assert BUDGET_S - 0.1 <= cut["duration_ms"] / 1000 < BUDGET_S + 2.0
    cut_ended = datetime.fromisoformat(cut["at"]).timestamp() + cut["duration_ms"] / 1000
    assert cut_ended - 0.005 <= second.at
    assert second.at - first.at < LEASE_S
    assert (delivered["ok"], delivered["status_code"]) == (True, 200)
    assert worker.alive
    assert len(cluster.receiver.received(path)) == 2


FOREVER = {**SETTINGS, "WEBHOOK_ENDPOINT_MAX_IN_FLIGHT": "2", "WEBHOOK_BREAKER_THRESHOLD": "5"}
FOREVER_EVENTS = 5


def test_a_receiver_that_trickles_forever_ends_in_the_dead_letters_holding_at_most_its_cap(
    record_row: Callable[..., Row],
) -> None:
    with Cluster() as cluster:
        worker = cluster.start_worker("forever", concurrency=4, env_overrides=FOREVER, wait=False)
        beat = cluster.start_beat("forever-beat", env_overrides=FOREVER, wait=False)
        worker.wait_ready(60)
        beat.wait_ready(60)
        paths = [f"/hooks/forever-{n}" for n in range(FOREVER_EVENTS)]
        for n, path in enumerate(paths):
            # Every attempt trickles: more answers queued than attempts can be made.
            cluster.receiver.script(path, [(200, {}, 0.0, TRICKLE_S)] * 10)
            cluster.sim.add_job(f"forever-{n}", size=2, duration_s=0.0)
        started = time.time()
        for n, path in enumerate(paths):
            cluster.enqueue(f"forever-{n}", path)

        most = 0
        outbox = cluster.outbox()
        # Each event: at most three attempts, each cut off by the time limit, then the lease.
        bound = 3 * (TIME_LIMIT_S + LEASE_S + 2 * float(SETTINGS["SWEEP_INTERVAL_S"])) + SLACK_S
        while len(outbox.dead_letters()) < FOREVER_EVENTS:
            most = max(most, len(cluster.receiver.in_flight()))
            assert time.time() - started < bound, f"not all dead-lettered within {bound:g} s"
            time.sleep(0.1)
        took = time.time() - started
        dead = [outbox.get(webhook_id) for webhook_id in outbox.dead_letters()]
        record_row(
            "receiver trickling forever: dead-lettered after the schedule, at most the cap (2) at once",
            jobs=FOREVER_EVENTS,
            events_expected=FOREVER_EVENTS,
            delivered=0,
            duplicates=0,
            lost=FOREVER_EVENTS - len(dead),
            recover_s=took,
        )
        assert most <= 2
        assert len(cluster.receiver.received()) >= 2
        for event in dead:
            assert event is not None
            assert event.state == "dead"
            attempts = [a for a in event.attempts if "held" not in a]
            # Every attempt made was cut off and counted as a timeout by the step after it.
            # Each attempt cut at its budget by the step's own deadline (or, were its worker
            # killed, counted as one that never returned).
            assert all(a["error"] in ("timeout", "timeout (the attempt never returned)") for a in attempts), attempts
            assert event.last_error is not None
            assert event.last_error.startswith(("retries exhausted: timeout", "held past the retry schedule"))
        assert any(e is not None and e.last_error.startswith("retries exhausted") for e in dead)  # type: ignore[union-attr]
        assert worker.alive
