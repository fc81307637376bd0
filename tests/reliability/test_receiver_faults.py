"""Receivers that fail, each handled as the contract says.

Complements tests/integration/test_delivery.py (503 with Retry-After, 410, 302, 500 until
dead-lettered and a replay of one, an unreachable port): here a receiver that refuses
connections for a whole minute, one that answers slower than WEBHOOK_TIMEOUT_S, the rest
of the 3xx/4xx/5xx family (only 410 stops delivery), and the dead-letter CLI end to end
(list, show, replay one, replay --all).

The minute of refused connections runs in the background while the other tests run: it
starts with the module and its test comes last.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest

from tests.reliability.scenario import SLACK_S, Row, accepted_ids_by_path, tally
from tests.support.cluster import Cluster, WorkerProcess, wait_until
from worker.intake.enqueue import enqueue_watch
from worker.local.receiver import Receiver
from worker.state.outbox import StoredEvent

WEBHOOK_TIMEOUT_S = 1.0
COMMON = {
    "POLL_INITIAL_DELAY_S": "0.2",
    "POLL_MAX_DELAY_S": "1",
    "SWEEP_INTERVAL_S": "1",
    "REARM_GRACE_S": "3",
    "WEBHOOK_TIMEOUT_S": str(WEBHOOK_TIMEOUT_S),
    "WATCH_TIMEOUT_S": "60",
    "CHECK365_MAX_RPS": "1000",
}
# Retries that outlast a minute: 1+2+4+8 s, then every 10 s up to 95 s in all. The delays
# longer than POLL_MAX_DELAY_S wait in Redis and are dispatched by the sweep.
PATIENT_DELAYS = (1, 2, 4, 8, 10, 10, 10, 10, 10, 10, 10)
PATIENT = {**COMMON, "WEBHOOK_RETRY_DELAYS_S": ",".join(map(str, PATIENT_DELAYS))}
FAST_DELAYS = (0.3, 0.3, 0.3)
FAST = {**COMMON, "WEBHOOK_RETRY_DELAYS_S": ",".join(map(str, FAST_DELAYS))}
FAST_QUEUE = "rx-fast"
JITTER = 0.1  # delivery.py's positive jitter: a retry comes at most this fraction later

OUTAGE_S = 60.0
OUTAGE_JOBS = 5
TIMEOUT = 30.0


@dataclass
class Outage:
    """A receiver whose port refuses connections, and is served again OUTAGE_S later."""

    port: int
    stopped_at: float
    jobs: list[str]
    back_at: float | None = None
    receiver: Receiver | None = None


@dataclass
class System:
    cluster: Cluster
    patient: WorkerProcess
    fast: WorkerProcess
    outage: Outage


@pytest.fixture(scope="module")
def system() -> Iterator[System]:
    with Cluster() as cluster:
        starting = [
            # The patient worker consumes the default queue, where beat sends the sweep.
            cluster.start_worker("rx-patient", concurrency=2, env_overrides=PATIENT, wait=False),
            cluster.start_worker("rx-fast", concurrency=3, env_overrides=FAST, queue=FAST_QUEUE, wait=False),
            cluster.start_beat("rx-beat", env_overrides=PATIENT, wait=False),
        ]
        for process in starting:
            process.wait_ready(60)
        # A receiver that ran once on this port and is gone: connections are refused.
        gone = Receiver(cluster.secret).start()
        port = int(gone.url.rsplit(":", 1)[1])
        gone.stop()
        outage = Outage(port, time.time(), [f"outage-{n}" for n in range(OUTAGE_JOBS)])
        settings = cluster.client_settings()
        for job in outage.jobs:
            cluster.sim.add_job(job, size=2, duration_s=0.0)
            enqueue_watch(job, f"http://127.0.0.1:{port}/hooks/{job}", {"scenario": "outage"}, settings=settings)
        system = System(cluster, starting[0], starting[1], outage)
        try:
            yield system
        finally:
            if outage.receiver is not None:
                outage.receiver.stop()


def start_fast_job(cluster: Cluster, job: str, size: int = 2) -> str:
    """A job that completes at the first poll, watched by the fast worker; its callback path."""
    path = f"/hooks/{job}"
    cluster.sim.add_job(job, size=size, duration_s=0.0)
    cluster.enqueue(job, path, {"scenario": "receiver-faults"}, CHECK365_QUEUE=FAST_QUEUE)
    return path


def event_of(cluster: Cluster, job: str) -> str:
    def webhook_id() -> str | None:
        watches = cluster.watch_state(job)
        return watches[0].events[0] if watches and watches[0].events else None

    found: str = wait_until(webhook_id, TIMEOUT, f"the event of {job} exists")
    return found


def stored(cluster: Cluster, webhook_id: str, state: str, timeout: float = TIMEOUT) -> StoredEvent:
    outbox = cluster.outbox()

    def in_state() -> StoredEvent | None:
        event = outbox.get(webhook_id)
        return event if event is not None and event.state == state else None

    found: StoredEvent = wait_until(in_state, timeout, f"event {webhook_id} is {state}")
    return found


def attempt_times(event: StoredEvent) -> list[float]:
    return [datetime.fromisoformat(a["at"].replace("Z", "+00:00")).timestamp() for a in event.attempts]


# --------------------------------------------------------------------------- slow receiver


def test_an_answer_slower_than_the_timeout_is_a_failed_attempt_and_the_retry_keeps_the_webhook_id(
    system: System, record_row: Callable[..., Row]
) -> None:
    cluster = system.cluster
    jobs = [f"slow-{n}" for n in range(4)]
    paths = {}
    for job in jobs:
        # Recorded at once, answered a second after the worker gave up.
        cluster.receiver.script(f"/hooks/{job}", [(200, {}, WEBHOOK_TIMEOUT_S + 1.0)])
        paths[job] = start_fast_job(cluster, job)
    events = {job: stored(cluster, event_of(cluster, job), "delivered") for job in jobs}
    received = cluster.receiver.received()
    result = tally(received, paths.values())
    gaps = [rs[1].at - rs[0].at for rs in result.accepted.values() if len(rs) > 1]
    record_row(
        f"receiver slower than WEBHOOK_TIMEOUT_S ({WEBHOOK_TIMEOUT_S:g} s)",
        jobs=len(jobs),
        events_expected=len(jobs),
        delivered=result.delivered,
        duplicates=result.duplicates,
        lost=len(jobs) - result.delivered,
        recover_s=max(gaps, default=None),
    )

    assert result.delivered == len(jobs)
    for job, event in events.items():
        requests = [r for r in received if r.path == paths[job]]
        # The receiver processed both: it must deduplicate by webhook-id, as the contract says.
        assert len(requests) == 2 and {r.headers["webhook-id"] for r in requests} == {event.webhook_id}
        assert requests[0].body == requests[1].body and all(r.verified for r in requests)
        first, second = event.attempts
        assert (first["ok"], first["error"], second["ok"], second["status_code"]) == (False, "timeout", True, 200)
        # The worker waited its timeout, not the receiver's answer.
        assert WEBHOOK_TIMEOUT_S <= first["duration_ms"] / 1000 < WEBHOOK_TIMEOUT_S + 1.0
    assert result.duplicates == len(jobs)


# --------------------------------------------------------------------------- the status family

# Every non-2xx answer but 410 is a failed attempt, retried (a redirect is never followed).
RETRIED = (301, 302, 303, 307, 308, 400, 401, 403, 404, 405, 409, 413, 422, 429, 500, 501, 502, 504)


def test_every_non_2xx_answer_but_410_is_retried_and_410_stops_at_once(
    system: System, record_row: Callable[..., Row]
) -> None:
    cluster = system.cluster
    paths = {}
    for status in RETRIED:
        job = f"status-{status}"
        cluster.receiver.script(f"/hooks/{job}", [(status, {"Location": cluster.callback_url("/elsewhere")})])
        paths[job] = start_fast_job(cluster, job)
    gone_job = "status-500-then-410"
    cluster.receiver.script(f"/hooks/{gone_job}", [500, 410])
    gone_path = start_fast_job(cluster, gone_job)

    retried = {job: stored(cluster, event_of(cluster, job), "delivered") for job in paths}
    gone = stored(cluster, event_of(cluster, gone_job), "dead")
    time.sleep(max(FAST_DELAYS) * (1 + JITTER) + float(COMMON["SWEEP_INTERVAL_S"]) + 1)  # a stray retry would show
    received = cluster.receiver.received()
    result = tally(received, paths.values())
    record_row(
        f"receiver 3xx/4xx/5xx then 2xx ({len(RETRIED)} statuses), 5xx then 410",
        jobs=len(paths) + 1,
        events_expected=len(paths),
        delivered=result.delivered,
        duplicates=result.duplicates,
        lost=len(paths) - result.delivered,
        recover_s=None,
    )

    for job, event in retried.items():
        status = int(job.rsplit("-", 1)[1])
        answers = [r.status_sent for r in received if r.path == paths[job]]
        assert answers == [status, 200], f"{status}: {answers}"
        assert [(a["ok"], a["status_code"]) for a in event.attempts] == [(False, status), (True, 200)]
    assert accepted_ids_by_path(received, paths.values()) == {
        paths[job]: {event.webhook_id} for job, event in retried.items()
    }
    assert cluster.receiver.received("/elsewhere") == [], "a redirect is never followed"
    assert [r.status_sent for r in received if r.path == gone_path] == [500, 410], "410 stops delivery"
    assert gone.last_error == "gone" and len(gone.attempts) == 2


# --------------------------------------------------------------------------- dead letters and the CLI


def cli_json(cluster: Cluster, *args: str) -> Any:
    result = cluster.cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_exhausted_events_are_dead_lettered_listed_shown_and_replayed_with_their_webhook_ids(
    system: System, record_row: Callable[..., Row]
) -> None:
    cluster = system.cluster
    jobs = [f"dead-{n}" for n in range(3)]
    paths = {}
    for job in jobs:
        cluster.receiver.default(f"/hooks/{job}", 500)
        paths[job] = start_fast_job(cluster, job)
    ids = {job: stored(cluster, event_of(cluster, job), "dead").webhook_id for job in jobs}

    listed = {row["webhook_id"]: row for row in cli_json(cluster, "dead-letters", "list")}
    for job, webhook_id in ids.items():
        assert listed[webhook_id]["job_id"] == job
        assert listed[webhook_id]["attempts"] == 1 + len(FAST_DELAYS)
        assert listed[webhook_id]["last_error"] == "retries exhausted: HTTP 500"
    shown = cli_json(cluster, "dead-letters", "show", ids[jobs[0]])
    assert shown["state"] == "dead"
    assert [(a["attempt"], a["status_code"]) for a in shown["attempts"]] == [
        (n, 500) for n in range(1, 2 + len(FAST_DELAYS))
    ]
    plain = cluster.cli("dead-letters", "show", ids[jobs[0]])
    assert plain.returncode == 0 and plain.stdout.count(": 500 (") == 1 + len(FAST_DELAYS), plain.stdout

    for job in jobs:
        cluster.receiver.default(f"/hooks/{job}", 200)
    replay_started = time.time()
    assert cli_json(cluster, "dead-letters", "replay", ids[jobs[0]]) == {"replayed": [ids[jobs[0]]], "not_replayed": []}
    stored(cluster, ids[jobs[0]], "delivered")
    states = {job: getattr(cluster.outbox().get(webhook_id), "state", None) for job, webhook_id in ids.items()}
    assert states == {jobs[0]: "delivered", **dict.fromkeys(jobs[1:], "dead")}, "replaying one leaves the others"
    replayed_all = cli_json(cluster, "dead-letters", "replay", "--all")
    assert {ids[job] for job in jobs[1:]} <= set(replayed_all["replayed"])
    for webhook_id in ids.values():
        stored(cluster, webhook_id, "delivered")
    assert cli_json(cluster, "dead-letters", "list") == []

    received = cluster.receiver.received()
    result = tally(received, paths.values())
    record_row(
        "dead letters (retries exhausted) listed, shown, replayed one and --all",
        jobs=len(jobs),
        events_expected=len(jobs),
        delivered=result.delivered,
        duplicates=result.duplicates,
        lost=len(jobs) - result.delivered,
        recover_s=result.last_arrival() - replay_started,
    )
    for job, webhook_id in ids.items():
        requests = [r for r in received if r.path == paths[job]]
        assert [r.status_sent for r in requests] == [500] * (1 + len(FAST_DELAYS)) + [200]
        assert {r.headers["webhook-id"] for r in requests} == {webhook_id}, "a replay keeps the webhook-id"
        assert len({r.body for r in requests}) == 1 and all(r.verified for r in requests)


# --------------------------------------------------------------------------- a minute of refused connections


def test_a_receiver_refusing_connections_for_a_minute_gets_every_event_when_it_is_back(
    system: System, record_row: Callable[..., Row]
) -> None:
    cluster, outage = system.cluster, system.outage
    ids = {job: event_of(cluster, job) for job in outage.jobs}
    time.sleep(max(0.0, outage.stopped_at + OUTAGE_S - time.time()))
    outbox = cluster.outbox()
    during = {job: outbox.get(webhook_id) for job, webhook_id in ids.items()}
    outage.receiver = Receiver(cluster.secret, port=outage.port).start()
    outage.back_at = time.time()

    longest = max(PATIENT_DELAYS) * (1 + JITTER) + float(COMMON["SWEEP_INTERVAL_S"])
    events = {job: stored(cluster, webhook_id, "delivered", longest + SLACK_S) for job, webhook_id in ids.items()}
    received = outage.receiver.received()
    result = tally(received)
    record_row(
        f"receiver refusing connections for {OUTAGE_S:.0f} s",
        jobs=len(ids),
        events_expected=len(ids),
        delivered=result.delivered,
        duplicates=result.duplicates,
        lost=len(ids) - result.delivered,
        recover_s=result.last_arrival() - outage.back_at,
    )

    # Throughout the minute: retried, never given up.
    for job, event in during.items():
        assert event is not None and event.state == "active", f"{job} must still be retrying: {event}"
        assert len(event.attempts) >= 7, f"{job}: {len(event.attempts)} attempts in a minute"
    for job, event in events.items():
        *refused, delivered = event.attempts
        assert all(a["ok"] is False and a["status_code"] is None and "connection" in a["error"] for a in refused)
        assert delivered["ok"] is True and delivered["status_code"] == 200
        # Each retry waited at least its configured delay (the sweep may add up to its interval).
        times = attempt_times(event)
        for n, (before, after) in enumerate(itertools.pairwise(times)):
            assert after - before >= PATIENT_DELAYS[n] - 0.01, f"{job}: retry {n + 1} came early"
    assert result.delivered == len(ids)
    assert accepted_ids_by_path(received, [f"/hooks/{job}" for job in ids]) == {
        f"/hooks/{job}": {webhook_id} for job, webhook_id in ids.items()
    }
    assert all(r.verified for r in received) and result.duplicates == 0
    assert result.last_arrival() - outage.back_at <= longest + SLACK_S
