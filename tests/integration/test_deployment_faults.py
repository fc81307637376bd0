"""A deployment that is wrong (the base URL, the API key) is the operator's to fix, never the job's.

Real workers poll the simulator over HTTP; what matters is what they never do: send a
webhook that declares a job failed when the job is fine.
"""

from __future__ import annotations

import math
import signal
import time

import pytest

from tests.support.cluster import Cluster, quiet_period, wait_until
from tests.support.metrics import scrape_until, value
from worker.local.redisserver import free_port
from worker.local.simulator import Simulator
from worker.polling.ratelimit import KEY_REFUSED_KEY

pytestmark = pytest.mark.integration

TIMEOUT = 25.0


def test_a_base_url_one_segment_off_is_retried_logged_counted_and_never_a_webhook(
    cluster: Cluster, job_id: str, hook_path: str
) -> None:
    queue = "it-wrong-base-url"
    port = free_port()
    # Every request now meets the web server's HTML 404 page, as behind a real proxy.
    wrong = cluster.start_worker(
        "wrong-base-url",
        concurrency=2,
        queue=queue,
        env_overrides={
            "CHECK365_BASE_URL": cluster.sim.url + "/v2",
            "METRICS_PORT": str(port),
            "METRICS_ADDR": "127.0.0.1",
            # Far from the deadline however slow the machine: the watch must end completed.
            "WATCH_TIMEOUT_S": "300",
        },
    )
    cluster.sim.add_job(job_id, size=3, duration_s=0.0)  # long completed: the job is fine
    cluster.enqueue(job_id, hook_path, CHECK365_QUEUE=queue)

    def misconfigured_lines() -> list[dict[str, object]]:
        return [r for r in wrong.log_records() if r.get("event") == "poll_misconfigured" and r.get("job_id") == job_id]

    wait_until(lambda: len(misconfigured_lines()) >= 3, TIMEOUT, "three polls logged as misconfigured")
    line = misconfigured_lines()[0]
    assert line["level"] == "error"
    assert "CHECK365_BASE_URL" in str(line["error"]) and "404" in str(line["error"])
    scrape_until(
        f"http://127.0.0.1:{port}/metrics",
        lambda s: (value(s, "check365_polls_total", outcome="misconfigured") or 0) >= 3,
    )
    # Retried with backoff, the watch still active, and not a single webhook.
    (watch,) = cluster.watch_state(job_id)
    assert watch.state == "active" and watch.outcome is None
    assert watch.failures >= 3
    assert cluster.receiver.received(hook_path) == []

    doctor = cluster.cli("doctor", env_overrides={"CHECK365_BASE_URL": cluster.sim.url + "/v2"})
    assert doctor.returncode == 1, doctor.stdout
    assert "[FAIL] check365: not Check365" in doctor.stdout

    # Once the operator fixes the URL, the same watch delivers the job's results. A warm
    # shutdown lets a poll under way finish and hands its next message back.
    wrong.send_signal(signal.SIGTERM)
    wrong.wait_exit(30)
    cluster.start_worker("fixed-base-url", concurrency=2, queue=queue)
    cluster.receiver.wait_for(lambda rx: any(r.path == hook_path for r in rx), TIMEOUT)
    quiet_period(1.0)
    (received,) = cluster.receiver.received(hook_path)
    assert received.verified
    assert received.json()["type"] == "bulk_validation.completed"
    assert len(received.json()["data"]["results"]) == 3


def test_a_refused_key_pauses_the_pool_and_fails_its_watches_only_after_the_grace(
    cluster: Cluster, job_id: str, hook_path: str
) -> None:
    grace_s, pause_s = 4.0, 1.0  # the pause is a quarter of the grace, at most a minute
    concurrency = 3
    queue = "it-key-refused"
    port = free_port()
    # A simulator of its own: rotating its key touches no other test's worker.
    with Simulator(cluster.api_key) as api:
        worker = cluster.start_worker(
            "key-refused",
            concurrency=concurrency,
            queue=queue,
            env_overrides={
                "CHECK365_BASE_URL": api.url,
                "CHECK365_AUTH_GRACE_S": str(grace_s),
                # The production rate: once a pause ends, requests given turns inside the first
                # one's round trip also reach Check365 (ceil(round trip x rate), see the README);
                # at the tests' 200/s a slower round trip let several through per pause.
                "CHECK365_MAX_RPS": "4",
                "METRICS_PORT": str(port),
                "METRICS_ADDR": "127.0.0.1",
            },
        )

        def refused_lines() -> list[dict[str, object]]:
            return [r for r in worker.log_records() if r.get("event") == "poll_key_refused"]

        # A key refused for less than the grace (revoked, then put back) fails nothing.
        # The jobs run until the key is back (a job that finished before the first refused
        # poll would prove nothing), then are done at once.
        brief = [f"{job_id}-brief-{i}" for i in range(3)]
        for job in brief:
            api.add_job(job, size=2, duration_s=600.0)
            cluster.enqueue(job, f"{hook_path}/{job}", CHECK365_QUEUE=queue)
        wait_until(lambda: len(api.requests()) >= 3, TIMEOUT, "the first polls")
        api.set_api_key("rotated-elsewhere")
        wait_until(refused_lines, TIMEOUT, "a poll_key_refused line")
        time.sleep(pause_s)
        api.set_api_key(cluster.api_key)
        for job in brief:
            api.add_job(job, size=2, duration_s=0.0)
        cluster.receiver.wait_for(lambda rx: len({r.path for r in rx if r.path.startswith(hook_path)}) >= 3, TIMEOUT)
        assert {r.json()["type"] for r in cluster.receiver.received() if r.path.startswith(hook_path)} == {
            "bulk_validation.completed"
        }

        # A key refused for good: every watch waits out the grace, then fails with unauthorized.
        held = [f"{job_id}-held-{i}" for i in range(6)]
        for job in held:
            api.add_job(job, size=2, duration_s=600.0)
            cluster.enqueue(job, f"{hook_path}/{job}", CHECK365_QUEUE=queue)
        wait_until(lambda: all(w.polls for j in held for w in cluster.watch_state(j)), TIMEOUT, "every watch polled")
        # The brief refusal is over for the pool too: this one starts its own grace.
        wait_until(lambda: not cluster.redis().exists(KEY_REFUSED_KEY), TIMEOUT, "the brief refusal forgotten")
        asked = len(api.requests())
        api.set_api_key("rotated-for-good")
        refused_at = time.monotonic()
        cluster.receiver.wait_for(lambda rx: len({r.path for r in rx if r.path.startswith(hook_path)}) >= 9, TIMEOUT)
        waited = time.monotonic() - refused_at
        refused_requests = [r for r in api.requests()[asked:] if r.status_code == 401]

    line = refused_lines()[0]
    assert line["level"] == "error"
    assert "401" in str(line["error"])
    failed = [r.json() for r in cluster.receiver.received() if "-held-" in r.path]
    assert len(failed) == len(held)
    assert {(b["type"], b["data"]["reason"]) for b in failed} == {("bulk_validation.failed", "unauthorized")}
    assert waited >= grace_s, f"the watches failed {waited:.1f} s after the key was refused, within the grace"
    # While the pool waits, one burst of requests per pause: those sent before the first
    # refusal of the burst is recorded, at most one per worker process (a process records
    # its refusal before it sends again). The grace holds grace/pause bursts (each starts
    # a pause after the previous one's refusal, on Redis's clock); once it is over, one
    # request per watch. Polling each watch at every pause would make about
    # (grace/pause + 1) * watches requests: 30 here, against a bound of 18.
    bursts = math.ceil(grace_s / pause_s)
    assert len(refused_requests) <= bursts * concurrency + len(held), len(refused_requests)
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    samples = scrape_until(metrics_url, lambda s: (value(s, "check365_polls_total", outcome="unauthorized") or 0) > 0)
    assert value(samples, "check365_polls_total", outcome="rejected") == len(held)


def test_a_watch_whose_callback_the_new_settings_refuse_ends_logged_counted_and_shown(
    cluster: Cluster, job_id: str, hook_path: str
) -> None:
    queue = "it-allow-http-off"
    port = free_port()
    before = cluster.start_worker("allow-http-on", concurrency=2, queue=queue)
    cluster.sim.add_job(job_id, size=2, duration_s=600.0)
    cluster.enqueue(job_id, hook_path, CHECK365_QUEUE=queue)  # the receiver is plain http
    wait_until(lambda: any(w.polls for w in cluster.watch_state(job_id)), TIMEOUT, "a first poll")
    before.stop()
    # The deployment now refuses plain-http callbacks: the watch's next message meets that.
    after = cluster.start_worker(
        "allow-http-off",
        concurrency=2,
        queue=queue,
        env_overrides={"WEBHOOK_ALLOW_HTTP": "false", "METRICS_PORT": str(port), "METRICS_ADDR": "127.0.0.1"},
    )
    wait_until(lambda: cluster.watch_state(job_id)[0].state == "finished", TIMEOUT, "the watch ended")
    [watch] = cluster.watch_state(job_id)
    assert watch.outcome == "callback_refused"
    line = after.wait_for_record(lambda r: r.get("event") == "watch_callback_refused", TIMEOUT)
    assert line["level"] == "warning" and "http" in str(line["reason"])
    assert not [r for r in after.log_records() if r.get("event") == "watch_rejected"]
    scrape_until(
        f"http://127.0.0.1:{port}/metrics",
        lambda s: value(s, "check365_watch_outcomes_total", outcome="callback_refused") == 1,
    )
    shown = cluster.cli("status", job_id)
    assert "outcome callback_refused" in shown.stdout, shown.stdout
    assert cluster.receiver.received(hook_path) == []
