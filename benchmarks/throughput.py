"""Throughput: small jobs completed and acknowledged per second, next to a no-op Celery task.

    python -m benchmarks.throughput [--jobs N] [--rounds N] [--latency S] [--json PATH]

One machine, everything real: a Redis server, the Check365 simulator, a webhook
receiver that verifies every signature, and two ``celery worker`` processes with the
same Celery settings and concurrency, each on its own queue:

    ours      ``celery -A worker worker``. N watches of jobs that are already
              complete (1-3 results each) are enqueued with the Python helper, with
              POLL_INITIAL_DELAY_S=0; the figure is N divided by the time from the
              first enqueue to the receiver's last 2xx answer.
    no-op     a Celery app built from the very same settings (``worker.runtime.celeryconfig``)
              whose only task increments a Redis counter; N messages are sent; the
              figure is N divided by the time from the first send to the run that
              brings the counter to N.
    floor     the same app's second task: what any implementation must do per job
              and nothing else - one status request to the simulator and one
              signed POST of its data to the receiver, both with httpx, then the
              counter (no state, no checks, no logs). Its rate bounds what this
              machine allows, next to the no-op's.

The two alternate over ``--rounds`` rounds (the machine may be shared: each pair is
measured under the same conditions) and the median of each is reported. Celery
task runs of ours are counted from the worker's log (the distinct task ids its lines
carry: every run of ours logs at least one line), so that the tasks each job costs
are measured, not assumed.

CPU per job and per no-op task is read from /proc for the worker's process group, the
Redis server and this process (which serves the simulator and the receiver and sends
the messages): unlike the rates, it hardly depends on what else the machine runs.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import threading
import time
from typing import Any

import httpx
import orjson
import redis

from benchmarks.common import (
    Row,
    baseline_app,
    format_table,
    group_cpu_seconds,
    group_rss_bytes,
    lazy_app,
    per_process,
    percentile,
    process_cpu_seconds,
    start_celery_worker,
    write_json,
)
from tests.support.cluster import Cluster, WorkerProcess, wait_until
from worker.delivery.signing import new_webhook_id, webhook_headers
from worker.intake.enqueue import client_app, enqueue_watch
from worker.local.httpserver import Latency
from worker.runtime.celeryconfig import WORKER_THREADS

NOOP_TASK = "bench.noop"
NOOP_QUEUE = "bench-noop"
OURS_QUEUE = "bench-ours"
NOOP_COUNTER = "bench:noop:count"
NOOP_DONE_AT = "bench:noop:done_at"
FLOOR_TASK = "bench.floor"
FLOOR_QUEUE = "bench-floor"
TARGET_FRACTION = 0.5
# Ours against the floor in the same run (issue: the network must not hold the pool).
FLOOR_FRACTION = 0.85
# With Check365 and the receiver both answering after this long (an API across the
# internet), one host keeps at least KEPT_FRACTION of its zero-latency rate.
LATENCY_S = 0.25
KEPT_FRACTION = 0.8
# No request of this benchmark may wait on the pool-wide rate limit: it measures the
# pool, not the limit (which is still consulted on every poll, as in production).
UNLIMITED_RPS = "100000"
# Bounds of one round, only reached when something is broken.
ROUND_TIMEOUT_S = 180.0


# --------------------------------------------------------------------------- the no-op app


def _make_noop_app() -> Any:
    """The no-op and floor tasks, with exactly the settings our worker gets from ``worker.runtime.celeryconfig``."""
    app, settings = baseline_app("bench-noop", NOOP_QUEUE)
    # Connections are made per pool process, after the fork, as our worker does.
    counters: dict[int, redis.Redis] = {}
    http_clients = threading.local()

    def count(total: int) -> None:
        client = per_process(counters, lambda: redis.Redis.from_url(settings.redis_url))
        if client.incr(NOOP_COUNTER) == total:
            client.set(NOOP_DONE_AT, repr(time.time()))

    @app.task(name=NOOP_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
    def noop(total: int) -> None:
        count(total)

    @app.task(name=FLOOR_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
    def floor(job_id: str, callback_url: str, total: int) -> None:
        # What every job costs whatever does it: its status request and one signed POST
        # of the data, with the same HTTP library, and nothing else. One client per
        # thread, each with its own connections: no pool shared between threads to wait on.
        http = getattr(http_clients, "client", None)
        if http is None:
            http = http_clients.client = httpx.Client(timeout=10, trust_env=False)
        answer = http.get(settings.status_url, params={"api_key": settings.api_key, "job_id": job_id})
        answer.raise_for_status()
        body = orjson.dumps({"type": "bulk_validation.completed", "data": answer.json()["data"]})
        headers = webhook_headers(settings.webhook_secrets, new_webhook_id(job_id), int(time.time()), body, "bench")
        http.post(callback_url, content=body, headers=headers).raise_for_status()
        count(total)

    return app


__getattr__ = lazy_app(globals(), "noop_app", _make_noop_app)


# --------------------------------------------------------------------------- one round of each


class CpuMeter:
    """CPU seconds spent during a round by the worker's process group, Redis, and this process.

    This process serves the simulator and the receiver (and sends the messages): on this
    machine they compete for the same cores as the worker.
    """

    def __init__(self, cluster: Cluster, worker: WorkerProcess) -> None:
        self._worker = worker.pid
        process = cluster.redis_server.process
        self._redis = process.pid if process is not None else None
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        times = os.times()
        return {
            "worker": group_cpu_seconds(self._worker),
            "redis": process_cpu_seconds(self._redis) if self._redis else 0.0,
            "bench": times.user + times.system,
        }

    def per_item_ms(self, items: int) -> dict[str, float]:
        end = self._read()
        return {f"cpu_ms_per_item_{k}": (end[k] - self._start[k]) * 1000 / items for k in end}


def _task_runs(worker: WorkerProcess) -> int:
    return len({r["task_id"] for r in worker.log_records() if r.get("task_id")})


def run_noop(
    cluster: Cluster, worker: WorkerProcess, total: int, *, floor_round: int | None = None
) -> dict[str, float]:
    """The no-op tasks, or with ``floor_round`` the floor tasks (jobs complete when first asked)."""
    client = cluster.redis()
    client.delete(NOOP_COUNTER, NOOP_DONE_AT)
    sender = client_app(cluster.client_settings())
    url = cluster.callback_url(f"/hooks/floor-{floor_round}")
    cpu = CpuMeter(cluster, worker)
    started = time.time()
    for i in range(total):
        if floor_round is None:
            sender.send_task(NOOP_TASK, args=[total], queue=NOOP_QUEUE)
        else:
            job = f"sim-{1 + i % 3}-0s-fl{floor_round}x{i}"
            sender.send_task(FLOOR_TASK, args=[job, url, total], queue=FLOOR_QUEUE)
    sent = time.time()
    done_at = float(wait_until(lambda: client.get(NOOP_DONE_AT), ROUND_TIMEOUT_S, "no-op tasks", interval=0.01))
    seconds = done_at - started
    return {
        "tasks": total,
        "seconds": seconds,
        "tasks_per_s": total / seconds,
        "send_seconds": sent - started,
        **cpu.per_item_ms(total),
    }


def run_ours(cluster: Cluster, worker: WorkerProcess, total: int, round_index: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    path = f"/hooks/throughput-{round_index}"
    url = cluster.callback_url(path)
    settings = cluster.client_settings(CHECK365_QUEUE=OURS_QUEUE)
    # Jobs created by their first status request with a duration of 0: complete when first polled.
    jobs = [f"sim-{rng.randint(1, 3)}-0s-tp{round_index}x{i}" for i in range(total)]
    tasks_before = _task_runs(worker)
    cpu = CpuMeter(cluster, worker)
    started = time.time()
    for job in jobs:
        enqueue_watch(job, url, settings=settings)
    sent = time.time()

    def acknowledged() -> bool:
        return sum(1 for r in cluster.receiver.received(path) if 200 <= r.status_sent < 300) >= total

    wait_until(acknowledged, ROUND_TIMEOUT_S, "acknowledged webhooks")
    received = cluster.receiver.received(path)
    if not all(r.verified for r in received):
        raise AssertionError("a webhook failed signature verification")
    if len({r.headers.get("webhook-id") for r in received}) != total:
        raise AssertionError("expected exactly one event per job")
    finished = max(r.at for r in received)
    seconds = finished - started
    cpu_ms = cpu.per_item_ms(total)
    # The log may trail the webhook by a few milliseconds: let the last lines land.
    time.sleep(0.5)
    tasks = _task_runs(worker) - tasks_before
    rss = group_rss_bytes(worker.pid)
    latencies = sorted(r.at for r in received)
    return {
        "jobs": total,
        "seconds": seconds,
        "jobs_per_s": total / seconds,
        "tasks": tasks,
        "tasks_per_job": tasks / total,
        "tasks_per_s": tasks / seconds,
        "send_seconds": sent - started,
        "first_ack_s": latencies[0] - started,
        "median_ack_s": percentile(latencies, 0.5) - started,
        "rss_bytes": rss,
        **cpu_ms,
    }


def run(
    jobs: int = 1500,
    rounds: int = 2,
    concurrency: int | None = None,
    seed: int = 4,
    *,
    latency_s: float = 0.0,
    with_noop: bool = True,
) -> dict[str, Any]:
    """Alternate the no-op, the floor and ours ``rounds`` times each and return the figures.

    The simulator and the receiver answer after ``latency_s``; the workers run the pool of
    the app's configuration unless ``concurrency`` is given.
    """
    ours_env = {
        "CHECK365_QUEUE": OURS_QUEUE,
        "POLL_INITIAL_DELAY_S": "0",
        "POLL_MAX_DELAY_S": "5",
        "WATCH_TIMEOUT_S": "600",
        "CHECK365_MAX_RPS": UNLIMITED_RPS,
        # Nor on the receiver's cap on attempts in flight (every job calls one receiver,
        # which would hold 16 attempts at once by default): at the pool's size, every
        # thread may be delivering. The cap is still consulted on every attempt.
        "WEBHOOK_ENDPOINT_MAX_IN_FLIGHT": str(WORKER_THREADS),
        # The production defaults for logs: one JSON line per step at INFO.
        "LOG_LEVEL": "info",
        "LOG_FORMAT": "json",
    }
    samples: dict[str, list[dict[str, float]]] = {"noop": [], "floor": [], "ours": []}
    latency = Latency(latency_s)
    with Cluster(api_latency=latency, receiver_latency=latency) as cluster:
        ours = cluster.start_worker(
            "ours", concurrency=concurrency, env_overrides=ours_env, queue=OURS_QUEUE, wait=False
        )
        noop = start_celery_worker(
            cluster,
            "noop",
            app="benchmarks.throughput:noop_app",
            queue=f"{NOOP_QUEUE},{FLOOR_QUEUE}",
            concurrency=concurrency,
            env=cluster.env(**ours_env),
            # Stock Celery logging at INFO, its per-task lines included (ours keeps those at DEBUG).
            extra_args=("--loglevel", "INFO"),
        )
        ours.wait_ready()
        noop.wait_ready()
        # One small warm-up of each: connections, imports and the simulator's first answers.
        if with_noop:
            run_noop(cluster, noop, 50)
        run_noop(cluster, noop, 50, floor_round=-1)
        run_ours(cluster, ours, 50, -1, seed)
        for index in range(rounds):
            order = ("noop", "floor", "ours") if index % 2 == 0 else ("ours", "floor", "noop")
            for kind in (k for k in order if with_noop or k != "noop"):
                if kind == "noop":
                    samples["noop"].append(run_noop(cluster, noop, jobs))
                elif kind == "floor":
                    samples["floor"].append(run_noop(cluster, noop, jobs, floor_round=index))
                else:
                    samples["ours"].append(run_ours(cluster, ours, jobs, index, seed + index))
    noop_rate = statistics.median(s["tasks_per_s"] for s in samples["noop"]) if with_noop else math.nan
    floor_rate = statistics.median(s["tasks_per_s"] for s in samples["floor"])
    jobs_rate = statistics.median(s["jobs_per_s"] for s in samples["ours"])
    tasks_rate = statistics.median(s["tasks_per_s"] for s in samples["ours"])
    tasks_per_job = statistics.median(s["tasks_per_job"] for s in samples["ours"])
    cpu = {
        kind: {k: statistics.median(s[k] for s in runs) for k in runs[0] if k.startswith("cpu_ms_per_item_")}
        for kind, runs in samples.items()
        if runs
    }
    cpu.setdefault("noop", {})
    return {
        "settings": {
            "jobs": jobs,
            "rounds": rounds,
            "concurrency": concurrency or WORKER_THREADS,
            "seed": seed,
            "latency_s": latency_s,
            "pool": "app" if concurrency is None else "command line",
        },
        "noop": {"tasks_per_s": noop_rate, "cpu": cpu["noop"], "runs": samples["noop"]},
        "floor": {"tasks_per_s": floor_rate, "cpu": cpu["floor"], "runs": samples["floor"]},
        "ours": {
            "jobs_per_s": jobs_rate,
            "tasks_per_s": tasks_rate,
            "tasks_per_job": tasks_per_job,
            "rss_peak_bytes": max(s["rss_bytes"] for s in samples["ours"]),
            "cpu": cpu["ours"],
            "runs": samples["ours"],
        },
        "ratios": {
            "jobs_over_noop_tasks": jobs_rate / noop_rate,
            "tasks_over_noop_tasks": tasks_rate / noop_rate,
            "floor_over_noop_tasks": floor_rate / noop_rate,
            "jobs_over_floor": jobs_rate / floor_rate,
        },
        "targets": {
            "jobs_at_least_half_of_noop": jobs_rate >= TARGET_FRACTION * noop_rate,
            "jobs_at_least_floor_fraction": jobs_rate >= FLOOR_FRACTION * floor_rate,
        },
    }


def run_both(jobs: int = 1500, rounds: int = 2, seed: int = 4, latency_s: float = LATENCY_S) -> dict[str, Any]:
    """The whole benchmark with servers answering at once, then the floor and ours at ``latency_s``."""
    zero = run(jobs, rounds, seed=seed)
    slow = run(jobs, rounds, seed=seed, latency_s=latency_s, with_noop=False)
    kept = slow["ours"]["jobs_per_s"] / zero["ours"]["jobs_per_s"]
    return {
        "zero": zero,
        "latency": slow,
        "kept_at_latency": kept,
        "targets": {
            "kept_at_latency": kept >= KEPT_FRACTION,
            "floor_fraction_at_latency": slow["targets"]["jobs_at_least_floor_fraction"],
        },
    }


def rows(figures: dict[str, Any]) -> list[Row]:
    """The rows of ``run_both``'s figures."""
    zero, slow = figures["zero"], figures["latency"]
    ms = f"{slow['settings']['latency_s'] * 1000:g} ms"
    return [
        *rows_one(zero),
        Row.compare(
            f"throughput at {ms} (Check365 and receiver): small jobs /s",
            slow["ours"]["jobs_per_s"],
            zero["ours"]["jobs_per_s"],
            "/s",
            target=f">= {KEPT_FRACTION:g} x at 0 ms",
            met=figures["targets"]["kept_at_latency"],
            baseline_name="ours at 0 ms",
        ),
        Row.compare(
            f"throughput at {ms}: ours next to the floor",
            slow["ours"]["jobs_per_s"],
            slow["floor"]["tasks_per_s"],
            "/s",
            target=f">= {FLOOR_FRACTION:g} x floor",
            met=figures["targets"]["floor_fraction_at_latency"],
            baseline_name="floor",
        ),
        Row.compare(
            f"throughput: worker CPU while a burst of {zero['settings']['jobs']:,} jobs drains, at 0 / {ms}",
            _burst_cpu_share(slow),
            _burst_cpu_share(zero),
            "% of a core",
            target="-",
            met=None,
            baseline_name="at 0 ms",
        ),
        Row(
            f"throughput: worker RSS (peak, {zero['settings']['concurrency']} threads) at 0 / {ms}",
            slow["ours"]["rss_peak_bytes"] / 2**20,
            zero["ours"]["rss_peak_bytes"] / 2**20,
            "MiB",
            "-",
            None,
            None,
            "at 0 ms",
        ),
    ]


def _burst_cpu_share(figures: dict[str, Any]) -> float:
    """The worker's CPU over its rounds, in % of one core: every job of a round is enqueued at once."""
    runs = figures["ours"]["runs"]
    return float(statistics.median(100 * r["cpu_ms_per_item_worker"] * r["jobs"] / 1000 / r["seconds"] for r in runs))


def rows_one(figures: dict[str, Any]) -> list[Row]:
    ours, noop, ratios = figures["ours"], figures["noop"], figures["ratios"]

    def cpu_ms(kind: str) -> float:
        return float(sum(figures[kind]["cpu"].values()))

    return [
        Row.compare(
            "throughput: small jobs completed + acknowledged /s",
            ours["jobs_per_s"],
            noop["tasks_per_s"],
            "/s",
            target=f">= {TARGET_FRACTION:g} x no-op tasks/s",
            met=figures["targets"]["jobs_at_least_half_of_noop"],
            baseline_name="no-op Celery tasks",
        ),
        Row(
            f"throughput: Celery task runs /s (ours: {ours['tasks_per_job']:.2f} per job)",
            ours["tasks_per_s"],
            noop["tasks_per_s"],
            "/s",
            "-",
            None,
            ratios["tasks_over_noop_tasks"],
            "no-op Celery tasks",
        ),
        Row.compare(
            "throughput: floor (status request + signed POST, nothing else) /s",
            figures["floor"]["tasks_per_s"],
            noop["tasks_per_s"],
            "/s",
            target="-",
            met=None,
            baseline_name="no-op Celery tasks",
        ),
        Row.compare(
            "throughput: ours next to the floor",
            ours["jobs_per_s"],
            figures["floor"]["tasks_per_s"],
            "/s",
            target=f">= {FLOOR_FRACTION:g} x floor",
            met=figures["targets"]["jobs_at_least_floor_fraction"],
            baseline_name="floor",
        ),
        Row.compare(
            "throughput: CPU per job (worker + Redis + simulator/receiver)",
            cpu_ms("ours"),
            cpu_ms("noop"),
            "ms",
            target="-",
            met=None,
            baseline_name="per no-op task",
        ),
        Row.compare(
            "throughput: CPU per job of the floor",
            cpu_ms("floor"),
            cpu_ms("noop"),
            "ms",
            target="-",
            met=None,
            baseline_name="per no-op task",
        ),
    ]


def format_report(figures: dict[str, Any]) -> str:
    """The report of ``run_both``'s figures."""
    return "\n\n".join([_report_one(figures["zero"]), _report_one(figures["latency"]), format_table(rows(figures))])


def _report_one(figures: dict[str, Any]) -> str:
    s = figures["settings"]
    lines = [
        f"{s['jobs']} jobs / no-op tasks per round, {s['rounds']} rounds each, {s['concurrency']} threads, "
        f"Check365 and the receiver answering after {s['latency_s'] * 1000:g} ms",
        "",
        "kind  round  count  seconds  per s  tasks/job  CPU ms per item: worker  redis  this process",
    ]
    for kind in ("noop", "floor", "ours"):
        for index, sample in enumerate(figures[kind]["runs"]):
            count = sample.get("jobs", sample.get("tasks"))
            rate = sample.get("jobs_per_s", sample.get("tasks_per_s"))
            per_job = f"{sample['tasks_per_job']:.2f}" if "tasks_per_job" in sample else "-"
            lines.append(
                f"{kind:<6}{index:<7}{count:<7.0f}{sample['seconds']:<9.2f}{rate:<7.0f}{per_job:<28}"
                f"{sample['cpu_ms_per_item_worker']:<7.2f}{sample['cpu_ms_per_item_redis']:<7.2f}"
                f"{sample['cpu_ms_per_item_bench']:.2f}"
            )
    lines += ["(this process serves the simulator and the receiver and sends the messages)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latency", type=float, default=LATENCY_S, help="seconds of the slow run (default: 0.25)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    figures = run_both(args.jobs, args.rounds, latency_s=args.latency)
    print(format_report(figures))
    if args.json:
        from pathlib import Path

        write_json(Path(args.json), figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
