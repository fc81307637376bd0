"""What an operator runs beside the pool: the version, container healthchecks and the
start-up output of real worker and beat processes."""

from __future__ import annotations

import json
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, cli_command, wait_until
from worker.local.redisserver import free_port

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
        wait_until(lambda: cluster.redis().hlen("check365:beat:last") > 0, 20, "a sweep")
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
