"""The Prometheus endpoint of a real prefork worker, scraped over HTTP.

Tasks run in pool children while the endpoint is served by the worker's main
process, which never runs a task: every non-zero counter seen here was summed
across processes by the multiprocess collector.
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.cluster import Cluster, WorkerProcess
from tests.support.metrics import scrape, scrape_until, total, value
from tests.support.schemas import assert_events_valid
from worker.local.redisserver import free_port
from worker.polling.ratelimit import BLOCKED_KEY

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).resolve().parents[2] / "config"
METRIC = re.compile(r"\bcheck365_[a-z0-9_]+\b")

COMPLETED_JOBS = ("M-ok-1", "M-ok-2")
FAILING_JOB = "M-fail"
GONE_JOB = "M-gone"  # completes, but its receiver answers 410 Gone
SLOW_JOB = "M-slow"  # still running when the counters are checked; cancelled at the end


def wait_for_events(worker: WorkerProcess, wanted: dict[str, int], timeout: float = 30.0) -> list[dict[str, Any]]:
    """Wait until the worker has logged each event name at least as often as wanted.

    Every metric of a step is recorded before the step's final log line, so once
    these lines are written the counters they stand for are in the files.
    """

    def enough(_: str) -> bool:
        names = [r.get("event") for r in worker.log_records()]
        return all(names.count(name) >= count for name, count in wanted.items())

    worker.wait_for_log(enough, timeout)
    return worker.log_records()


def test_metrics_sum_every_pool_process_and_read_pool_gauges_from_redis(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    with Cluster(tmp_path) as cluster:
        worker = cluster.start_worker(
            "metrics", concurrency=2, env_overrides={"METRICS_PORT": str(port), "METRICS_ADDR": "127.0.0.1"}
        )

        # Before any task: the endpoint answers, every labelled series exists at zero,
        # and the gauges come from Redis.
        idle = scrape(url)
        assert value(idle, "check365_redis_up") == 1
        assert value(idle, "check365_watches_active") == 0
        assert value(idle, "check365_polls_total", outcome="completed") == 0
        assert value(idle, "check365_deliveries_total", outcome="dead_lettered") == 0

        for job_id in COMPLETED_JOBS:
            cluster.sim.add_job(job_id, size=3, duration_s=0.5)
        cluster.sim.add_job(FAILING_JOB, size=4, duration_s=0.5, behaviour="fail")
        cluster.sim.add_job(GONE_JOB, size=2, duration_s=0.5)
        cluster.sim.add_job(SLOW_JOB, size=2, duration_s=600)
        cluster.receiver.script(f"/hooks/{FAILING_JOB}", [500])  # one failed attempt, then 200
        cluster.receiver.default(f"/hooks/{GONE_JOB}", 410)
        for job_id in (*COMPLETED_JOBS, FAILING_JOB, GONE_JOB, SLOW_JOB):
            cluster.enqueue(job_id, f"/hooks/{job_id}")

        # While the watches run.
        running = scrape_until(
            url, lambda s: (value(s, "check365_watches_active") or 0) >= 1 and total(s, "check365_polls_total") > 0
        )
        assert 1 <= (value(running, "check365_watches_active") or 0) <= 5
        assert value(running, "check365_deliveries_pending") is not None
        assert value(running, "check365_dead_letters_stored") is not None

        records = wait_for_events(
            worker,
            {
                "watch_completed": 3,
                "watch_failed": 1,
                "webhook_delivered": 3,
                "webhook_failed": 1,
                "webhook_dead_lettered": 1,
            },
        )
        assert all(r.verified for r in cluster.receiver.received())
        assert_events_valid(cluster.receiver.received())
        after = scrape(url)

        assert value(after, "check365_watches_started_total") == 5
        assert value(after, "check365_watch_outcomes_total", outcome="completed") == 3
        assert value(after, "check365_watch_outcomes_total", outcome="failed") == 1
        assert value(after, "check365_watch_outcomes_total", outcome="timed_out") == 0
        assert value(after, "check365_polls_total", outcome="completed") == 3
        assert value(after, "check365_polls_total", outcome="failed") == 1
        assert (value(after, "check365_polls_total", outcome="running") or 0) >= 1
        assert value(after, "check365_polls_total", outcome="rejected") == 0
        assert value(after, "check365_detection_lag_seconds_count") == 3
        assert (value(after, "check365_detection_lag_seconds_sum") or 0) > 0
        assert value(after, "check365_deliveries_total", outcome="delivered") == 3
        assert value(after, "check365_deliveries_total", outcome="failed") == 1
        assert value(after, "check365_deliveries_total", outcome="dead_lettered") == 1
        assert value(after, "check365_dead_letters_total", reason="gone") == 1
        assert value(after, "check365_dead_letters_total", reason="retries_exhausted") == 0
        assert value(after, "check365_delivery_seconds_count") == 5  # 3 delivered, 1 failed, 1 gone
        # Pool-wide state from Redis: the slow job is still watched, the gone event is kept.
        assert value(after, "check365_watches_active") == 1
        assert value(after, "check365_deliveries_pending") == 0
        assert value(after, "check365_dead_letters_stored") == 1

        (slow,) = cluster.watch_state(SLOW_JOB)
        assert cluster.watches().cancel(slow.watch_id)
        # Every request is timed, whatever its outcome; a poll that was under way when
        # the watch was cancelled may still be counted, so wait for the two to agree.
        final = scrape_until(
            url,
            lambda s: (
                value(s, "check365_watches_active") == 0
                and (
                    value(s, "check365_request_seconds_count")
                    == total(s, "check365_polls_total") - (value(s, "check365_polls_total", outcome="throttled") or 0)
                )
            ),
        )
        assert value(final, "check365_request_seconds_count") == len(cluster.sim.requests())

        (started,) = [r for r in records if r.get("event") == "metrics_started"]
        directory = Path(started["directory"])
        assert started["port"] == port
        # The pool's threads run in the worker's main process, which wrote the zeroed series and
        # what its steps counted; only processes of the worker wrote (a prefork pool's children
        # would each write their own file, summed the same way).
        writers = {path.stem.rsplit("_", 1)[1] for path in directory.glob("counter_*.db")}
        assert str(worker.pid) in writers
        assert writers <= {str(pid) for pid in worker.group_pids()} | {str(worker.pid)}, writers

        assert worker.stop() == 0
        # A warm shutdown stops the endpoint and removes the directory of this run.
        assert not directory.exists()
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, timeout=2)


def test_metrics_port_in_use_stops_the_worker_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as taken, Cluster(tmp_path) as cluster:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = cluster.start_worker(
            "metrics-conflict",
            concurrency=1,
            env_overrides={"METRICS_PORT": str(port), "METRICS_ADDR": "127.0.0.1"},
            wait=False,
        )
        assert worker.wait_exit(30) != 0
        assert f"METRICS_PORT {port} cannot be served" in worker.log_text()


def test_liveness_backlog_errors_and_health_on_the_metrics_port(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with Cluster(tmp_path) as cluster:
        cluster.start_worker(
            "ops", concurrency=1, env_overrides={"METRICS_PORT": str(port), "METRICS_ADDR": "127.0.0.1"}
        )
        assert httpx.get(f"{base}/healthz", timeout=5).json() == {"status": "alive"}
        ready = httpx.get(f"{base}/readyz", timeout=5)
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "worker": "consuming", "redis": "ok"}

        # No beat yet: no sweep has ever run, so there is no timestamp to show.
        idle = scrape(f"{base}/metrics")
        assert value(idle, "check365_last_sweep_timestamp_seconds") is None
        assert value(idle, "check365_paused", cause="retry_after") == 0
        assert value(idle, "check365_api_errors_total", kind="job_not_found") == 0

        # A watch whose poll message was lost 30 s ago: overdue, and only beat's sweep re-arms it.
        now = time.time()
        cluster.watches().create(
            watch_id="w_lost",
            job_id="M-lost",
            callback_url=cluster.callback_url("/hooks/M-lost"),
            metadata=None,
            now=now - 40,
            first_poll_at=now - 30,
            deadline=now + 600,
            queue="check365",
        )
        lost = scrape_until(f"{base}/metrics", lambda s: value(s, "check365_watches_overdue") == 1)
        assert (value(lost, "check365_watches_oldest_overdue_seconds") or 0) >= 29.9

        # A job Check365 does not know: the refusal is counted by its kind.
        cluster.enqueue("M-unknown", "/hooks/M-unknown")
        scrape_until(f"{base}/metrics", lambda s: value(s, "check365_api_errors_total", kind="job_not_found") == 1)

        # A Retry-After in force is a pool-wide pause.
        cluster.redis().set(BLOCKED_KEY, f"{time.time() + 60:.3f}")
        paused = scrape(f"{base}/metrics")
        assert value(paused, "check365_paused", cause="retry_after") == 1
        assert 50 < (value(paused, "check365_pause_remaining_seconds", cause="retry_after") or 0) <= 60
        cluster.redis().delete(BLOCKED_KEY)

        # Beat starts: sweeps run and the gauge follows them; the lost watch is re-armed.
        cluster.start_beat("ops-beat")
        swept = scrape_until(
            f"{base}/metrics",
            lambda s: (
                value(s, "check365_last_sweep_timestamp_seconds") is not None
                and value(s, "check365_watches_overdue") == 0
            ),
        )
        assert abs((value(swept, "check365_last_sweep_timestamp_seconds") or 0) - time.time()) < 5

        # Redis gone: not ready, still alive; the gauges are left out rather than wrong.
        cluster.redis_server.stop(kill=True)
        not_ready = httpx.get(f"{base}/readyz", timeout=10)
        assert not_ready.status_code == 503
        assert not_ready.json()["redis"].startswith("unreachable")
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        down = scrape(f"{base}/metrics")
        assert value(down, "check365_redis_up") == 0
        assert value(down, "check365_watches_overdue") is None


def _queries() -> dict[str, str]:
    """Every PromQL query of the dashboard and of the alert rules, by where it is."""
    dashboard = json.loads((CONFIG / "grafana" / "dashboards" / "check365-worker.json").read_text())
    queries = {
        f"panel {panel['title']!r}": target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    }
    rules = yaml.safe_load((CONFIG / "prometheus" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            queries[f"alert {rule['alert']}"] = rule["expr"]
    return queries


def test_every_dashboard_panel_and_alert_rule_queries_metrics_a_live_worker_exports(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    with Cluster(tmp_path) as cluster:
        cluster.start_worker(
            "dashboard", concurrency=1, env_overrides={"METRICS_PORT": str(port), "METRICS_ADDR": "127.0.0.1"}
        )
        cluster.start_beat("dashboard-beat")
        # Some of every kind of work, so that every family has its series.
        cluster.enqueue("sim-2-0.3s", "/hooks/dashboard")
        samples = scrape_until(
            url,
            lambda s: (
                value(s, "check365_last_sweep_timestamp_seconds") is not None
                and value(s, "check365_deliveries_total", outcome="delivered") == 1
            ),
            timeout=30,
        )
    exported = {name for name, _ in samples}
    queries = _queries()
    assert len(queries) >= 20
    for where, query in queries.items():
        named = set(METRIC.findall(query))
        assert named, f"{where} names no metric of the worker: {query}"
        assert named <= exported, f"{where} names {sorted(named - exported)}, which the worker does not export"
