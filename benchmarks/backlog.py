"""Polls next to a backlog of deliveries: a due poll does not wait behind them.

    python -m benchmarks.backlog [--deliveries N] [--watches N] [--receiver-s S] [--json PATH]

One machine, everything real: Redis, the Check365 simulator answering at once, a receiver
that takes ``--receiver-s`` to answer each webhook, and one ``celery -A worker worker`` with
the app's own pool. ``--watches`` watches of never-ending jobs are polled every ``POLL_S``
all along. After a quiet window (the baseline), jobs of ten parts each complete at once:
``--deliveries`` events are pending, on the deliveries' queue, while the polls go on.

Lateness of a poll is when the simulator received it minus when it was planned (the due
time the worker logged, as in benchmarks.capacity). The figure is the p99 lateness of the
polls due while at least half the backlog was still pending, next to the quiet window's.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.capacity import lateness, planned_polls_ours
from benchmarks.common import Row, format_table, percentile, write_json
from tests.support.cluster import Cluster, wait_until
from worker.intake.enqueue import enqueue_watch
from worker.runtime.celeryconfig import WORKER_THREADS

QUEUE = "bench-backlog"
POLL_S = 2.0
PARTS = 10
LATE_S = 1.0


def run(deliveries: int = 1200, watches: int = 100, receiver_s: float = 1.0, quiet_s: float = 10.0) -> dict[str, Any]:
    env = {
        "CHECK365_QUEUE": QUEUE,
        "POLL_INITIAL_DELAY_S": repr(POLL_S),
        "POLL_MAX_DELAY_S": repr(POLL_S),
        "WATCH_TIMEOUT_S": "900",
        "CHECK365_MAX_RPS": "100000",
        "WEBHOOK_MAX_RESULTS_PER_PART": "1",
        # One receiver: its cap on attempts in flight would otherwise park most of the backlog
        # (holding no thread); at the pool's size every thread can be busy delivering.
        "WEBHOOK_ENDPOINT_MAX_IN_FLIGHT": str(WORKER_THREADS),
        "WEBHOOK_TIMEOUT_S": repr(max(5.0, 4 * receiver_s)),
        "REARM_GRACE_S": "120",
        "LOG_LEVEL": "info",
        "LOG_FORMAT": "json",
    }
    with Cluster() as cluster:
        worker = cluster.start_worker("backlog", env_overrides=env, queue=QUEUE)
        settings = cluster.client_settings(**env)
        started = time.time()
        for index in range(watches):
            # An even pace over one gap spreads the polls evenly from then on.
            time.sleep(max(0.0, started + POLL_S * index / watches - time.time()))
            enqueue_watch(f"sim-1-86400s-never-bk{index}", cluster.callback_url("/hooks/polled"), settings=settings)
        quiet = (time.time() + POLL_S, time.time() + POLL_S + quiet_s)
        time.sleep(max(0.0, quiet[1] - time.time()))

        path = "/hooks/backlog"
        cluster.receiver.default(path, 200, delay_s=receiver_s)
        for index in range(deliveries // PARTS):
            enqueue_watch(f"sim-{PARTS}-0s-bl{index}", cluster.callback_url(path), settings=settings)
        samples: list[tuple[float, int]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.time(), cluster.pending_event_count()))
                stop.wait(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            wait_until(
                lambda: len([r for r in cluster.receiver.received(path) if r.status_sent == 200]) >= deliveries,
                deliveries * receiver_s + 120,
                "every delivery of the backlog",
                interval=0.5,
            )
        finally:
            stop.set()
            sampler.join()
        ended = time.time()
        time.sleep(POLL_S)
        requests = cluster.sim.requests()
        plans = planned_polls_ours([worker], "sim-1-86400s-never-bk")

    peak = max((pending for _, pending in samples), default=0)
    busy = [at for at, pending in samples if pending >= peak / 2]
    backlog = (min(busy), max(busy)) if busy else (ended, ended)
    actual: dict[str, list[float]] = {}
    for request in requests:
        actual.setdefault(request.job_id, []).append(request.at)

    def late_in(window: tuple[float, float]) -> list[float]:
        return [v for job, due in plans.items() for v in lateness(due, sorted(actual.get(job, [])), window, ended)]

    quiet_late, backlog_late = late_in(quiet), late_in(backlog)
    figures = {
        "settings": {
            "deliveries": deliveries,
            "watches": watches,
            "poll_s": POLL_S,
            "receiver_s": receiver_s,
            "quiet_s": quiet_s,
        },
        "peak_pending_deliveries": peak,
        "backlog_window_s": backlog[1] - backlog[0],
        "quiet": {"polls": len(quiet_late), "p99_s": percentile(quiet_late, 0.99), "max_s": max(quiet_late, default=0)},
        "backlog": {
            "polls": len(backlog_late),
            "p99_s": percentile(backlog_late, 0.99),
            "max_s": max(backlog_late, default=0),
        },
    }
    figures["target_met"] = figures["backlog"]["p99_s"] <= LATE_S
    return figures


def rows(figures: dict[str, Any]) -> list[Row]:
    peak = figures["peak_pending_deliveries"]
    return [
        Row.compare(
            f"backlog: due polls' lateness p99 with {peak:,} deliveries pending ({figures['backlog']['polls']} polls)",
            figures["backlog"]["p99_s"],
            figures["quiet"]["p99_s"],
            "s",
            target=f"<= {LATE_S:g} s",
            met=figures["target_met"],
            baseline_name="none pending",
        )
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--deliveries", type=int, default=1200)
    parser.add_argument("--watches", type=int, default=100)
    parser.add_argument("--receiver-s", type=float, default=1.0)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    figures = run(args.deliveries, args.watches, args.receiver_s)
    s = figures["settings"]
    print(
        f"{s['watches']} watches polled every {s['poll_s']:g} s; {figures['peak_pending_deliveries']:,} deliveries "
        f"pending at the peak, the receiver answering after {s['receiver_s']:g} s; backlog window "
        f"{figures['backlog_window_s']:.1f} s"
    )
    print(format_table(rows(figures)))
    if args.json:
        write_json(Path(args.json), figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
