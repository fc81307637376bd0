"""A bad setting stops ``celery -A worker worker`` and ``beat`` at once, with one line naming it.

Each process asks only for what it uses: the worker refuses to start without the API key
and the webhook secret; beat and ``celery -A worker inspect ping`` (compose's healthcheck)
start without them.

These processes need no running system but Redis for the valid case, so the module
has a cluster of its own: nothing here can disturb the shared worker's queues.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.support.cluster import BEAT_READY, WORKER_READY, Cluster, WorkerProcess, quiet_period
from worker.runtime.leases import LEASE_MARGIN_S

pytestmark = pytest.mark.integration

# Generous: the processes exit in well under a second, but CI machines stall.
EXIT_TIMEOUT = 30.0
ROLES = ("worker", "beat")


@pytest.fixture(scope="module")
def startup_cluster() -> Iterator[Cluster]:
    with Cluster() as started:
        yield started


def celery(cluster: Cluster, role: str, name: str, **overrides: str | None) -> WorkerProcess:
    args = [sys.executable, "-m", "celery", "-A", "worker", role]
    if role == "worker":
        args += [
            "-Q",
            "it-startup",
            "--concurrency",
            "1",
            "--without-gossip",
            "--without-mingle",
            "--hostname",
            f"{name}@%h",
        ]
    else:
        args += ["--schedule", str(cluster.directory / f"{name}-schedule")]
    overrides.setdefault("CHECK365_QUEUE", "it-startup")
    process = WorkerProcess(
        name, args, cluster.env(**overrides), cluster.directory, WORKER_READY if role == "worker" else BEAT_READY
    )
    cluster.processes.append(process)  # stopped by the cluster even if an assertion fails first
    return process


MALFORMED_SECRET = "whsec_" + "not*base64!" + secrets.token_hex(8)
UNPREFIXED_SECRET = base64.b64encode(secrets.token_bytes(24)).decode()
SHORT_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(8)).decode()

MISSING_SECRETS = [
    pytest.param("CHECK365_API_KEY", {"CHECK365_API_KEY": None}, id="missing-api-key"),
    pytest.param("WEBHOOK_SECRET", {"WEBHOOK_SECRET": None}, id="missing-secret"),
]
NO_SECRETS: dict[str, str | None] = {"CHECK365_API_KEY": None, "WEBHOOK_SECRET": None}

BAD_SETTINGS = [
    pytest.param("WEBHOOK_SECRET", {"WEBHOOK_SECRET": MALFORMED_SECRET}, id="secret-not-base64"),
    pytest.param("WEBHOOK_SECRET", {"WEBHOOK_SECRET": UNPREFIXED_SECRET}, id="secret-without-prefix"),
    pytest.param("WEBHOOK_SECRET", {"WEBHOOK_SECRET": SHORT_SECRET}, id="secret-too-short"),
    pytest.param("POLL_MAX_DELAY_S", {"POLL_MAX_DELAY_S": "abc"}, id="poll-max-delay-not-a-number"),
    pytest.param(
        "BROKER_VISIBILITY_TIMEOUT_S",
        {"POLL_MAX_DELAY_S": "10", "BROKER_VISIBILITY_TIMEOUT_S": "5"},
        id="visibility-timeout-below-poll-max-delay",
    ),
]


@pytest.mark.parametrize(
    ("role", "variable", "overrides"),
    [pytest.param(role, *p.values, id=f"{role}-{p.id}") for role in ROLES for p in BAD_SETTINGS]
    + [pytest.param("worker", *p.values, id=f"worker-{p.id}") for p in MISSING_SECRETS],
)
def test_a_bad_setting_stops_the_process_with_one_line_naming_the_variable(
    startup_cluster: Cluster, role: str, variable: str, overrides: dict[str, str | None]
) -> None:
    process = celery(startup_cluster, role, f"bad-{role}-{secrets.token_hex(3)}", **overrides)

    code = process.wait_exit(EXIT_TIMEOUT)

    assert code != 0
    stderr_lines = [line for line in process.stderr_text().splitlines() if line.strip()]
    assert len(stderr_lines) == 1, f"expected one line, got: {stderr_lines}"
    assert variable in stderr_lines[0]
    output = process.log_text()
    env = startup_cluster.env(**overrides)
    for name in ("CHECK365_API_KEY", "WEBHOOK_SECRET"):
        value = env.get(name)
        if value:
            assert value not in output, f"{name}'s value was printed"
            assert value.removeprefix("whsec_") not in output, f"{name}'s key was printed"


@pytest.mark.parametrize("role", ROLES)
def test_valid_settings_start_the_process(startup_cluster: Cluster, role: str) -> None:
    # Beat's line per sent task, awaited below, is a DEBUG line.
    process = celery(startup_cluster, role, f"good-{role}", LOG_LEVEL="debug")

    process.wait_ready(EXIT_TIMEOUT)
    if role == "beat":
        # Beat has no "ready" beyond starting: it must send the sweep, then keep running.
        process.wait_for_log("Sending due task check365-sweep", EXIT_TIMEOUT)
        quiet_period(2.0)
    assert process.alive, process.tail()
    process.stop()


def test_beat_starts_and_sends_the_sweep_without_the_api_key_or_the_secret(startup_cluster: Cluster) -> None:
    # Beat's line per sent task, awaited below, is a DEBUG line.
    process = celery(startup_cluster, "beat", "beat-without-secrets", LOG_LEVEL="debug", **NO_SECRETS)

    process.wait_ready(EXIT_TIMEOUT)
    process.wait_for_log("Sending due task check365-sweep", EXIT_TIMEOUT)
    assert process.alive, process.tail()
    process.stop()


def test_inspect_ping_answers_without_the_api_key_or_the_secret(startup_cluster: Cluster) -> None:
    # An operator's `celery -A worker inspect ping -d celery@$HOSTNAME`.
    worker = celery(startup_cluster, "worker", "pinged")
    worker.wait_ready(EXIT_TIMEOUT)
    ping = [sys.executable, "-m", "celery", "-A", "worker", "inspect", "ping", "-d", f"pinged@{socket.gethostname()}"]
    env = startup_cluster.env(CHECK365_QUEUE="it-startup", **NO_SECRETS)

    done = subprocess.run([*ping, "--timeout", "10"], check=False, env=env, capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "pong" in done.stdout
    assert "configuration error" not in done.stderr
    worker.stop()


LIMITS = """
import json
from worker.app import app, settings
from worker.runtime.leases import delivery_lease_s, watch_lease_s
from worker.runtime.tasks import deliver_webhook, sweep_task, watch_bulk_job
print(json.dumps({
    "watch": [watch_bulk_job.time_limit, watch_lease_s(settings)],
    "delivery": [deliver_webhook.time_limit, delivery_lease_s(settings)],
    "sweep": sweep_task.time_limit or app.conf.task_time_limit,
}))
"""


@pytest.mark.parametrize("timeouts", [("30", "15"), ("2", "3"), ("0.5", "120")], ids=["defaults", "short", "mixed"])
def test_each_step_task_has_a_hard_time_limit_inside_the_lease_it_holds(
    startup_cluster: Cluster, timeouts: tuple[str, str]
) -> None:
    # httpx times each read, not a whole request: only the pool's hard time limit
    # stops a step whose answer trickles in, and it must do so while the step still
    # holds its watch or event, or a second step would be handed the same item.
    check365_timeout, webhook_timeout = timeouts
    env = startup_cluster.env(CHECK365_TIMEOUT_S=check365_timeout, WEBHOOK_TIMEOUT_S=webhook_timeout)
    done = subprocess.run(
        [sys.executable, "-c", LIMITS], check=False, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    limits = json.loads(done.stdout.splitlines()[-1])
    for step in ("watch", "delivery"):
        time_limit, lease = limits[step]
        assert time_limit is not None
        assert time_limit + LEASE_MARGIN_S <= lease
        # Room for the step's own exchanges: a connect and a read, each at its timeout.
        assert time_limit >= 2 * float(webhook_timeout) + (2 * float(check365_timeout) if step == "watch" else 0)
    assert limits["sweep"] is not None
