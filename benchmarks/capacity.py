"""Capacity: how many concurrent watches one host keeps polling on time, and at what memory.

    python -m benchmarks.capacity [--watches N] [--interval S] [--concurrency N] [--workers N] [--latency S]
                                  [--json PATH]

One machine, everything real: a Redis server, the Check365 simulator, beat, and two
``celery worker`` processes with the same concurrency, each on its own queue, run side
by side over the same window:

    ours      ``celery -A worker worker`` with POLL_INITIAL_DELAY_S = POLL_MAX_DELAY_S =
              ``--interval``: every watch is polled once per interval, as a watch of a
              long job is in production once its gaps have grown to the maximum.
    naive     what one writes without this project: a task that polls, then
              ``time.sleep(interval)`` in its worker slot, in a loop. It is built from
              the same Celery settings (``worker.runtime.celeryconfig``).

The jobs never finish during the run (the simulator's "never" behaviour), so every
watch stays active. The watches of both workers are enqueued at an even pace over one
interval, which spreads their polls evenly too; the window then covers the next
interval (every watch's first poll) and a few seconds more.

Lateness of a poll is when the simulator received it minus when it was planned:

    ours   planned = the watch's due time when its poll message was sent, which the
           worker logs as the log line's time plus its delay (``watch_enqueued``:
           ``first_poll_in_s``; ``poll_done``: ``next_poll_in_s``)
    naive  planned = enqueue time + interval for its first poll, then the previous
           poll + interval

A poll planned in the window that never came counts as late (by at least the time
to the end of the window). A watch is "kept on time" when each of its polls planned
in the window came less than ``LATE_S`` late.

Memory is the resident set of the whole worker process group (the main process,
which holds every countdown message, and its pool), sampled through the window.

The machine may be shared. The CPU that other processes used is sampled every second,
and the lateness is also given without the polls that waited (from 5 s before they were
due until they ran) while those processes used a quarter of the machine or more
(``machine`` in the figures). The target is judged on every poll.

On a 2-core machine, 10,000 watches at a 30 s interval (333 polls/s) are beyond one
host: measured, the worker kept up with about 306 polls/s and the p99 lateness grew to
12 s. Hence the 60 s default here (167 polls/s).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

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
from tests.support.cluster import Cluster, WorkerProcess
from worker.intake.enqueue import client_app, enqueue_watch
from worker.local.httpserver import Latency
from worker.runtime.celeryconfig import WORKER_THREADS
from worker.settings import Settings

NAIVE_TASK = "bench.naive_watch"
NAIVE_QUEUE = "cap-naive"
OURS_QUEUE = "cap-ours"
# A poll this late or later is not on time.
LATE_S = 1.0
# Polls planned this close to the end of the window are not judged: they may still be on their way.
TAIL_S = 2.0
# The window runs this long past the interval in which every watch's first poll is due.
EXTRA_S = 5.0
RSS_SAMPLE_S = 2.0
# A poll counts as made in a quiet moment when other processes used less than this share of the
# machine from QUIET_BEFORE_S before it was due until it ran.
QUIET_OTHER_SHARE = 0.25
QUIET_BEFORE_S = 5.0
# Long jobs that report little progress: a watch's gap stays at the maximum.
JOB_SECONDS = 86_400
# Target for the memory figure: 10,000 watches in 1 GiB, a modest share of a small host.
RSS_TARGET_MIB_PER_1000 = 100.0


# --------------------------------------------------------------------------- the naive app


def _make_naive_app() -> Any:
    """A Celery app whose task holds its slot for the whole watch, sleeping between polls."""
    import httpx

    app, settings = baseline_app("bench-naive", NAIVE_QUEUE)
    clients: dict[int, httpx.Client] = {}

    @app.task(name=NAIVE_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
    def naive_watch(job_id: str, first_poll_at: float, interval_s: float, stop_at: float) -> None:
        client = per_process(clients, lambda: httpx.Client(timeout=30))
        time.sleep(max(0.0, first_poll_at - time.time()))
        while time.time() < stop_at:
            answer = client.get(settings.status_url, params={"api_key": settings.api_key, "job_id": job_id})
            data = answer.json().get("data") or {}
            if data.get("status") == "completed":
                return
            time.sleep(interval_s)

    return app


__getattr__ = lazy_app(globals(), "naive_app", _make_naive_app)


# --------------------------------------------------------------------------- measuring


class RssSampler:
    """Samples the resident memory of process groups (summed) from a thread until stopped."""

    def __init__(self, leaders: list[int], every_s: float = RSS_SAMPLE_S) -> None:
        self.leaders = leaders
        self.every_s = every_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), sum(group_rss_bytes(leader) for leader in self.leaders)))
            self._stop.wait(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def max_between(self, start: float, end: float) -> int:
        return max((rss for at, rss in self.samples if start <= at <= end), default=0)


def _epoch(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()


def planned_polls_ours(workers: list[WorkerProcess], prefix: str) -> dict[str, list[float]]:
    """Per job, the planned time of each poll in order, from the workers' JSON logs."""
    planned: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for record in (r for worker in workers for r in worker.log_records()):
        event = record.get("event")
        job = str(record.get("job_id", ""))
        if not job.startswith(prefix) or "timestamp" not in record:
            continue
        if event == "watch_enqueued":
            delay = record.get("first_poll_in_s")
        elif event == "poll_done":
            delay = record.get("next_poll_in_s")
        else:
            continue
        if isinstance(delay, int | float):
            at = _epoch(str(record["timestamp"]))
            planned[job].append((at, at + float(delay)))
    # Ordered by when the plan was made: a watch's steps run one after the other.
    return {job: [due for _, due in sorted(plans)] for job, plans in planned.items()}


def lateness(planned: list[float], actual: list[float], window: tuple[float, float], end: float) -> list[float]:
    """The lateness of each poll planned inside ``window``; one never made counts until ``end``."""
    out = []
    for index, due in enumerate(planned):
        if window[0] <= due <= window[1]:
            out.append((actual[index] if index < len(actual) else end) - due)
    return out


def summarise(per_watch: dict[str, list[float]], watches: int) -> dict[str, Any]:
    values = [v for lates in per_watch.values() for v in lates]
    judged = [lates for lates in per_watch.values() if lates]
    return {
        "polls_judged": len(values),
        "watches_judged": len(judged),
        "watches_on_time": sum(1 for lates in judged if max(lates) < LATE_S),
        "lateness_p50_s": percentile(values, 0.50),
        "lateness_p99_s": percentile(values, 0.99),
        "lateness_max_s": max(values, default=float("nan")),
        "polls_late": sum(1 for v in values if v >= LATE_S),
        "watches": watches,
    }


# --------------------------------------------------------------------------- the run


def _ours_env(interval_s: float, max_rps: float) -> dict[str, str]:
    return {
        "CHECK365_QUEUE": OURS_QUEUE,
        "POLL_INITIAL_DELAY_S": repr(interval_s),
        "POLL_MAX_DELAY_S": repr(interval_s),
        "WATCH_TIMEOUT_S": "3600",
        "REARM_GRACE_S": "60",
        "SWEEP_INTERVAL_S": "15",
        # The pool-wide limit is raised to what this many watches need at this interval, with room.
        "CHECK365_MAX_RPS": repr(max_rps),
        # The production defaults for logs: one JSON line per step at INFO.
        "LOG_LEVEL": "info",
        "LOG_FORMAT": "json",
    }


def _ramp(cluster: Cluster, settings: Settings, watches: int, interval_s: float, stop_at: float) -> dict[str, Any]:
    """Enqueue both workers' watches at an even pace over one interval; when each naive one was sent."""
    sender = client_app(settings)
    url = cluster.callback_url("/hooks/capacity")
    started = time.time()
    lag_s = 0.0
    naive: dict[str, float] = {}
    for index in range(watches):
        # An even pace over one interval spreads the polls evenly over every later interval.
        wait = started + interval_s * index / watches - time.time()
        if wait > 0:
            time.sleep(wait)
        else:
            lag_s = max(lag_s, -wait)
        enqueue_watch(f"sim-3-{JOB_SECONDS}s-never-o{index}", url, settings=settings)
        job = f"sim-3-{JOB_SECONDS}s-never-n{index}"
        naive[job] = time.time()
        sender.send_task(NAIVE_TASK, args=[job, naive[job] + interval_s, interval_s, stop_at], queue=NAIVE_QUEUE)
    return {"naive_enqueued_at": naive, "ramp_s": time.time() - started, "ramp_max_lag_s": lag_s}


class CpuShare:
    """The share of the machine's CPU used by other processes than this benchmark's, second by second.

    The machine may be shared (other test runs): a burst of their work starves the
    worker, and the lateness it causes is reported next to it, not hidden.
    """

    def __init__(self, leaders: list[int], pids: list[int]) -> None:
        self.leaders, self.pids = leaders, pids
        self.samples: list[tuple[float, float, float]] = []  # (time, machine busy s, benchmark s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-share", daemon=True)

    def _read(self) -> tuple[float, float, float]:
        # /proc/stat "cpu": user nice system idle iowait irq softirq steal ..., in ticks.
        ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
        times = os.times()
        ours = times.user + times.system + sum(group_cpu_seconds(p) for p in self.leaders)
        ours += sum(process_cpu_seconds(p) for p in self.pids)
        return time.time(), busy, ours

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._read())
            self._stop.wait(1.0)

    def __enter__(self) -> CpuShare:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self._read())

    def other_share(self, start: float, end: float) -> float:
        """Mean share of all cores used by other processes between two times (sample resolution)."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return 0.0
        (t0, busy0, ours0), (t1, busy1, ours1) = inside[0], inside[-1]
        return max(0.0, (busy1 - busy0) - (ours1 - ours0)) / ((t1 - t0) * (os.cpu_count() or 1))


def run(
    watches: int = 10_000,
    interval_s: float = 60.0,
    concurrency: int | None = None,
    max_rps: float = 1000.0,
    *,
    workers: int = 1,
    latency_s: float = 0.0,
) -> dict[str, Any]:
    """``workers`` worker processes of ours (each with the app's pool unless ``concurrency`` is
    given, then sharing it); the naive one has the app's pool, or ``concurrency`` slots.

    Check365 answers every status request after ``latency_s``.
    """
    ours_env = _ours_env(interval_s, max_rps)
    with Cluster(api_latency=Latency(latency_s)) as cluster:
        ours_workers = [
            cluster.start_worker(
                f"ours{i}",
                concurrency=None if concurrency is None else concurrency // workers,
                env_overrides=ours_env,
                queue=OURS_QUEUE,
                wait=False,
            )
            for i in range(workers)
        ]
        naive = start_celery_worker(
            cluster,
            "naive",
            app="benchmarks.capacity:naive_app",
            queue=NAIVE_QUEUE,
            concurrency=concurrency,
            env=cluster.env(**ours_env),
            extra_args=("--loglevel", "INFO"),
        )
        beat = cluster.start_beat("beat", env_overrides=ours_env, wait=False)
        for process in (*ours_workers, naive, beat):
            process.wait_ready(60)
        time.sleep(1.0)
        leaders = [w.pid for w in ours_workers]
        idle_rss = sum(group_rss_bytes(leader) for leader in leaders)
        redis_before = int(cluster.redis().info("memory")["used_memory"])
        ramp_end = time.time() + interval_s
        stop_at = ramp_end + interval_s + EXTRA_S
        redis_pid = cluster.redis_server.process.pid if cluster.redis_server.process else os.getpid()
        cpu = CpuShare([*leaders, naive.pid, beat.pid], [redis_pid])
        with RssSampler(leaders) as ours_rss, RssSampler([naive.pid]) as naive_rss, cpu:
            ramp = _ramp(cluster, cluster.client_settings(**ours_env), watches, interval_s, stop_at)
            time.sleep(max(0.0, stop_at - time.time()))
            ended = time.time()
            requests = cluster.sim.requests()
        state = {
            "active": cluster.active_watch_count(),
            "redis_growth": int(cluster.redis().info("memory")["used_memory"]) - redis_before,
            "naive_queued": cluster.queue_length(NAIVE_QUEUE),
        }
        naive.kill()
        ours_plans = planned_polls_ours(ours_workers, "sim-3-")

    window = (ramp_end, ended - TAIL_S)
    actual: dict[str, list[float]] = collections.defaultdict(list)
    for request in requests:
        actual[request.job_id].append(request.at)
    for times in actual.values():
        times.sort()
    ours_late = {job: lateness(plans, actual.get(job, []), window, ended) for job, plans in ours_plans.items()}
    naive_late: dict[str, list[float]] = {}
    for job, enqueued_at in ramp.pop("naive_enqueued_at").items():
        polls = actual.get(job, [])
        plans = [enqueued_at + interval_s] + [at + interval_s for at in polls]
        naive_late[job] = lateness(plans, polls, window, ended)

    ours_summary = summarise(ours_late, watches)
    # The same polls, less those that waited while other processes took a large share of the
    # machine: from a few seconds before they were due (a backlog takes a while to form) until
    # they ran (a second at least, the resolution of the CPU samples).
    quiet_late = {
        job: [
            late
            for due, late in zip([d for d in plans if window[0] <= d <= window[1]], ours_late[job], strict=True)
            if cpu.other_share(due - QUIET_BEFORE_S, due + max(late, 1.0)) < QUIET_OTHER_SHARE
        ]
        for job, plans in ours_plans.items()
    }
    quiet = summarise(quiet_late, watches)
    naive_summary = summarise(naive_late, watches)
    # The latest of our polls, to tell a pause of the whole host from a slow watch.
    ours_worst = sorted(
        (
            (round(late, 3), round(due - window[0], 3), job)
            for job, plans in ours_plans.items()
            for due, late in zip([d for d in plans if window[0] <= d <= window[1]], ours_late[job], strict=True)
        ),
        reverse=True,
    )[:20]
    in_window = sum(1 for r in requests if window[0] <= r.at <= window[1] and r.job_id in ours_plans)
    peak_rss = ours_rss.max_between(ramp_end, ended)
    naive_peak_rss = naive_rss.max_between(ramp_end, ended)
    thousands = watches / 1000
    per_1000_mib = peak_rss / thousands / 2**20
    return {
        "settings": {
            "watches": watches,
            "interval_s": interval_s,
            "concurrency": concurrency or WORKER_THREADS * workers,
            "latency_s": latency_s,
            "workers": workers,
            "max_rps": max_rps,
            "late_s": LATE_S,
            "window_s": window[1] - window[0],
            **ramp,
        },
        "ours": {
            **ours_summary,
            "active_watches_at_end": state["active"],
            "rss_idle_bytes": idle_rss,
            "rss_peak_bytes": peak_rss,
            "rss_mib_per_1000_watches": per_1000_mib,
            "rss_growth_mib_per_1000_watches": (peak_rss - idle_rss) / thousands / 2**20,
            "redis_growth_mib_per_1000_watches": state["redis_growth"] / thousands / 2**20,
            "requests_per_s_in_window": in_window / (window[1] - window[0]),
            "latest_polls": [
                {"lateness_s": late, "planned_s_into_window": at, "job_id": job} for late, at, job in ours_worst
            ],
            "rss_samples": ours_rss.samples,
        },
        "naive": {
            **naive_summary,
            "still_queued_at_end": state["naive_queued"],
            "rss_peak_bytes": naive_peak_rss,
            # Its memory for the watches it actually keeps polling: one sleeping slot each.
            "rss_mib_per_1000_watches_on_time": (
                naive_peak_rss / (naive_summary["watches_on_time"] / 1000) / 2**20
                if naive_summary["watches_on_time"]
                else float("inf")
            ),
        },
        "ratios": {
            "watches_on_time_ours_over_naive": (
                ours_summary["watches_on_time"] / naive_summary["watches_on_time"]
                if naive_summary["watches_on_time"]
                else float("inf")
            ),
        },
        "machine": {
            # What processes outside this benchmark (for example other test runs) used of all cores.
            "other_cpu_share": cpu.other_share(ramp_end, ended),
            "other_cpu_share_max_5s": max(
                (cpu.other_share(at, at + 5.0) for at, _, _ in cpu.samples if at + 5.0 <= ended), default=0.0
            ),
            "quiet_polls_judged": quiet["polls_judged"],
            "quiet_lateness_p99_s": quiet["lateness_p99_s"],
            "quiet_lateness_max_s": quiet["lateness_max_s"],
        },
        "targets": {
            "lateness_p99_under_1s": ours_summary["lateness_p99_s"] < LATE_S,
            "rss_per_1000_within_target": per_1000_mib <= RSS_TARGET_MIB_PER_1000,
            "all_watches_active": state["active"] == watches,
        },
    }


# With Check365 answering this late, one host keeps at least KEPT_FRACTION of its polls/s.
LATENCY_S = 0.25
KEPT_FRACTION = 0.8


def run_both(
    watches: int = 5_000, interval_s: float = 30.0, workers: int = 2, latency_s: float = LATENCY_S
) -> dict[str, Any]:
    """The capacity run with Check365 answering at once, then after ``latency_s``."""
    zero = run(watches, interval_s, workers=workers)
    slow = run(watches, interval_s, workers=workers, latency_s=latency_s)
    kept = slow["ours"]["requests_per_s_in_window"] / zero["ours"]["requests_per_s_in_window"]
    return {"zero": zero, "latency": slow, "kept_at_latency": kept, "kept_met": kept >= KEPT_FRACTION}


def rows_both(figures: dict[str, Any]) -> list[Row]:
    zero, slow = figures["zero"], figures["latency"]
    ms = f"{slow['settings']['latency_s'] * 1000:g} ms"
    return [
        *rows(zero),
        *rows(slow, f"capacity at {ms}"),
        Row.compare(
            f"capacity: polls/s at {ms} (Check365) next to 0 ms, {zero['settings']['workers']} workers",
            slow["ours"]["requests_per_s_in_window"],
            zero["ours"]["requests_per_s_in_window"],
            "/s",
            target=f">= {KEPT_FRACTION:g} x at 0 ms",
            met=figures["kept_met"],
            baseline_name="at 0 ms",
        ),
    ]


def rows(figures: dict[str, Any], label: str = "capacity") -> list[Row]:
    s, ours, naive, targets = figures["settings"], figures["ours"], figures["naive"], figures["targets"]
    n = f"{s['watches']:,}"
    return [
        Row.compare(
            f"{label}: watches polled on time (of {n}, every {s['interval_s']:g} s)",
            ours["watches_on_time"],
            naive["watches_on_time"],
            "",
            # Context for the lateness target below: how many watches each worker really keeps.
            target="-",
            met=None,
            baseline_name="naive sleep loop",
        ),
        Row.compare(
            f"{label}: poll lateness p99",
            ours["lateness_p99_s"],
            naive["lateness_p99_s"],
            "s",
            target=f"< {LATE_S:g} s",
            met=targets["lateness_p99_under_1s"],
            # Polls that never came count only up to the end of the window: a lower bound.
            baseline_name="naive, at least",
        ),
        Row(
            # Polls that waited while other processes used less than QUIET_OTHER_SHARE of the machine.
            f"{label}: poll lateness p99, quiet moments ({figures['machine']['quiet_polls_judged']:,} of "
            f"{ours['polls_judged']:,} polls)",
            figures["machine"]["quiet_lateness_p99_s"],
            None,
            "s",
            "-",
            None,
        ),
        Row.compare(
            f"{label}: worker RSS per 1,000 watches (at {n})",
            ours["rss_mib_per_1000_watches"],
            naive["rss_mib_per_1000_watches_on_time"],
            "MiB",
            target=f"<= {RSS_TARGET_MIB_PER_1000:g} MiB",
            met=targets["rss_per_1000_within_target"],
            baseline_name="naive, per watch kept on time",
        ),
    ]


def format_report(figures: dict[str, Any]) -> str:
    s, ours, naive, m = figures["settings"], figures["ours"], figures["naive"], figures["machine"]
    lines = [
        f"{s['watches']:,} watches each for ours and the naive worker, one poll every {s['interval_s']:g} s, "
        f"concurrency {s['concurrency']} in {s['workers']} worker process(es); "
        f"enqueued over {s['ramp_s']:.1f} s (at most {s['ramp_max_lag_s']:.2f} s "
        f"behind pace); window {s['window_s']:.1f} s",
        f"ours:  {ours['polls_judged']:,} polls judged, {ours['requests_per_s_in_window']:.0f} requests/s, "
        f"lateness p50 {ours['lateness_p50_s']:.3f} s, p99 {ours['lateness_p99_s']:.3f} s, "
        f"max {ours['lateness_max_s']:.3f} s; {ours['active_watches_at_end']:,} watches active at the end",
        f"       RSS {ours['rss_idle_bytes'] / 2**20:.0f} MiB idle, {ours['rss_peak_bytes'] / 2**20:.0f} MiB peak "
        f"({ours['rss_growth_mib_per_1000_watches']:.1f} MiB more per 1,000 watches); "
        f"Redis {ours['redis_growth_mib_per_1000_watches']:.1f} MiB more per 1,000 watches (both workers' "
        "messages and state)",
        f"other processes used {100 * m['other_cpu_share']:.0f} % of the machine in the window, up to "
        f"{100 * m['other_cpu_share_max_5s']:.0f} % over 5 s; without the polls that waited while they used "
        f">= {100 * QUIET_OTHER_SHARE:.0f} % ({ours['polls_judged'] - m['quiet_polls_judged']:,} polls): "
        f"p99 {m['quiet_lateness_p99_s']:.3f} s, max {m['quiet_lateness_max_s']:.3f} s",
        f"naive: {naive['watches_on_time']:,} watches on time, {naive['still_queued_at_end']:,} still queued; "
        f"RSS {naive['rss_peak_bytes'] / 2**20:.0f} MiB",
        "",
        format_table(rows(figures)),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--watches", type=int, default=10_000)
    parser.add_argument("--interval", type=float, default=60.0)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="slots of ours in all, and of the naive worker (default: the app's)",
    )
    parser.add_argument("--latency", type=float, default=0.0, help="seconds Check365 takes to answer (default: 0)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes sharing our slots")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    figures = run(args.watches, args.interval, args.concurrency, workers=args.workers, latency_s=args.latency)
    print(format_report(figures))
    if args.json:
        write_json(Path(args.json), figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
