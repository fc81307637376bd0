"""The example receivers in examples/ against a real worker.

Each kit runs as its own process, exactly as its README says to run it. The worker
sends it a job split into parts and a failed job; then the test plays an attacker
(tampered bodies) and a retry (the same webhook-id, signed afresh, as the worker
re-sends it), and checks what the kit accepted through its GET /events window.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from tests.support.cluster import Cluster, new_secret
from tests.support.schemas import assert_events_valid
from worker.intake.enqueue import enqueue_watch
from worker.local.redisserver import free_port
from worker.local.simulator import generate_results

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
HOOK_PATH = "/webhooks/check365"
PER_PART = 2
MULTI_SIZE = 5  # three parts of at most PER_PART results
KITS = ("python", "node")


@dataclass
class Kit:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def state(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/events", timeout=5)
        response.raise_for_status()
        state: dict[str, Any] = response.json()
        return state

    def accepted(self) -> list[dict[str, Any]]:
        accepted: list[dict[str, Any]] = self.state()["accepted"]
        return accepted

    def post(self, body: bytes, headers: dict[str, str]) -> httpx.Response:
        return httpx.post(
            f"{self.url}{HOOK_PATH}", content=body, headers={"content-type": "application/json", **headers}, timeout=5
        )

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def printed_events(self) -> list[dict[str, Any]]:
        lines = self.stdout.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.strip()]


def _kit_command(name: str) -> tuple[list[str], Path]:
    if name == "python":
        if importlib.util.find_spec("flask") is None:
            pytest.fail("the Python receiver kit needs Flask: pip install -r examples/receiver-python/requirements.txt")
        return [sys.executable, "app.py"], EXAMPLES / "receiver-python"
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("the Node receiver kit needs node and npm, and this machine has neither on PATH")
    directory = EXAMPLES / "receiver-node"
    if not (directory / "node_modules" / "standardwebhooks").is_dir():
        installed = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        assert installed.returncode == 0, f"npm install failed:\n{installed.stdout}\n{installed.stderr}"
    return [node, "server.js"], directory


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # Overrides the suite's shared cluster on purpose: these kits need a worker that
    # splits small jobs into parts, and a system of their own keeps the counts exact.
    with Cluster(tmp_path_factory.mktemp("kits")) as cluster:
        cluster.start_worker("kits", concurrency=2, env_overrides={"WEBHOOK_MAX_RESULTS_PER_PART": str(PER_PART)})
        yield cluster


@pytest.fixture(params=KITS)
def kit(request: pytest.FixtureRequest, cluster: Cluster, tmp_path: Path) -> Iterator[Kit]:
    name: str = request.param
    command, directory = _kit_command(name)
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "WEBHOOK_SECRET": cluster.secret,
        "PYTHONUNBUFFERED": "1",
    }
    stdout, stderr = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(command, cwd=directory, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    started = Kit(name, f"http://127.0.0.1:{port}", process, stdout, stderr)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                started.state()
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the {name} kit did not start:\n{started.output()}")
                time.sleep(0.05)
        yield started
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def wait_accepted(kit: Kit, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        accepted = kit.accepted()
        if len(accepted) >= count:
            return accepted
        if time.monotonic() > deadline:
            raise AssertionError(f"the {kit.name} kit accepted {len(accepted)} of {count} events:\n{kit.output()}")
        time.sleep(0.1)


def signed_headers(secret: str, webhook_id: str, body: bytes) -> dict[str, str]:
    """Headers as the worker sends them on a retry: the same id, a fresh timestamp."""
    now = datetime.now(UTC)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(webhook_id, now, body.decode()),
    }


def test_kit_accepts_verified_events_reassembles_parts_rejects_tampering_and_ignores_repeats(
    cluster: Cluster, kit: Kit
) -> None:
    multi, failing = f"K-{kit.name}-multi", f"K-{kit.name}-fail"
    cluster.sim.add_job(multi, size=MULTI_SIZE, duration_s=0.3)
    cluster.sim.add_job(failing, size=3, duration_s=0.3, behaviour="fail")
    settings = cluster.client_settings()
    for job_id in (multi, failing):
        enqueue_watch(job_id, kit.url + HOOK_PATH, {"kit": kit.name}, settings=settings)

    accepted = wait_accepted(kit, 4)
    assert len(accepted) == 4
    assert len({e["webhookId"] for e in accepted}) == 4
    parts = sorted((e["part"]["index"], e["part"]["count"], e["results"]) for e in accepted if e["jobId"] == multi)
    assert parts == [(1, 3, 2), (2, 3, 2), (3, 3, 1)]
    state = kit.state()
    expected = [r["email"] for r in generate_results(multi, MULTI_SIZE)]
    assert state["jobs"][multi] == {"type": "bulk_validation.completed", "results": MULTI_SIZE, "emails": expected}
    assert state["jobs"][failing] == {"type": "bulk_validation.failed", "reason": "job_failed"}
    assert [e["jobFinished"] for e in accepted if e["jobId"] == failing] == [True]
    assert sum(e["jobFinished"] for e in accepted if e["jobId"] == multi) == 1

    outbox = cluster.outbox()
    bodies = {e["webhookId"]: outbox.body(e["webhookId"]) for e in accepted}
    assert all(body is not None for body in bodies.values())
    assert_events_valid(b for b in bodies.values() if b is not None)

    # An attacker: a body changed after signing, under a new id and under one already seen
    # (a kit must verify before it deduplicates), and a request with no signature at all.
    (captured_id,) = [e["webhookId"] for e in accepted if e["jobId"] == failing]
    captured = bodies[captured_id]
    assert captured is not None
    tampered = captured.replace(b'"job_failed"', b'"job_gone!!"')
    assert tampered != captured
    for webhook_id in ("msg_forged", captured_id):
        headers = signed_headers(cluster.secret, webhook_id, captured)
        assert kit.post(tampered, headers).status_code in (400, 401)
    assert kit.post(captured, {"webhook-id": "msg_unsigned"}).status_code in (400, 401)
    other_secret = Webhook("whsec_" + "A" * 32)
    now = datetime.now(UTC)
    wrong_key = {
        "webhook-id": "msg_wrong_key",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": other_secret.sign("msg_wrong_key", now, captured.decode()),
    }
    assert kit.post(captured, wrong_key).status_code in (400, 401)
    assert len(kit.accepted()) == 4

    # A retry of an event already handled: acknowledged with a 2xx, not handled again.
    repeat = kit.post(captured, signed_headers(cluster.secret, captured_id, captured))
    assert 200 <= repeat.status_code < 300
    assert len(kit.accepted()) == 4

    # The same signing, under an id the kit has not seen, is accepted: so the two
    # refusals above came from the tampering and the repeat, not from this test's signing.
    fresh = kit.post(captured, signed_headers(cluster.secret, "msg_fresh_control", captured))
    assert 200 <= fresh.status_code < 300
    accepted = kit.accepted()
    assert [e["webhookId"] for e in accepted][-1] == "msg_fresh_control"
    assert len(accepted) == 5

    # One JSON line on stdout per accepted event, and nothing else there.
    assert [e["webhookId"] for e in kit.printed_events()] == [e["webhookId"] for e in accepted]


@pytest.mark.parametrize("kit_name", KITS)
@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        (None, "WEBHOOK_SECRET is not set"),
        ("nope-not-a-secret", "WEBHOOK_SECRET must be one secret of the form whsec_<base64 key>"),
        ("c2VjcmV0LWtleS1ieXRlcw==", "WEBHOOK_SECRET must be one secret of the form whsec_<base64 key>"),
        ("whsec_!!not*base64", "WEBHOOK_SECRET must be"),
    ],
)
def test_kit_refuses_to_start_without_a_usable_secret(kit_name: str, secret: str | None, problem: str) -> None:
    command, directory = _kit_command(kit_name)
    env = {k: v for k, v in os.environ.items() if k != "WEBHOOK_SECRET"}
    env.update({"PORT": str(free_port()), "HOST": "127.0.0.1"})
    if secret is not None:
        env["WEBHOOK_SECRET"] = secret
    started = subprocess.run(
        command,
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert started.returncode == 2, started.stdout + started.stderr
    assert problem in started.stderr
    assert "Traceback" not in started.stderr and "KeyError" not in started.stderr
    if secret:
        assert secret.removeprefix("whsec_") not in started.stderr, "a secret is never printed"


def test_kit_says_which_check_refused_a_webhook(cluster: Cluster, kit: Kit) -> None:
    body = json.dumps({"type": "bulk_validation.failed", "data": {"jobId": "K-x", "reason": "job_failed"}}).encode()
    fresh = signed_headers(cluster.secret, "msg_checks", body)
    stale_time = datetime.now(UTC) - timedelta(minutes=10)
    stale = {
        "webhook-id": "msg_checks",
        "webhook-timestamp": str(int(stale_time.timestamp())),
        "webhook-signature": Webhook(cluster.secret).sign("msg_checks", stale_time, body.decode()),
    }
    future_time = datetime.now(UTC) + timedelta(minutes=10)
    future = {
        **stale,
        "webhook-timestamp": str(int(future_time.timestamp())),
        "webhook-signature": Webhook(cluster.secret).sign("msg_checks", future_time, body.decode()),
    }
    cases = {
        "stale timestamp (check this host's clock)": kit.post(body, stale),
        "timestamp in the future (check this host's clock)": kit.post(body, future),
        "invalid signature": kit.post(body + b" ", fresh),
        "missing webhook headers": kit.post(body, {"webhook-id": "msg_checks"}),
    }
    for error, response in cases.items():
        assert (response.status_code, response.json()) == (400, {"error": error})
    assert kit.accepted() == [], "nothing refused was handled"


def test_kit_takes_its_endpoints_secret_shows_its_fingerprint_and_accepts_a_send_test(
    cluster: Cluster, kit: Kit, tmp_path: Path
) -> None:
    # The kit's URL is an endpoint whose secret is the kit's; the pool's WEBHOOK_SECRET is another,
    # and the pool's flags are off: only the endpoint's secret and flags can get the event there.
    endpoints = tmp_path / "endpoints.toml"
    endpoints.write_text(
        f'[endpoints.kit]\nurl = "{kit.url}{HOOK_PATH}"\nsecret = "{cluster.secret}"\n'
        "allow_http = true\nallow_private_networks = true\n",
        encoding="utf-8",
    )
    env = {
        "WEBHOOK_ENDPOINTS_FILE": str(endpoints),
        "WEBHOOK_SECRET": new_secret(),
        "WEBHOOK_ALLOW_HTTP": "false",
        "WEBHOOK_ALLOW_PRIVATE_NETWORKS": "false",
    }
    listed = json.loads(cluster.cli("endpoints", "--json", env_overrides=env).stdout)
    [kit_endpoint] = [named for row in listed for named in row["named"]]
    (shown,) = kit_endpoint["secret_fingerprints"]
    assert f'"secret": "{shown}"' in kit.output().replace('"secret":"', '"secret": "')
    sent = cluster.cli("send-test", "--endpoint", "kit", "--type", "failed", "--json", env_overrides=env)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    webhook_id = json.loads(sent.stdout)["webhook_id"]
    assert [a["webhookId"] for a in kit.state()["accepted"]][-1:] == [webhook_id]
