"""The operations CLI against the running system: watches, cancel, doctor, verify."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

from tests.support.cluster import Cluster, WorkerProcess, quiet_period, wait_until

pytestmark = pytest.mark.integration


def test_watches_lists_active_watches_and_cancel_stops_one_without_an_event(
    cluster: Cluster, job_id: str, hook_path: str
) -> None:
    cluster.sim.add_job(job_id, size=3, duration_s=3600, behaviour="never")
    cluster.enqueue(job_id, hook_path)
    wait_until(lambda: any(w.polls >= 1 for w in cluster.watch_state(job_id)), 30, "a first poll")

    listed = cluster.cli("watches", "--job", job_id, "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert row["job_id"] == job_id
    assert row["polls"] >= 1
    assert row["last_status"] == "processing"

    cancelled = cluster.cli("cancel", job_id, "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert len(json.loads(cancelled.stdout)["cancelled"]) == 1
    [watch] = cluster.watch_state(job_id)
    assert watch.state == "cancelled"
    # No further polls and no event for a cancelled watch.
    polls_then = len([r for r in cluster.sim.requests() if r.job_id == job_id])
    quiet_period(3)
    assert len([r for r in cluster.sim.requests() if r.job_id == job_id]) <= polls_then + 1
    assert cluster.receiver.received(hook_path) == []
    assert json.loads(cluster.cli("watches", "--job", job_id, "--json").stdout) == []
    # Cancelling again finds nothing active.
    assert cluster.cli("cancel", job_id).returncode == 1


def test_doctor_checks_settings_redis_check365_and_clock(cluster: Cluster) -> None:
    # Every check and its statuses: tests/integration/test_operations.py.
    result = cluster.cli("doctor", "--json")
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    for name in ("settings", "redis", "clock", "check365", "workers", "beat"):
        assert checks[name]["status"] == "ok", report
    assert cluster.api_key not in result.stdout


def test_doctor_reports_a_refused_key_and_an_unreachable_redis(cluster: Cluster) -> None:
    refused = cluster.cli("doctor", "--json", env_overrides={"CHECK365_API_KEY": "wrong-key"})
    assert refused.returncode == 1
    checks = {c["name"]: c for c in json.loads(refused.stdout)["checks"]}
    assert checks["check365"] == {"name": "check365", "status": "fail", "ok": False, "detail": "the API key is refused"}
    assert "wrong-key" not in refused.stdout

    down = cluster.cli("doctor", env_overrides={"REDIS_URL": "redis://127.0.0.1:9/0"})
    assert down.returncode == 1
    assert "[FAIL] redis: unreachable" in down.stdout

    bad = cluster.cli("doctor", env_overrides={"WEBHOOK_SECRET": "nope"})
    assert bad.returncode == 1
    assert "[FAIL] settings: WEBHOOK_SECRET" in bad.stdout


def test_verify_checks_a_saved_request(cluster: Cluster, tmp_path: Path) -> None:
    body = b'{"type":"bulk_validation.failed","data":{}}'
    stamp = int(time.time())

    signature = Webhook(cluster.secret).sign("msg_1", datetime.fromtimestamp(stamp, tz=UTC), body.decode())
    headers = tmp_path / "headers.txt"
    headers.write_text(f"Webhook-Id: msg_1\nWebhook-Timestamp: {stamp}\nWebhook-Signature: {signature}\n")
    (tmp_path / "body.json").write_bytes(body)

    ok = cluster.cli(
        "verify",
        "--headers",
        str(headers),
        "--body",
        str(tmp_path / "body.json"),
        env_overrides={"WEBHOOK_SECRET": cluster.secret},
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("valid")

    (tmp_path / "body.json").write_bytes(body.replace(b"failed", b"FAILED"))
    tampered = cluster.cli(
        "verify",
        "--headers",
        str(headers),
        "--body",
        str(tmp_path / "body.json"),
        env_overrides={"WEBHOOK_SECRET": cluster.secret},
    )
    assert tampered.returncode == 1
    assert tampered.stdout.startswith("invalid")


def test_every_step_line_names_the_job_the_task_and_the_attempt(
    cluster: Cluster, shared_worker: WorkerProcess, job_id: str, hook_path: str
) -> None:
    # Long enough for a poll to find it running: a poll that finishes the watch is
    # announced by the watch_completed line alone.
    cluster.sim.add_job(job_id, size=2, duration_s=2.0)
    cluster.enqueue(job_id, hook_path)
    cluster.receiver.wait_for(lambda rx: any(r.path == hook_path for r in rx), 30)
    shared_worker.wait_for_record(lambda r: r.get("event") == "webhook_delivered" and r.get("job_id") == job_id, 10)
    mine = [r for r in shared_worker.log_records() if r.get("job_id") == job_id]
    events = {r["event"] for r in mine}
    assert {"watch_enqueued", "poll_done", "watch_completed", "webhook_delivered"} <= events
    for record in mine:
        assert record.get("task_id"), record
    for record in mine:
        if record["event"] in {"poll_done", "watch_completed", "webhook_delivered"}:
            assert isinstance(record.get("attempt"), int), record
    delivered = next(r for r in mine if r["event"] == "webhook_delivered")
    assert delivered["webhook_id"].startswith("msg_")


def test_status_shows_what_a_finished_watchs_last_poll_saw_and_every_poll(
    cluster: Cluster, job_id: str, hook_path: str
) -> None:
    # Running at the first polls, then completed.
    cluster.sim.add_job(job_id, size=2, duration_s=3.0)
    cluster.enqueue(job_id, hook_path)
    # Never registered: Check365's own not-found answer at the first poll.
    missing = f"{job_id}-missing"
    cluster.enqueue(missing, f"{hook_path}-missing")
    cluster.receiver.wait_for(lambda rx: {r.path for r in rx} >= {hook_path, f"{hook_path}-missing"}, 30)
    [completed] = cluster.watch_state(job_id)
    assert completed.polls >= 2

    shown = cluster.cli("status", job_id)
    assert shown.returncode == 0, shown.stderr
    assert f"outcome completed  polls {completed.polls}  last status completed (100%)" in shown.stdout
    [as_json] = json.loads(cluster.cli("status", job_id, "--json").stdout)
    assert (as_json["last_status"], as_json["last_progress"]) == ("completed", 100)

    not_found = cluster.cli("status", missing)
    assert "outcome failed  polls 1  last status - (-)" in not_found.stdout
