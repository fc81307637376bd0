"""One bad receiver must not starve the others: per-endpoint isolation, end to end.

A hanging receiver (never answers inside WEBHOOK_TIMEOUT_S) and a slow one (answers 200
inside the timeout, slowly), each with at least 90 events pending, beside a healthy receiver
on its own port. Measured in the same run, first with the healthy receiver alone, then
beside the two bad ones: the healthy webhooks arrive within 2 s of their latency alone, and
the polls of running jobs stay within 1 s of their due time (p99). Real Redis, real worker
processes, real receivers on 127.0.0.1 verifying every signature with ``standardwebhooks``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from benchmarks.capacity import lateness, planned_polls_ours
from benchmarks.common import percentile
from tests.support.cluster import Cluster, WorkerProcess, wait_until
from worker.delivery.urls import endpoint_key
from worker.intake.enqueue import enqueue_watch
from worker.local.receiver import Receiver
from worker.state.endpoints import EndpointState

pytestmark = pytest.mark.integration

WORKERS = 2
CONCURRENCY = 4
# Two bad endpoints at their cap take a quarter of the pool each at most: what is left
# serves the healthy receiver and the polls.
CAP = WORKERS * CONCURRENCY // 4
SETTINGS = {
    "POLL_INITIAL_DELAY_S": "0.5",
    "POLL_MAX_DELAY_S": "2",
    "WEBHOOK_TIMEOUT_S": "2",
    # Long enough that no bad event is dead-lettered while the test measures.
    "WEBHOOK_RETRY_DELAYS_S": "2,4,8,16,32,64,128",
    "WEBHOOK_ENDPOINT_MAX_IN_FLIGHT": str(CAP),
    "WEBHOOK_BREAKER_THRESHOLD": "5",
    "WEBHOOK_BREAKER_COOLDOWN_S": "5",
    "WATCH_TIMEOUT_S": "300",
}
BAD_EVENTS = 90
# More are enqueued than must be pending: the slow receiver drains while they are created.
ENQUEUED_BAD = 120
HEALTHY_JOBS = 20
RUNNING_JOBS = 20
RUNNING_FOR_S = 10.0
SLOW_ANSWER_S = 1.5  # inside the 2 s timeout
HANG_S = 3600.0


@pytest.fixture(scope="module")
def isolated() -> Iterator[tuple[Cluster, Receiver, Receiver, list[WorkerProcess]]]:
    with Cluster() as cluster:
        hanging, slow = Receiver(cluster.secret), Receiver(cluster.secret)
        hanging.start()
        slow.start()
        try:
            workers = [
                cluster.start_worker(f"iso{n}", concurrency=CONCURRENCY, env_overrides=SETTINGS, wait=False)
                for n in range(WORKERS)
            ]
            beat = cluster.start_beat("iso-beat", env_overrides=SETTINGS, wait=False)
            for process in [*workers, beat]:
                process.wait_ready(60)
            yield cluster, hanging, slow, workers
        finally:
            hanging.stop()
            slow.stop()


def most_at_once(receiver: Receiver, lasting_s: float) -> int:
    """The most attempts a receiver saw begin within one attempt's length (each lasts ``lasting_s``):
    how many were in flight at once, seen from the receiver's side."""
    starts = sorted(r.at for r in receiver.received())
    window = lasting_s * 0.9  # a freed slot's next attempt starts just after the previous one ended
    return max((sum(1 for t in starts if at <= t < at + window) for at in starts), default=0)


def measure(cluster: Cluster, workers: list[WorkerProcess], phase: str) -> tuple[list[float], list[float]]:
    """Healthy webhooks and running polls: seconds from each enqueue of a job complete at once to
    its webhook, and the lateness of every poll of jobs that keep running meanwhile."""
    start = time.time()
    for n in range(RUNNING_JOBS):
        job = f"{phase}-running-{n}"
        cluster.sim.add_job(job, size=2, duration_s=RUNNING_FOR_S)
        cluster.enqueue(job, f"/hooks/{job}")
    enqueued = {}
    for n in range(HEALTHY_JOBS):
        job = f"{phase}-healthy-{n}"
        cluster.sim.add_job(job, size=2, duration_s=0.0)
        enqueued[f"/hooks/{job}"] = time.time()
        cluster.enqueue(job, f"/hooks/{job}")
    running = {f"/hooks/{phase}-running-{n}" for n in range(RUNNING_JOBS)}
    received = cluster.receiver.wait_for(lambda rx: enqueued.keys() | running <= {r.path for r in rx}, 120)
    end = time.time()
    first: dict[str, float] = {}
    for item in received:
        if item.path in enqueued and item.path not in first:
            assert item.verified, item.error
            first[item.path] = item.at
    polls: dict[str, list[float]] = {}
    for request in cluster.sim.requests():
        if request.job_id.startswith(f"{phase}-running-"):
            polls.setdefault(request.job_id, []).append(request.at)
    late = [
        value
        for job, plans in planned_polls_ours(workers, f"{phase}-running-").items()
        for value in lateness(plans, polls.get(job, []), (start, end), end)
    ]
    assert len(late) >= RUNNING_JOBS * 3
    return [first[path] - at for path, at in enqueued.items()], late


def test_a_hanging_and_a_slow_receiver_leave_the_healthy_one_and_the_polls_on_time(
    isolated: tuple[Cluster, Receiver, Receiver, list[WorkerProcess]],
) -> None:
    cluster, hanging, slow, workers = isolated
    alone, late_alone = measure(cluster, workers, "alone")

    settings = cluster.client_settings(**SETTINGS)
    for n in range(ENQUEUED_BAD):
        hanging.default(f"/hang/{n}", 200, delay_s=HANG_S)
        slow.default(f"/slow/{n}", 200, delay_s=SLOW_ANSWER_S)
    for n in range(ENQUEUED_BAD):
        for name, receiver in (("hang", hanging), ("slow", slow)):
            job = f"{name}-{n}"
            cluster.sim.add_job(job, size=2, duration_s=0.0)
            enqueue_watch(job, f"{receiver.url}/{name}/{n}", None, settings=settings)
    state = EndpointState(cluster.redis(), due_key="", rearm_grace_s=0)
    bad = {endpoint_key(hanging.url), endpoint_key(slow.url)}

    def backlogs() -> dict[str, int]:
        return {v.endpoint: v.backlog for v in state.views() if v.endpoint in bad}

    wait_until(lambda: all(n >= BAD_EVENTS for n in backlogs().values()) and len(backlogs()) == 2, 60, "backlogs")

    # Jobs that keep running while the bad receivers are backlogged: their polls are measured.
    beside, late = measure(cluster, workers, "beside")
    still = backlogs()
    print(
        f"\nhealthy webhook latency alone: max {max(alone):.2f} s; beside the bad receivers: max {max(beside):.2f} s"
        f"\npoll lateness p99 alone {percentile(late_alone, 0.99):.3f} s, beside the bad receivers"
        f" {percentile(late, 0.99):.3f} s over {len(late)} polls"
        f"\nbacklogs at the end: {still}; attempts at once: hanging {most_at_once(hanging, 2.0)},"
        f" slow {most_at_once(slow, SLOW_ANSWER_S)} (cap {CAP})"
    )
    # The bad receivers were still backlogged when everything had been measured.
    assert still[endpoint_key(hanging.url)] >= BAD_EVENTS
    assert still[endpoint_key(slow.url)] > 0
    # Within 2 s of the latency alone, and polls within 1 s of their time (p99): measured against
    # the same run's figures alone, so that a busy machine's own lateness is not blamed on them.
    assert max(beside) <= max(alone) + 2.0
    assert percentile(late, 0.99) <= max(1.0, percentile(late_alone, 0.99) + 1.0)
    # Each bad endpoint held at most its cap of the pool, as its receiver saw the attempts come.
    assert most_at_once(hanging, 2.0) <= CAP
    assert most_at_once(slow, SLOW_ANSWER_S) <= CAP
    views = {v.endpoint: v for v in state.views()}
    assert views[endpoint_key(hanging.url)].state in ("open", "half_open")
    assert views[endpoint_key(slow.url)].state == "closed"
