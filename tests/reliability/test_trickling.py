"""A receiver that answers a byte at a time: only the pool's hard time limit stops the step.

Each byte comes well inside WEBHOOK_TIMEOUT_S, so httpx never times out, and the bytes
before the status line are not the body the budget checks. The step delivering the
event must be killed by its task's time limit while it still holds the event (see
worker/runtime/leases.py); the sweep then re-arms the event once the lease has ended, the
step it wakes counts the attempt that never returned as a timeout, and the attempt after its
retry delay delivers it with the same webhook-id. Two steps never hold it at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.reliability.scenario import SLACK_S, Row, tally
from tests.support.cluster import Cluster, WorkerProcess, wait_until
from tests.support.settings import make_settings
from worker.runtime.leases import watch_lease_s, watch_time_limit_s

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
        f"receiver trickling its answer (a byte every {TRICKLE_S:g} s) past the step's time limit",
        jobs=1,
        events_expected=1,
        delivered=result.delivered,
        duplicates=result.duplicates,
        lost=1 - result.delivered,
        recover_s=second.at - first.at,
    )

    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body and first.verified and second.verified
    # The second attempt came only after the first step was killed and its lease had
    # ended: the event was never held by two steps at once.
    assert second.at - first.at >= TIME_LIMIT_S
    worker.wait_for_log("Hard time limit", 10)
    [watch] = cluster.watch_state(job)
    event = wait_until(
        lambda: (e := cluster.outbox().get(watch.events[0])) is not None and e.state == "delivered" and e,
        30,
        "the event is delivered",
    )
    # The killed step's attempt never returned: the next step counted it as a timeout, and
    # the attempt after its retry delay was delivered.
    assert [(a["ok"], a["status_code"], a["error"]) for a in event.attempts] == [
        (False, None, "timeout (the attempt never returned)"),
        (True, 200, None),
    ]
    assert worker.alive
    assert len(cluster.receiver.received(path)) == 2
