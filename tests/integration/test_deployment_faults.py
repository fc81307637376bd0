"""A deployment that is wrong (the base URL, the API key) is the operator's to fix, never the job's.

Real workers poll the simulator over HTTP; what matters is what they never do: send a
webhook that declares a job failed when the job is fine.
"""

from __future__ import annotations

import pytest

from tests.support.cluster import Cluster, quiet_period, wait_until
from tests.support.metrics import scrape_until, value
from worker.local.redisserver import free_port

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

    # Once the operator fixes the URL, the same watch delivers the job's results.
    wrong.stop()
    cluster.start_worker("fixed-base-url", concurrency=2, queue=queue)
    cluster.receiver.wait_for(lambda rx: any(r.path == hook_path for r in rx), TIMEOUT)
    quiet_period(1.0)
    (received,) = cluster.receiver.received(hook_path)
    assert received.verified
    assert received.json()["type"] == "bulk_validation.completed"
    assert len(received.json()["data"]["results"]) == 3
