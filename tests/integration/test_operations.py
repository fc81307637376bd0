"""What an operator runs beside the pool: the version, container healthchecks and the
start-up output of real worker and beat processes."""

from __future__ import annotations

import json
import subprocess
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tests.support.cluster import Cluster, cli_command, quiet_period, wait_until
from worker.local.redisserver import free_port
from worker.runtime.celeryconfig import WATCH_TASK
from worker.state.beats import BEAT_LAST_KEY
from worker.state.outbox import DEAD_KEY

pytestmark = pytest.mark.integration


def test_version_names_the_installed_distribution() -> None:
    result = subprocess.run([*cli_command(), "--version"], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0
    assert result.stdout.strip() == f"check365-worker {version('check365-worker')}"


def _non_json_lines(text: str) -> list[str]:
    bad = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError:
            bad.append(line)
    return bad


def test_json_logs_carry_no_banner_and_console_logs_keep_it(tmp_path: Path) -> None:
    with Cluster(tmp_path) as cluster:
        worker = cluster.start_worker("json-worker", concurrency=1)
        beat = cluster.start_beat("json-beat")
        console = cluster.start_worker("console-worker", concurrency=1, env_overrides={"LOG_FORMAT": "console"})
        # A few sweeps: beat's line per sent task is at DEBUG, below the INFO level.
        wait_until(lambda: cluster.redis().hlen(BEAT_LAST_KEY) > 0, 20, "a sweep")
        for process in (worker, beat):
            assert _non_json_lines(process.stdout_text() + process.stderr_text()) == [], process.name
        assert not [r for r in beat.log_records() if "Sending due task" in str(r.get("event"))]
        assert "[queues]" in console.stdout_text() + console.stderr_text()


def test_healthcheck_asks_the_workers_readyz_and_beats_sweeps(tmp_path: Path) -> None:
    port = free_port()
    env = {"METRICS_PORT": str(port), "METRICS_ADDR": "127.0.0.1"}
    with Cluster(tmp_path) as cluster:
        # Nothing listens yet.
        down = cluster.cli("healthcheck", env_overrides=env)
        assert down.returncode == 1
        assert down.stdout.startswith("unhealthy: no answer")
        off = cluster.cli("healthcheck", env_overrides={"METRICS_PORT": "0"})
        assert off.returncode == 2
        assert "METRICS_PORT" in off.stderr

        cluster.start_worker("health", concurrency=1, env_overrides=env)
        ready = cluster.cli("healthcheck", env_overrides=env)
        assert ready.returncode == 0, ready.stdout + ready.stderr
        assert '"ready"' in ready.stdout
        assert cluster.cli("healthcheck", "--live", env_overrides=env).returncode == 0

        no_beat = cluster.cli("healthcheck", "--beat")
        assert no_beat.returncode == 1
        assert "no sweep has run yet" in no_beat.stdout
        cluster.start_beat("health-beat")
        wait_until(lambda: cluster.cli("healthcheck", "--beat").returncode == 0, 20, "beat reported healthy")


def doctor(cluster: Cluster, **env: str | None) -> tuple[int, dict[str, dict[str, Any]]]:
    result = cluster.cli("doctor", "--json", env_overrides=env)
    report = json.loads(result.stdout)
    assert report["ok"] == (result.returncode == 0)
    return result.returncode, {c["name"]: c for c in report["checks"]}


def test_doctor_on_a_running_pool_passes_with_its_warnings(tmp_path: Path) -> None:
    with Cluster(tmp_path) as cluster:
        cluster.start_worker("doctor-w", concurrency=1)
        cluster.start_beat("doctor-beat")
        wait_until(lambda: cluster.redis().hlen(BEAT_LAST_KEY) > 0, 20, "a sweep")
        code, checks = doctor(cluster)
        assert code == 0, checks
        statuses = {name: c["status"] for name, c in checks.items()}
        assert statuses == {
            "settings": "ok",
            # The test cluster calls back to a loopback receiver over http.
            "allow_http": "warn",
            "allow_private_networks": "warn",
            "redis": "ok",
            "clock": "ok",
            "persistence": "warn",
            "eviction": "ok",
            "workers": "ok",
            "stray_messages": "ok",
            "beat": "ok",
            "backlog": "ok",
            "dead_letters": "ok",
            "check365": "ok",
        }
        assert "AOF off" in checks["persistence"]["detail"]
        assert checks["workers"]["detail"].startswith("1 answered a ping: doctor-w@")
        assert cluster.api_key not in json.dumps(checks)

        # What an operator gets wrong: an evicting Redis, dead letters left behind.
        cluster.redis().config_set("maxmemory-policy", "allkeys-lru")
        cluster.redis().config_set("appendonly", "yes")
        cluster.redis().zadd(DEAD_KEY, {"msg_left": time.time()})
        code, checks = doctor(
            cluster, WEBHOOK_ALLOW_HTTP="false", WEBHOOK_ALLOW_PRIVATE_NETWORKS="false", CHECK365_ALLOW_HTTP="true"
        )
        assert code == 0, checks
        assert checks["check365_allow_http"]["status"] == "warn"
        assert checks["eviction"]["status"] == "warn"
        assert "allkeys-lru" in checks["eviction"]["detail"]
        assert checks["persistence"] == {"name": "persistence", "status": "ok", "ok": True, "detail": "AOF on"}
        assert checks["dead_letters"]["status"] == "warn"
        assert checks["dead_letters"]["detail"].startswith("1 dead letter(s) wait")
        assert "allow_http" not in checks and "allow_private_networks" not in checks

        text = cluster.cli("doctor")
        assert text.returncode == 0
        assert "[WARN] eviction: maxmemory-policy allkeys-lru" in text.stdout


def test_doctor_fails_without_beat_and_finds_messages_nobody_consumes(tmp_path: Path) -> None:
    with Cluster(tmp_path) as cluster:
        cluster.start_worker("doctor-alone", concurrency=1)
        # A producer that forgot queue="check365": Celery's default queue, which no worker reads.
        app = Celery(broker=cluster.redis_url, set_as_current=False)
        for n in range(3):
            app.send_task(
                WATCH_TASK, kwargs={"job_id": f"J-{n}", "callback_url": cluster.callback_url(f"/hooks/J-{n}")}
            )
        app.close()
        code, checks = doctor(cluster)
        assert code == 1
        assert checks["stray_messages"]["status"] == "fail"
        assert f"3 {WATCH_TASK} in queue 'celery'" in checks["stray_messages"]["detail"]
        assert checks["beat"]["status"] == "fail"
        assert "last: never" in checks["beat"]["detail"]
        assert checks["workers"]["status"] == "ok"

        # Messages for the queue the workers consume are not stray, whatever their number.
        cluster.redis().delete("celery")
        cluster.enqueue("sim-2-600s", "/hooks/sim-2-600s")
        _, checks = doctor(cluster)
        assert checks["stray_messages"]["status"] == "ok"


def test_doctor_fails_with_no_worker_and_with_two_beats(tmp_path: Path) -> None:
    with Cluster(tmp_path) as cluster:
        code, checks = doctor(cluster)
        assert code == 1
        assert checks["workers"]["status"] == "fail"
        assert checks["workers"]["detail"].startswith("no worker answered a ping")

        cluster.start_worker("doctor-two", concurrency=1)
        cluster.start_beat("beat-one")
        cluster.start_beat("beat-two")
        # Both send a sweep every second: give them a few.
        wait_until(lambda: cluster.redis().hlen(BEAT_LAST_KEY) >= 2, 20, "sweeps from both beats")
        quiet_period(3.0)
        code, checks = doctor(cluster)
        assert code == 1
        assert checks["beat"]["status"] == "fail"
        assert checks["beat"]["detail"].startswith("2 beats send sweeps")
