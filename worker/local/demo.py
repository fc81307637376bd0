"""``check365-worker demo``: the whole system on this machine, end to end, in under a minute.

Starts a private Redis, the Check365 simulator, a receiver that verifies every
signature with the independent ``standardwebhooks`` library, a worker and beat;
enqueues jobs of different sizes and fates; shows their progress live; prints
every verified webhook; and stops everything it started.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from worker.local.redisserver import LocalRedis
from worker.settings import load_settings
from worker.state.connect import connect


@dataclass(frozen=True)
class DemoJob:
    job_id: str
    size: int
    duration_s: float
    behaviour: str
    expect: str  # the event type that should arrive
    parts: int = 1


PER_PART = 1000
JOBS = [
    DemoJob("demo-small", 5, 3.0, "normal", "bulk_validation.completed"),
    DemoJob("demo-medium", 250, 7.0, "normal", "bulk_validation.completed"),
    DemoJob("demo-large", 2500, 10.0, "normal", "bulk_validation.completed", parts=3),
    DemoJob("demo-odd-statuses", 40, 6.0, "unknown_statuses", "bulk_validation.completed"),
    DemoJob("demo-failing", 100, 4.0, "fail", "bulk_validation.failed"),
    DemoJob("demo-missing", 0, 0.0, "unregistered", "bulk_validation.failed"),
]


def _secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def _bar(progress: float | None, width: int = 20) -> str:
    value = 0.0 if progress is None else max(0.0, min(100.0, progress))
    filled = round(value / 100 * width)
    return "#" * filled + "." * (width - filled)


def _spawn(args: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen[bytes]:
    log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the child
    return subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
        args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def run_demo(timeout_s: float = 90.0) -> int:  # noqa: PLR0915 - a linear script reads best in one piece
    try:
        from worker.local.receiver import Receiver
        from worker.local.simulator import Simulator
    except ImportError as exc:
        print(f"the demo needs the demo extra: pip install 'check365-worker[demo]' ({exc})", file=sys.stderr)
        return 2

    from worker.intake.enqueue import enqueue_watch
    from worker.state.watches import WatchStore

    api_key = "demo-" + secrets.token_hex(8)
    secret = _secret()
    started = time.monotonic()
    procs: list[subprocess.Popen[bytes]] = []
    print("check365-worker demo: starting Redis, the Check365 simulator, a receiver, a worker and beat")
    with LocalRedis() as redis_server, Simulator(api_key=api_key) as sim, Receiver(secret) as receiver:
        env = {
            **os.environ,
            "REDIS_URL": redis_server.url,
            "CHECK365_BASE_URL": sim.url,
            "CHECK365_API_KEY": api_key,
            "WEBHOOK_SECRET": secret,
            "WEBHOOK_ALLOW_HTTP": "true",
            "WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
            "POLL_INITIAL_DELAY_S": "1",
            "POLL_MAX_DELAY_S": "4",
            "WEBHOOK_MAX_RESULTS_PER_PART": str(PER_PART),
            "WEBHOOK_RETRY_DELAYS_S": "1,2,4",
            "SWEEP_INTERVAL_S": "2",
            "REARM_GRACE_S": "5",
            "CHECK365_MAX_RPS": "20",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "info",
        }
        workdir = redis_server.directory
        procs.append(
            _spawn(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "worker",
                    "worker",
                    "-Q",
                    "check365",
                    "--hostname",
                    "demo@%h",
                ],
                env,
                str(workdir / "worker.log"),
            )
        )
        procs.append(
            _spawn(
                [sys.executable, "-m", "celery", "-A", "worker", "beat", "--schedule", str(workdir / "beat-schedule")],
                env,
                str(workdir / "beat.log"),
            )
        )
        try:
            print(f"  redis     {redis_server.url}\n  simulator {sim.url}\n  receiver  {receiver.url}/hooks/<job>")
            client_settings = load_settings(env, process="cli")
            for job in JOBS:
                if job.behaviour != "unregistered":
                    sim.add_job(job.job_id, job.size, job.duration_s, job.behaviour)
                enqueue_watch(
                    job.job_id, f"{receiver.url}/hooks/{job.job_id}", {"demo": job.job_id}, settings=client_settings
                )
            print(f"enqueued {len(JOBS)} watches; progress (from the watch state in Redis):\n")
            store = WatchStore(connect(redis_server.url), state_ttl_s=3600)
            expected = sum(j.parts for j in JOBS)
            shown: set[str] = set()
            last_lines = ""
            while time.monotonic() - started < timeout_s:
                for rx in receiver.received():
                    key = rx.headers.get("webhook-id", "") + rx.headers.get("webhook-timestamp", "")
                    if key in shown:
                        continue
                    shown.add(key)
                    print(_describe(rx))
                lines = []
                for job in JOBS:
                    watches = store.for_job(job.job_id)
                    w = watches[-1] if watches else None
                    status = (w.outcome or w.last_status or "waiting") if w else "enqueued"
                    progress = 100.0 if w and w.outcome == "completed" else (w.last_progress if w else None)
                    lines.append(f"  {job.job_id:<18} [{_bar(progress)}] {status:<11} polls {w.polls if w else 0}")
                text = "\n".join(lines)
                if text != last_lines:
                    print(text + "\n")
                    last_lines = text
                verified = [r for r in receiver.received() if r.verified]
                if len({r.headers.get("webhook-id") for r in verified}) >= expected:
                    break
                time.sleep(0.5)
            received = receiver.received()
            unique = {r.headers.get("webhook-id") for r in received if r.verified}
            bad = [r for r in received if not r.verified]
            elapsed = time.monotonic() - started
            ok = len(unique) >= expected and not bad
            print(
                f"{'OK' if ok else 'INCOMPLETE'}: {len(unique)}/{expected} webhooks received, "
                f"{len(bad)} failed verification, in {elapsed:.1f} s"
            )
            if not ok:
                print(f"worker log: {workdir / 'worker.log'}", file=sys.stderr)
            return 0 if ok else 1
        finally:
            for proc in procs:
                _stop(proc)
            print("stopped the worker, beat, receiver, simulator and Redis")


def _describe(rx: Any) -> str:
    try:
        body = json.loads(rx.body)
    except ValueError:
        return f"  webhook {rx.path}: body is not JSON"
    data = body.get("data", {})
    mark = "verified" if rx.verified else f"NOT VERIFIED ({rx.error})"
    if body.get("type") == "bulk_validation.completed":
        part = data.get("part", {})
        detail = (
            f"{len(data.get('results', []))} results, part {part.get('index')}/{part.get('count')}, "
            f"total {data.get('total')}"
        )
    else:
        detail = f"reason {data.get('reason')}: {data.get('message', data.get('status'))}"
    return f"  <- {body.get('type')} for {data.get('jobId')}: {detail} [{mark}, {rx.headers.get('webhook-id')}]"
